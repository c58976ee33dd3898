//! Map keys, values and constants shared by the eBPF programs (`nodeport-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]`, `Copy`, and has no implicit padding: explicit `_pad` fields
//! fill the holes, so a key hashes the same whatever garbage the stack held, and `bpftool map dump`
//! shows every byte by name. Addresses and ports are kept in **network byte order**, exactly as
//! they appear in packets, so the fast path never swaps bytes; the agent converts.
//!
//! The maps are IPv4 (`…4` names). IPv6 gets its own maps with the same shapes and 16-byte
//! addresses, like Cilium's `lb4_*`/`lb6_*` split, so the v4 layout does not grow for it.
#![no_std]

pub mod counters;
pub use counters::{Counter, SockCounter};

/// Version of the map layout. Pinned maps live under `<pin root>/v<LAYOUT_VERSION>/`, so an agent
/// with a different layout never adopts maps it cannot read: it detects the other version's
/// directory and handles it deliberately (see the agent's pinning code).
pub const LAYOUT_VERSION: u32 = 1;

/// Default bpffs directory under which the versioned pin directory is created.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/nodeport";

/// Names of the maps in the object file (at most 15 characters: the kernel's BPF_OBJ_NAME_LEN).
pub mod map_names {
    pub const CONFIG: &str = "np_config";
    pub const NODE_ADDRS: &str = "np_addr4";
    pub const FRONTENDS: &str = "np_front4";
    pub const SLOTS: &str = "np_slot4";
    pub const BACKENDS: &str = "np_back4";
    pub const CONNTRACK: &str = "np_ct4";
    pub const REV_NAT: &str = "np_rnat4";
    pub const AFFINITY: &str = "np_aff4";
    pub const COUNTERS: &str = "np_stats";
    pub const SERVICE_COUNTERS: &str = "np_svc_stats";
    pub const SOCK_NAT: &str = "np_sk_nat4";
    pub const SOCK_COUNTERS: &str = "np_sk_stats";
    pub const ALL: &[&str] = &[
        CONFIG,
        NODE_ADDRS,
        FRONTENDS,
        SLOTS,
        BACKENDS,
        CONNTRACK,
        REV_NAT,
        AFFINITY,
        COUNTERS,
        SERVICE_COUNTERS,
        SOCK_NAT,
        SOCK_COUNTERS,
    ];
}

/// Names of the programs in the object file.
pub mod program_names {
    /// XDP on a node interface: NodePort ingress and SNAT'd replies.
    pub const XDP_INGRESS: &str = "np_xdp";
    /// TC ingress on a node interface: the same logic, used where XDP cannot transmit (veth whose
    /// peer has no XDP program, as on kind) or as the fallback the agent chooses.
    pub const TC_INGRESS: &str = "np_tc_ingress";
    /// TC egress on a node interface: reverse translation of replies from backends on this node
    /// (their packets are routed by the stack and never cross XDP).
    pub const TC_EGRESS: &str = "np_tc_egress";
    /// cgroup/connect4: a TCP or UDP socket connecting to a node address at a nodePort is
    /// connected to a backend instead (socket load balancing, for the node's own processes and
    /// pods, whose packets never cross a node interface's ingress).
    pub const SOCK_CONNECT: &str = "np_sk_connect4";
    /// cgroup/sendmsg4: the same for each datagram of an unconnected UDP socket.
    pub const SOCK_SENDMSG: &str = "np_sk_sendmsg4";
    /// cgroup/recvmsg4: a datagram from a backend reads as coming from the node address:nodePort.
    pub const SOCK_RECVMSG: &str = "np_sk_recvmsg4";
    /// cgroup/getpeername4: a socket connected to a backend names the node address:nodePort.
    pub const SOCK_GETPEERNAME: &str = "np_sk_getpeer4";
    /// The same four for IPv6 sockets naming a v4-mapped address (`::ffff:a.b.c.d`), which
    /// dual-stack clients use for IPv4 destinations.
    pub const SOCK_CONNECT6: &str = "np_sk_connect6";
    pub const SOCK_SENDMSG6: &str = "np_sk_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "np_sk_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "np_sk_getpeer6";
    /// The socket programs, in the order the agent attaches them: the reverse hooks first, so a
    /// translated connect always finds its getpeername/recvmsg counterpart attached.
    pub const SOCK: [&str; 8] = [
        SOCK_GETPEERNAME,
        SOCK_RECVMSG,
        SOCK_GETPEERNAME6,
        SOCK_RECVMSG6,
        SOCK_SENDMSG,
        SOCK_CONNECT,
        SOCK_SENDMSG6,
        SOCK_CONNECT6,
    ];
}

