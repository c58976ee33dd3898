//! The service tables in the pinned maps, read and written from userspace: node addresses,
//! frontends, slots, backends, configuration, and the connection-tracking tables for listing.
//!
//! Write order is what keeps a packet from ever seeing a half-written service (the packet path
//! reads frontend -> slot -> backend): backends are written before the slots that name them,
//! slots before the frontend count that exposes them; on removal the frontend goes first. The
//! caller writes backends with [`ServiceTables::put_backend`] before [`ServiceTables::put_service`].
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use nodeport_common::{
    Affinity, AffinityKey, Backend, BackendKey, CT_LOCAL, CT_SNAT, Config, CtEntry, FlowKey,
    Frontend, FrontendKey, NodeAddr, NodeAddrKey, RevNat, Slot, SlotKey, Traffic, map_names,
};

use crate::Error;

/// One service port as the packet path sees it on this node (ports in host byte order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub node_port: u16,
    pub proto: u8,
    pub svc_id: u32,
    /// `FRONTEND_*` flags.
    pub flags: u16,
    pub affinity_timeout_s: u32,
    /// Backend ids for slots 1..=n, in order.
    pub backends: Vec<u32>,
    /// externalTrafficPolicy=Local: backend ids of the cluster slots (`CLUSTER_SLOTS`), which
    /// the node's own processes and pods are balanced over. Empty otherwise.
    pub cluster_backends: Vec<u32>,
}

/// One of a service's two slot sets in `np_slot4`.
#[derive(Clone, Copy)]
struct SlotSet(u32);

impl SlotSet {
    fn local(svc_id: u32) -> Self {
        Self(svc_id)
    }

    fn cluster(svc_id: u32) -> Self {
        Self(svc_id | nodeport_common::CLUSTER_SLOTS)
    }

    fn slot(self, slot: u32) -> SlotKey {
        SlotKey {
            svc_id: self.0,
            slot,
        }
    }
}

/// A backend in host terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendEntry {
    pub addr: SocketAddrV4,
    pub proto: u8,
    /// `BACKEND_*` flags.
    pub flags: u8,
}

impl BackendEntry {
    pub fn to_map(self) -> Backend {
        Backend {
            addr: u32::from(*self.addr.ip()).to_be(),
            port: self.addr.port().to_be(),
            proto: self.proto,
            flags: self.flags,
        }
    }

    pub fn from_map(b: &Backend) -> Self {
        Self {
            addr: SocketAddrV4::new(Ipv4Addr::from(u32::from_be(b.addr)), u16::from_be(b.port)),
            proto: b.proto,
            flags: b.flags,
        }
    }
}

fn frontend_key(node_port: u16, proto: u8) -> FrontendKey {
    FrontendKey {
        port: node_port.to_be(),
        proto,
        _pad: 0,
    }
}

pub struct ServiceTables {
    config: Array<MapData, Config>,
    addrs: HashMap<MapData, NodeAddrKey, NodeAddr>,
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: HashMap<MapData, BackendKey, Backend>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    rev_nat: HashMap<MapData, FlowKey, RevNat>,
    affinity: HashMap<MapData, AffinityKey, Affinity>,
    service_counters: PerCpuArray<MapData, Traffic>,
}

/// The clock of `bpf_ktime_get_ns`, which conntrack expiry times are in.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The reverse-NAT key a conntrack entry owns (what its replies arrive as): the same function
/// the programs use, so a source-NATed flow and a DNAT-only flow whose client port was remapped
/// are both found under their rewritten source. None for an entry that is neither.
pub fn reply_key(flow: &FlowKey, ct: &CtEntry) -> Option<FlowKey> {
    (ct.flags & (CT_SNAT | CT_LOCAL) != 0).then(|| ct.reply_key(flow))
}

fn map_err(name: &str) -> impl Fn(MapError) -> Error + '_ {
    move |source| Error::Map {
        name: name.to_owned(),
        source,
    }
}

