//! The map state as plain data, and the ordered writes that turn one state into another.
//!
//! Order (a packet reads frontend -> slot -> backend; see `tables`): new and changed backends
//! first, then removed services, then new and changed services (each written slots-before-count
//! by `ServiceTables::put_service`), then stale affinity, removed backends, and the node address
//! set last. Removed services go before the others because a service id freed in this sync may
//! be given to a new service at once: removing the old frontend deletes the slots of its id, which
//! by then must not already hold the new service's.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use nodeport_common::FRONTEND_AFFINITY;

use crate::tables::{BackendEntry, ServiceEntry};

/// Frontend identity: (nodePort, protocol).
pub type FrontendKey = (u16, u8);

/// What the service maps hold (or should hold), ids included.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub node_addrs: BTreeSet<Ipv4Addr>,
    pub backends: BTreeMap<u32, BackendEntry>,
    pub services: BTreeMap<FrontendKey, ServiceEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, BackendEntry),
    PutService(ServiceEntry),
    /// Forget ClientIP affinity of `svc_id` to backends other than `keep`.
    PurgeAffinity {
        svc_id: u32,
        keep: Vec<u32>,
    },
    RemoveService(FrontendKey),
    RemoveBackend(u32),
    SetNodeAddrs(Vec<Ipv4Addr>),
}