/// Capacities. Sized for 10,000 services with a few ports and endpoints each; see
/// docs/ARCHITECTURE.md for how to size them.
pub mod capacity {
    pub const NODE_ADDRS: u32 = 256;
    pub const FRONTENDS: u32 = 65_536;
    pub const SLOTS: u32 = 1_048_576;
    pub const BACKENDS: u32 = 262_144;
    pub const CONNTRACK: u32 = 524_288;
    pub const REV_NAT: u32 = 524_288;
    pub const AFFINITY: u32 = 65_536;
    /// Service ids run from 1 to SERVICES - 1 (0 is reserved); the per-service counters are an
    /// array indexed by id.
    pub const SERVICES: u32 = 65_536;
    /// `np_stats` slots: `Counter::COUNT` plus room for counters to come, so a newer build adds
    /// one without changing the pinned map's size.
    pub const COUNTERS: u32 = 32;
    /// `np_sk_stats` slots: `SockCounter::COUNT` plus room likewise.
    pub const SOCK_COUNTERS: u32 = 16;
    /// `np_sk_nat4`: two entries per translated socket (LRU; Cilium's lb4_reverse_sk has 262,144).
    pub const SOCK_NAT: u32 = 262_144;
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Runtime configuration, written by the agent into the single entry of `np_config`.
/// A zero `snat_port_min` means "not configured": the programs then pass all traffic untouched.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// SNAT source ports, host byte order, inclusive. Keep this range outside the node's
    /// `net.ipv4.ip_local_port_range`, or the node's own connections may collide with ours.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `CONFIG_*` flags.
    pub flags: u32,
    /// Connection-tracking lifetimes, seconds.
    pub tcp_syn_timeout_s: u32,
    pub tcp_established_timeout_s: u32,
    pub tcp_close_timeout_s: u32,
    pub udp_timeout_s: u32,
}

/// The NodePort addresses of this node (kube-proxy's `--nodeport-addresses`), keyed by address.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddrKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddr {
    /// Reserved for per-address flags; 0 today.
    pub flags: u32,
}

/// A service frontend: a nodePort and its protocol. The destination address has already been
/// matched against `np_addr4`, so one entry serves every node address (like kube-proxy's
/// KUBE-NODEPORTS chain).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// nodePort, network byte order.
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub _pad: u8,
}

/// `Frontend::flags`: externalTrafficPolicy=Local (the slots hold only this node's endpoints; an
/// empty set drops with `Counter::DropNoLocalBackend` instead of `DropNoBackend`).
pub const FRONTEND_ETP_LOCAL: u16 = 1 << 0;
/// `Frontend::flags`: sessionAffinity=ClientIP.
pub const FRONTEND_AFFINITY: u16 = 1 << 1;

/// Load-balancing algorithm of a frontend. Only `Random` exists today; Maglev will add a lookup
/// table per service id, selected by this field, without changing the other maps.
pub const LB_ALG_RANDOM: u8 = 0;
pub const LB_ALG_MAGLEV: u8 = 1;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Stable service-port id (1..capacity::SERVICES), index of the per-service counters.
    pub svc_id: u32,
    /// Number of backend slots (1..=count) for new flows on this node. Written last by the agent,
    /// after the backends and slots it covers.
    pub count: u16,
    /// `FRONTEND_*` flags.
    pub flags: u16,
    /// ClientIP affinity timeout, seconds (0 when affinity is off).
    pub affinity_timeout_s: u32,
    /// `LB_ALG_*`.
    pub lb_alg: u8,
    pub _pad: u8,
    /// externalTrafficPolicy=Local only: number of cluster slots (`SlotKey { svc_id:
    /// svc_id | CLUSTER_SLOTS, slot: 1..=cluster_count }`), every ready endpoint of the cluster.
    /// The node's own processes and pods are balanced over these (kube-proxy sends their traffic
    /// to the cluster policy chain); traffic from outside uses the local slots. 0 otherwise.
    pub cluster_count: u16,
}

/// `SlotKey::svc_id` bit of an externalTrafficPolicy=Local frontend's cluster slots (service ids
/// stay below `capacity::SERVICES`, so the bit is free).
pub const CLUSTER_SLOTS: u32 = 1 << 31;

/// One backend slot of a service: slot `1..=Frontend::count` names a backend id.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub svc_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub backend_id: u32,
}

/// `Backend::flags`: the backend runs on this node. Its traffic is DNAT'd only (the pod sees the
/// client's address) and its replies are reverse-translated on TC egress.
pub const BACKEND_LOCAL: u8 = 1 << 0;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub id: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Pod address, network byte order.
    pub addr: u32,
    /// Target port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_*` flags.
    pub flags: u8,
}