fn open<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &str) -> Result<T, Error> {
    let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl ServiceTables {
    /// Opens the maps pinned in `dir` (the versioned pin directory).
    pub fn open(dir: &Path) -> Result<Self, Error> {
        Ok(Self {
            config: open(dir, map_names::CONFIG)?,
            addrs: open(dir, map_names::NODE_ADDRS)?,
            frontends: open(dir, map_names::FRONTENDS)?,
            slots: open(dir, map_names::SLOTS)?,
            backends: open(dir, map_names::BACKENDS)?,
            conntrack: open(dir, map_names::CONNTRACK)?,
            rev_nat: open(dir, map_names::REV_NAT)?,
            affinity: open(dir, map_names::AFFINITY)?,
            service_counters: open(dir, map_names::SERVICE_COUNTERS)?,
        })
    }

    pub fn config(&self) -> Result<Config, Error> {
        self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))
    }

    pub fn set_config(&mut self, config: &Config) -> Result<(), Error> {
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    pub fn node_addrs(&self) -> Result<Vec<Ipv4Addr>, Error> {
        let mut out = Vec::new();
        for k in self.addrs.keys() {
            let k = k.map_err(map_err(map_names::NODE_ADDRS))?;
            out.push(Ipv4Addr::from(u32::from_be(k.addr)));
        }
        out.sort();
        Ok(out)
    }

    /// Makes the NodePort address set exactly `addrs`: new ones added first, stale ones removed.
    pub fn set_node_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<(), Error> {
        let name = map_names::NODE_ADDRS;
        for a in addrs {
            let key = NodeAddrKey {
                addr: u32::from(*a).to_be(),
            };
            self.addrs
                .insert(&key, &NodeAddr { flags: 0 }, 0)
                .map_err(map_err(name))?;
        }
        for old in self.node_addrs()? {
            if !addrs.contains(&old) {
                let key = NodeAddrKey {
                    addr: u32::from(old).to_be(),
                };
                remove_if_present(self.addrs.remove(&key)).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    pub fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), Error> {
        self.backends
            .insert(&BackendKey { id }, &backend.to_map(), 0)
            .map_err(map_err(map_names::BACKENDS))
    }

    /// Removes a backend: flows still tracked to it are balanced anew on their next packet.
    pub fn remove_backend(&mut self, id: u32) -> Result<(), Error> {
        remove_if_present(self.backends.remove(&BackendKey { id }))
            .map_err(map_err(map_names::BACKENDS))
    }

    pub fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, Error> {
        let mut out = Vec::new();
        for kv in self.backends.iter() {
            let (k, v) = kv.map_err(map_err(map_names::BACKENDS))?;
            out.push((k.id, BackendEntry::from_map(&v)));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Writes a service port: slots first (both sets), then the frontend (whose counts expose
    /// them), then the slots beyond the new counts are removed.
    pub fn put_service(&mut self, svc: &ServiceEntry) -> Result<(), Error> {
        let key = frontend_key(svc.node_port, svc.proto);
        let old = self
            .frontends
            .get(&key, 0)
            .ok()
            .filter(|f| f.svc_id == svc.svc_id);
        let local = SlotSet::local(svc.svc_id);
        let cluster = SlotSet::cluster(svc.svc_id);
        let count = self.put_slots(local, &svc.backends)?;
        let cluster_count = self.put_slots(cluster, &svc.cluster_backends)?;
        let fe = Frontend {
            svc_id: svc.svc_id,
            count,
            flags: svc.flags,
            affinity_timeout_s: svc.affinity_timeout_s,
            lb_alg: nodeport_common::LB_ALG_RANDOM,
            _pad: 0,
            cluster_count,
        };
        self.frontends
            .insert(&key, &fe, 0)
            .map_err(map_err(map_names::FRONTENDS))?;
        if let Some(old) = old {
            self.remove_slots(local, count, old.count)?;
            self.remove_slots(cluster, cluster_count, old.cluster_count)?;
        }
        Ok(())
    }

    /// Writes slots `1..=ids.len()` of `set`; returns their count.
    fn put_slots(&mut self, set: SlotSet, ids: &[u32]) -> Result<u16, Error> {
        let count = u16::try_from(ids.len()).map_err(|_| Error::Map {
            name: map_names::SLOTS.to_owned(),
            source: MapError::OutOfBounds {
                index: ids.len() as u32,
                max_entries: u32::from(u16::MAX),
            },
        })?;
        for (i, id) in ids.iter().enumerate() {
            self.slots
                .insert(&set.slot(i as u32 + 1), &Slot { backend_id: *id }, 0)
                .map_err(map_err(map_names::SLOTS))?;
        }
        Ok(count)
    }

    /// Removes slots `from + 1..=to` of `set`.
    fn remove_slots(&mut self, set: SlotSet, from: u16, to: u16) -> Result<(), Error> {
        for slot in u32::from(from) + 1..=u32::from(to) {
            remove_if_present(self.slots.remove(&set.slot(slot)))
                .map_err(map_err(map_names::SLOTS))?;
        }
        Ok(())
    }

    fn read_slots(&self, set: SlotSet, count: u16) -> Result<Vec<u32>, Error> {
        (1..=u32::from(count))
            .map(|slot| {
                self.slots
                    .get(&set.slot(slot), 0)
                    .map(|s| s.backend_id)
                    .map_err(map_err(map_names::SLOTS))
            })
            .collect()
    }

    /// Removes a service port: frontend first, so no packet reaches its slots, then the slots.
    pub fn remove_service(&mut self, node_port: u16, proto: u8) -> Result<(), Error> {
        let key = frontend_key(node_port, proto);
        let Ok(fe) = self.frontends.get(&key, 0) else {
            return Ok(());
        };
        remove_if_present(self.frontends.remove(&key)).map_err(map_err(map_names::FRONTENDS))?;
        self.remove_slots(SlotSet::local(fe.svc_id), 0, fe.count)?;
        self.remove_slots(SlotSet::cluster(fe.svc_id), 0, fe.cluster_count)
    }

    /// Every service port with its slots, sorted by (nodePort, protocol).
    pub fn services(&self) -> Result<Vec<ServiceEntry>, Error> {
        let mut out = Vec::new();
        for kv in self.frontends.iter() {
            let (k, fe) = kv.map_err(map_err(map_names::FRONTENDS))?;
            out.push(ServiceEntry {
                node_port: u16::from_be(k.port),
                proto: k.proto,
                svc_id: fe.svc_id,
                flags: fe.flags,
                affinity_timeout_s: fe.affinity_timeout_s,
                backends: self.read_slots(SlotSet::local(fe.svc_id), fe.count)?,
                cluster_backends: self.read_slots(SlotSet::cluster(fe.svc_id), fe.cluster_count)?,
            });
        }
        out.sort_by_key(|s| (s.node_port, s.proto));
        Ok(out)
    }

    /// Tracked flows: (client's original tuple, entry).
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, CtEntry)>, Error> {
        let mut out = Vec::new();
        for kv in self.conntrack.iter() {
            out.push(kv.map_err(map_err(map_names::CONNTRACK))?);
        }
        Ok(out)
    }

    pub fn rev_nat(&self) -> Result<Vec<(FlowKey, RevNat)>, Error> {
        let mut out = Vec::new();
        for kv in self.rev_nat.iter() {
            out.push(kv.map_err(map_err(map_names::REV_NAT))?);
        }
        Ok(out)
    }

    /// Removes expired flows and their reverse-NAT entries (the programs only check expiry when a
    /// packet comes; without a sweep, dead flows would sit in the tables until LRU eviction and
    /// keep their SNAT ports reserved). Returns how many flows went.
    pub fn sweep_expired(&mut self, now_ns: u64) -> Result<usize, Error> {
        // Only the expired entries are kept: a full table is 524,288 flows.
        let mut expired: Vec<(FlowKey, CtEntry)> = Vec::new();
        for kv in self.conntrack.iter() {
            let (flow, ct) = kv.map_err(map_err(map_names::CONNTRACK))?;
            if ct.expires_ns <= now_ns {
                expired.push((flow, ct));
            }
        }
        for (flow, ct) in &expired {
            if let Some(rkey) = reply_key(flow, ct) {
                // Only if it still points at this flow: the port may already serve a new one.
                if self.rev_nat.get(&rkey, 0).is_ok_and(|rn| rn.flow == *flow) {
                    remove_if_present(self.rev_nat.remove(&rkey))
                        .map_err(map_err(map_names::REV_NAT))?;
                }
            }
            remove_if_present(self.conntrack.remove(flow))
                .map_err(map_err(map_names::CONNTRACK))?;
        }
        Ok(expired.len())
    }

    /// Packets and bytes translated for a service port, summed over CPUs.
    pub fn service_traffic(&self, svc_id: u32) -> Result<Traffic, Error> {
        let per_cpu = self
            .service_counters
            .get(&svc_id, 0)
            .map_err(map_err(map_names::SERVICE_COUNTERS))?;
        Ok(per_cpu.iter().fold(Traffic::default(), |acc, t| Traffic {
            packets: acc.packets + t.packets,
            bytes: acc.bytes + t.bytes,
        }))
    }

    /// Removes every ClientIP affinity entry of `svc_id` that points at a backend not in
    /// `keep`: a backend leaving a service must not keep attracting its former clients.
    pub fn purge_affinity(&mut self, svc_id: u32, keep: &[u32]) -> Result<usize, Error> {
        let name = map_names::AFFINITY;
        let mut stale = Vec::new();
        for kv in self.affinity.iter() {
            let (k, v) = kv.map_err(map_err(name))?;
            if k.svc_id == svc_id && !keep.contains(&v.backend_id) {
                stale.push(k);
            }
        }
        for k in &stale {
            remove_if_present(self.affinity.remove(k)).map_err(map_err(name))?;
        }
        Ok(stale.len())
    }
}

/// Removing what is already gone is success: the goal state holds.
fn remove_if_present(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
