//! The one writer of the service maps: resolves ids for what is wanted, diffs against what the
//! maps hold, and applies the writes in order.
//!
//! On start the `Syncer` adopts what the pinned maps already hold (ids included), so a restarted
//! agent rewrites only what changed while it was away, and connection tracking, which names
//! backends by id, stays valid: established connections survive the restart.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use nodeport_common::capacity;

use super::{
    ids::Ids,
    plan::{FrontendKey, MapState, Op, diff},
};
use crate::{
    Error,
    tables::{BackendEntry, ServiceEntry, ServiceTables},
};

/// A backend's identity (its id's key): where it is, not its flags.
pub type BackendId = (SocketAddrV4, u8);

/// One service port as wanted, without ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantService {
    pub flags: u16,
    pub affinity_timeout_s: u32,
    /// In slot order.
    pub backends: Vec<BackendEntry>,
    /// externalTrafficPolicy=Local: every endpoint of the cluster, in slot order, for the node's
    /// own processes and pods. Empty otherwise.
    pub cluster_backends: Vec<BackendEntry>,
    /// Kept in the backend table without slots: tracked flows to them go on, new ones do not
    /// come (terminating endpoints).
    pub draining: Vec<BackendEntry>,
}

/// Everything the service maps should hold, without ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Want {
    pub node_addrs: BTreeSet<Ipv4Addr>,
    pub services: BTreeMap<FrontendKey, WantService>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Map writes done.
    pub writes: usize,
    /// Writes that failed, and services left out (ids exhausted); each names what it is about.
    pub errors: Vec<String>,
}

pub struct Syncer {
    tables: ServiceTables,
    backend_ids: Ids<BackendId>,
    service_ids: Ids<FrontendKey>,
    /// What the maps hold, as far as we know; re-read on `resync`.
    current: MapState,
}

impl Syncer {
    /// Takes over the maps, adopting their content and ids.
    pub fn adopt(tables: ServiceTables) -> Result<Self, Error> {
        let mut syncer = Self {
            tables,
            backend_ids: Ids::new(capacity::BACKENDS - 1),
            service_ids: Ids::new(capacity::SERVICES - 1),
            current: MapState::default(),
        };
        syncer.reload()?;
        Ok(syncer)
    }

    /// Re-reads the maps (repairing any drift at the next sync) and re-adopts their ids.
    fn reload(&mut self) -> Result<(), Error> {
        let current = read_maps(&self.tables)?;
        let mut backend_ids = Ids::new(capacity::BACKENDS - 1);
        // Entries that conflict (two ids for one backend) are left for the diff to remove.
        backend_ids.adopt(
            current
                .backends
                .iter()
                .map(|(id, b)| ((b.addr, b.proto), *id)),
        );
        let mut service_ids = Ids::new(capacity::SERVICES - 1);
        service_ids.adopt(current.services.iter().map(|(k, s)| (*k, s.svc_id)));
        self.backend_ids = backend_ids;
        self.service_ids = service_ids;
        self.current = current;
        Ok(())
    }

    pub fn tables(&self) -> &ServiceTables {
        &self.tables
    }

    pub fn tables_mut(&mut self) -> &mut ServiceTables {
        &mut self.tables
    }

    pub fn current(&self) -> &MapState {
        &self.current
    }

    /// Gives `want` ids: existing keys keep theirs, ids of keys no longer wanted are freed.
    fn resolve(&mut self, want: &Want, errors: &mut Vec<String>) -> MapState {
        let wanted_backends: BTreeSet<BackendId> = want
            .services
            .values()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .chain(&s.cluster_backends)
                    .chain(&s.draining)
            })
            .map(|b| (b.addr, b.proto))
            .collect();
        self.backend_ids.retain(&wanted_backends);
        self.service_ids
            .retain(&want.services.keys().copied().collect());
        let mut out = MapState {
            node_addrs: want.node_addrs.clone(),
            ..MapState::default()
        };
        for (key, svc) in &want.services {
            let Some(svc_id) = self.service_ids.acquire(key) else {
                errors.push(format!(
                    "service port {}/{}: no free service id",
                    key.0, key.1
                ));
                continue;
            };
            for b in &svc.draining {
                match self.backend_ids.acquire(&(b.addr, b.proto)) {
                    Some(id) => {
                        out.backends.entry(id).or_insert(*b);
                    }
                    None => errors.push(format!("backend {}: no free backend id", b.addr)),
                }
            }
            let mut slot_ids = |backends: &[BackendEntry]| {
                let mut ids = Vec::with_capacity(backends.len());
                for b in backends {
                    match self.backend_ids.acquire(&(b.addr, b.proto)) {
                        Some(id) => {
                            out.backends.insert(id, *b);
                            ids.push(id);
                        }
                        None => errors.push(format!("backend {}: no free backend id", b.addr)),
                    }
                }
                ids
            };
            let backends = slot_ids(&svc.backends);
            let cluster_backends = slot_ids(&svc.cluster_backends);
            out.services.insert(
                *key,
                ServiceEntry {
                    node_port: key.0,
                    proto: key.1,
                    svc_id,
                    flags: svc.flags,
                    affinity_timeout_s: svc.affinity_timeout_s,
                    backends,
                    cluster_backends,
                },
            );
        }
        out
    }

    /// Makes the maps hold `want`. A failed write is reported and the maps are re-read, so the
    /// next sync retries exactly what is still missing.
    pub fn sync(&mut self, want: &Want) -> SyncReport {
        let mut report = SyncReport::default();
        let desired = self.resolve(want, &mut report.errors);
        let ops = diff(&self.current, &desired);
        let mut failed = false;
        for op in &ops {
            if let Err(e) = self.apply(op) {
                report.errors.push(format!("{op:?}: {e}"));
                failed = true;
            } else {
                report.writes += 1;
            }
        }
        if failed {
            if let Err(e) = self.reload() {
                report.errors.push(format!("re-reading the maps: {e}"));
            }
        } else {
            self.current = desired;
        }
        report
    }

    /// Re-reads the maps and syncs: repairs any drift (someone else's writes, a failed write).
    pub fn resync(&mut self, want: &Want) -> SyncReport {
        if let Err(e) = self.reload() {
            return SyncReport {
                writes: 0,
                errors: vec![format!("re-reading the maps: {e}")],
            };
        }
        self.sync(want)
    }

    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        let t = &mut self.tables;
        match op {
            Op::PutBackend(id, b) => t.put_backend(*id, *b),
            Op::PutService(s) => t.put_service(s),
            Op::PurgeAffinity { svc_id, keep } => t.purge_affinity(*svc_id, keep).map(|_| ()),
            Op::RemoveService((port, proto)) => t.remove_service(*port, *proto),
            Op::RemoveBackend(id) => t.remove_backend(*id),
            Op::SetNodeAddrs(addrs) => t.set_node_addrs(addrs),
        }
    }
}

/// The service maps' content as a `MapState`.
pub fn read_maps(t: &ServiceTables) -> Result<MapState, Error> {
    Ok(MapState {
        node_addrs: t.node_addrs()?.into_iter().collect(),
        backends: t.backends()?.into_iter().collect(),
        services: t
            .services()?
            .into_iter()
            .map(|s| ((s.node_port, s.proto), s))
            .collect(),
    })
}
