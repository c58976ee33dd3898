//! The maps, BTF-typed and pinned by name: the agent pins them under its versioned directory and a
//! restarted agent (or a newer build of the programs) reuses them, connection tracking included.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use nodeport_common::{
    Affinity, AffinityKey, Backend, BackendKey, Config, CtEntry, FlowKey, Frontend, FrontendKey,
    NodeAddr, NodeAddrKey, RevNat, Slot, SlotKey, SockNat, SockNatKey, Traffic, capacity as cap,
};

#[btf_map(name = "np_config", pin_by_name)]
pub static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "np_addr4", pin_by_name)]
pub static NODE_ADDRS: HashMap<NodeAddrKey, NodeAddr, { cap::NODE_ADDRS as usize }> =
    HashMap::new();

#[btf_map(name = "np_front4", pin_by_name)]
pub static FRONTENDS: HashMap<FrontendKey, Frontend, { cap::FRONTENDS as usize }> = HashMap::new();

#[btf_map(name = "np_slot4", pin_by_name)]
pub static SLOTS: HashMap<SlotKey, Slot, { cap::SLOTS as usize }> = HashMap::new();

#[btf_map(name = "np_back4", pin_by_name)]
pub static BACKENDS: HashMap<BackendKey, Backend, { cap::BACKENDS as usize }> = HashMap::new();

/// LRU: a full table evicts the least recently used flow instead of refusing new ones.
#[btf_map(name = "np_ct4", pin_by_name)]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry, { cap::CONNTRACK as usize }> = LruHashMap::new();

#[btf_map(name = "np_rnat4", pin_by_name)]
pub static REV_NAT: LruHashMap<FlowKey, RevNat, { cap::REV_NAT as usize }> = LruHashMap::new();

#[btf_map(name = "np_aff4", pin_by_name)]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity, { cap::AFFINITY as usize }> =
    LruHashMap::new();

#[btf_map(name = "np_stats", pin_by_name)]
pub static COUNTERS: PerCpuArray<Traffic, { cap::COUNTERS as usize }> = PerCpuArray::new();

#[btf_map(name = "np_svc_stats", pin_by_name)]
pub static SERVICE_COUNTERS: PerCpuArray<Traffic, { cap::SERVICES as usize }> = PerCpuArray::new();

/// Socket load balancing's translations, per socket cookie (LRU: sockets close without telling
/// us, and an evicted entry only costs getpeername()/recvmsg() the original address).
#[btf_map(name = "np_sk_nat4", pin_by_name)]
pub static SOCK_NAT: LruHashMap<SockNatKey, SockNat, { cap::SOCK_NAT as usize }> =
    LruHashMap::new();

#[btf_map(name = "np_sk_stats", pin_by_name)]
pub static SOCK_COUNTERS: PerCpuArray<u64, { cap::SOCK_COUNTERS as usize }> = PerCpuArray::new();