/// A connection's 5-tuple, as a packet carries it (network byte order).
/// In `np_ct4` it is the client's original tuple (client -> node:nodePort); in `np_rnat4` it is
/// the reply's tuple as it arrives at this node (backend -> node:snatPort, or backend -> client
/// for a local backend, at the remapped port when the client's port clashed).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `CtEntry::flags`: the flow is source-NATed to `nat_addr:nat_port`.
pub const CT_SNAT: u8 = 1 << 0;
/// `CtEntry::flags`: the flow goes to a backend on this node.
pub const CT_LOCAL: u8 = 1 << 1;

/// `CtEntry::tcp_state` bits.
pub const TCP_SEEN_SYN: u8 = 1 << 0;
pub const TCP_SEEN_REPLY: u8 = 1 << 1;
pub const TCP_FIN_CLIENT: u8 = 1 << 2;
pub const TCP_FIN_BACKEND: u8 = 1 << 3;
pub const TCP_RST: u8 = 1 << 4;

/// Connection-tracking entry of a translated flow, keyed by the client's original tuple.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// Expiry, in `bpf_ktime_get_ns` time (CLOCK_MONOTONIC, nanoseconds).
    pub expires_ns: u64,
    pub backend_id: u32,
    /// The backend as it was when the flow was created: if the id now names another backend (or
    /// none), the flow's backend is gone.
    pub backend_addr: u32,
    pub backend_port: u16,
    /// The source port the backend sees when it is not the client's (network byte order): the
    /// SNAT port of a `CT_SNAT` flow, or for a DNAT-only (`CT_LOCAL`) flow the port its client's
    /// port was remapped to because another live flow already reaches the pod with the same
    /// tuple (netfilter's implicit source-port remap). 0: the client's own port, unchanged.
    pub nat_port: u16,
    /// The source address with `nat_port` (network byte order): the node address of a `CT_SNAT`
    /// flow, the client's own address for a remapped `CT_LOCAL` flow; 0 when `nat_port` is 0.
    pub nat_addr: u32,
    pub svc_id: u32,
    /// `CT_*` flags.
    pub flags: u8,
    /// `TCP_*` state bits (0 for UDP).
    pub tcp_state: u8,
    pub _pad: [u8; 2],
}

impl CtEntry {
    /// The tuple the backend's replies to `flow` (this entry's key) carry, which is the
    /// `np_rnat4` key the flow owns: backend -> the source the backend saw (`nat_addr:nat_port`
    /// when the source was rewritten, else the client's own address and port).
    #[inline(always)]
    pub fn reply_key(&self, flow: &FlowKey) -> FlowKey {
        let (daddr, dport) = if self.nat_port != 0 {
            (self.nat_addr, self.nat_port)
        } else {
            (flow.saddr, flow.sport)
        };
        FlowKey {
            saddr: self.backend_addr,
            daddr,
            sport: self.backend_port,
            dport,
            proto: flow.proto,
            _pad: [0; 3],
        }
    }
}

/// Reverse-NAT entry: from a reply's tuple back to the forward flow it belongs to.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    /// The forward flow's key in `np_ct4`: its client is where the reply goes, its node
    /// address:nodePort is the reply's new source.
    pub flow: FlowKey,
}

/// ClientIP session affinity, keyed by service and client address.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub client_addr: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    /// Last use, `bpf_ktime_get_ns` time.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// `SockNatKey::dir`: the entry maps the node address:nodePort a socket asked for to its backend
/// (for the next datagram of an unconnected UDP socket, which keeps its backend like a
/// conntrack'd UDP flow would).
pub const SOCK_FORWARD: u8 = 0;
/// `SockNatKey::dir`: the entry maps the backend back to the node address:nodePort (what
/// getpeername() and recvmsg() must show).
pub const SOCK_REVERSE: u8 = 1;

/// Key of `np_sk_nat4`: a socket (its cookie) and an address it sent to or hears from.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockNatKey {
    pub cookie: u64,
    /// Network byte order: the node address (`SOCK_FORWARD`) or the backend (`SOCK_REVERSE`).
    pub addr: u32,
    pub port: u16,
    /// `SOCK_FORWARD` or `SOCK_REVERSE`.
    pub dir: u8,
    pub proto: u8,
}

/// Value of `np_sk_nat4`: the other side of the translation.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SockNat {
    /// Network byte order: the backend (`SOCK_FORWARD`) or the node address (`SOCK_REVERSE`).
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    /// The backend's id when the entry was made: a forward entry whose id now names another
    /// backend (or none) is stale and the socket is balanced again.
    pub backend_id: u32,
}

/// A per-CPU packet and byte counter (values of `np_stats` and `np_svc_stats`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for NodeAddrKey {}
    unsafe impl aya::Pod for NodeAddr {}
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Slot {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for SockNatKey {}
    unsafe impl aya::Pod for SockNat {}
}

#[cfg(test)]
mod tests;