/// The writes that take the maps from `current` to `desired`, in a safe order. Empty when they
/// already agree.
pub fn diff(current: &MapState, desired: &MapState) -> Vec<Op> {
    let mut ops = Vec::new();
    for (id, b) in &desired.backends {
        if current.backends.get(id) != Some(b) {
            ops.push(Op::PutBackend(*id, *b));
        }
    }
    for key in current.services.keys() {
        if !desired.services.contains_key(key) {
            ops.push(Op::RemoveService(*key));
        }
    }
    for (key, svc) in &desired.services {
        let old = current.services.get(key).filter(|o| o.svc_id == svc.svc_id);
        if current.services.get(key) != Some(svc) {
            ops.push(Op::PutService(svc.clone()));
        }
        // Affinity entries may name either slot set's backends (the socket programs balance an
        // externalTrafficPolicy=Local service's own-node clients over its cluster set).
        let keep: Vec<u32> = svc
            .backends
            .iter()
            .chain(&svc.cluster_backends)
            .copied()
            .collect();
        // Purge when backends left; and for a service new to its id, whose id may have served
        // another service with affinity entries of its own until this sync.
        let stale = match old {
            Some(old) => old
                .backends
                .iter()
                .chain(&old.cluster_backends)
                .any(|b| !keep.contains(b)),
            None => true,
        };
        if svc.flags & FRONTEND_AFFINITY != 0 && stale {
            ops.push(Op::PurgeAffinity {
                svc_id: svc.svc_id,
                keep,
            });
        }
    }
    for id in current.backends.keys() {
        if !desired.backends.contains_key(id) {
            ops.push(Op::RemoveBackend(*id));
        }
    }
    if current.node_addrs != desired.node_addrs {
        ops.push(Op::SetNodeAddrs(
            desired.node_addrs.iter().copied().collect(),
        ));
    }
    ops
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use nodeport_common::{BACKEND_LOCAL, IPPROTO_TCP};

    use super::*;

    fn backend(last: u8, local: bool) -> BackendEntry {
        BackendEntry {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, last), 8080),
            proto: IPPROTO_TCP,
            flags: if local { BACKEND_LOCAL } else { 0 },
        }
    }

    fn service(node_port: u16, svc_id: u32, flags: u16, backends: &[u32]) -> ServiceEntry {
        ServiceEntry {
            node_port,
            proto: IPPROTO_TCP,
            svc_id,
            flags,
            affinity_timeout_s: 0,
            backends: backends.to_vec(),
            cluster_backends: Vec::new(),
        }
    }

    fn state(backends: &[(u32, u8)], services: &[ServiceEntry], addrs: &[[u8; 4]]) -> MapState {
        MapState {
            node_addrs: addrs.iter().map(|a| Ipv4Addr::from(*a)).collect(),
            backends: backends
                .iter()
                .map(|(id, last)| (*id, backend(*last, false)))
                .collect(),
            services: services
                .iter()
                .map(|s| ((s.node_port, s.proto), s.clone()))
                .collect(),
        }
    }

    #[test]
    fn equal_states_need_no_writes() {
        let s = state(
            &[(1, 10)],
            &[service(30080, 1, 0, &[1])],
            &[[198, 18, 0, 2]],
        );
        assert!(diff(&s, &s).is_empty());
    }

    #[test]
    fn backends_come_before_services_and_removals_after() {
        let current = state(
            &[(1, 10), (2, 11)],
            &[service(30080, 1, 0, &[1, 2]), service(30090, 2, 0, &[2])],
            &[],
        );
        let desired = state(
            &[(1, 10), (3, 12)],
            &[service(30080, 1, 0, &[1, 3])],
            &[[198, 18, 0, 2]],
        );
        assert_eq!(
            diff(&current, &desired),
            [
                Op::PutBackend(3, backend(12, false)),
                Op::RemoveService((30090, IPPROTO_TCP)),
                Op::PutService(service(30080, 1, 0, &[1, 3])),
                Op::RemoveBackend(2),
                Op::SetNodeAddrs(vec![Ipv4Addr::new(198, 18, 0, 2)]),
            ]
        );
    }

    #[test]
    fn affinity_is_purged_only_when_an_affine_service_loses_backends() {
        let current = state(
            &[(1, 10), (2, 11)],
            &[service(30080, 1, FRONTEND_AFFINITY, &[1, 2])],
            &[],
        );
        let grown = state(
            &[(1, 10), (2, 11), (3, 12)],
            &[service(30080, 1, FRONTEND_AFFINITY, &[1, 2, 3])],
            &[],
        );
        assert!(
            !diff(&current, &grown)
                .iter()
                .any(|o| matches!(o, Op::PurgeAffinity { .. }))
        );
        let shrunk = state(
            &[(1, 10)],
            &[service(30080, 1, FRONTEND_AFFINITY, &[1])],
            &[],
        );
        assert!(diff(&current, &shrunk).contains(&Op::PurgeAffinity {
            svc_id: 1,
            keep: vec![1]
        }));
    }

    #[test]
    fn a_removed_service_goes_before_a_new_one_that_takes_its_id() {
        // Every service replaced at once: the new one gets the freed id 1. Removing the old
        // frontend deletes the slots of id 1, so it must happen before the new slots are written.
        let current = state(
            &[(1, 10), (2, 11)],
            &[service(30080, 1, FRONTEND_AFFINITY, &[1, 2])],
            &[],
        );
        let desired = state(
            &[(3, 12)],
            &[service(30081, 1, FRONTEND_AFFINITY, &[3])],
            &[],
        );
        assert_eq!(
            diff(&current, &desired),
            [
                Op::PutBackend(3, backend(12, false)),
                Op::RemoveService((30080, IPPROTO_TCP)),
                Op::PutService(service(30081, 1, FRONTEND_AFFINITY, &[3])),
                // Clients the old service's affinity sent to backends 1 and 2 are forgotten.
                Op::PurgeAffinity {
                    svc_id: 1,
                    keep: vec![3]
                },
                Op::RemoveBackend(1),
                Op::RemoveBackend(2),
            ]
        );
    }

    #[test]
    fn a_changed_backend_is_rewritten_in_place() {
        let current = state(&[(1, 10)], &[], &[]);
        let mut desired = current.clone();
        desired.backends.insert(1, backend(10, true));
        assert_eq!(
            diff(&current, &desired),
            [Op::PutBackend(1, backend(10, true))]
        );
    }
}
