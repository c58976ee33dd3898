//! The syncer against real pinned maps: it writes what is wanted, a second syncer adopting the
//! same maps (an agent restart) keeps every id and needs no write, and changes cost only the
//! writes they need.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use nodeport_agent::{
    Dataplane,
    sync::{
        Syncer,
        apply::{Want, WantService, read_maps},
    },
    tables::{BackendEntry, ServiceTables},
};
use nodeport_common::{BACKEND_LOCAL, FRONTEND_ETP_LOCAL, IPPROTO_TCP, IPPROTO_UDP};
use nodeport_tests::pins::TestPins;

fn be(last: u8, port: u16, proto: u8, local: bool) -> BackendEntry {
    BackendEntry {
        addr: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, last), port),
        proto,
        flags: if local { BACKEND_LOCAL } else { 0 },
    }
}

fn want(services: &[(u16, u8, u16, Vec<BackendEntry>)]) -> Want {
    Want {
        node_addrs: BTreeSet::from([Ipv4Addr::new(198, 18, 0, 2)]),
        services: services
            .iter()
            .map(|(port, proto, flags, backends)| {
                (
                    (*port, *proto),
                    WantService {
                        flags: *flags,
                        affinity_timeout_s: 0,
                        backends: backends.clone(),
                        cluster_backends: Vec::new(),
                        draining: Vec::new(),
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
    }
}

#[test]
fn sync_writes_adoption_keeps_ids_and_changes_are_minimal() {
    let pins = TestPins::new();
    let _dp = Dataplane::load(pins.layout()).expect("load");
    let open = || ServiceTables::open(&pins.layout().dir()).expect("open maps");

    let shared = be(10, 8080, IPPROTO_TCP, true);
    let w = want(&[
        (
            30080,
            IPPROTO_TCP,
            0,
            vec![shared, be(11, 8080, IPPROTO_TCP, false)],
        ),
        (30081, IPPROTO_TCP, FRONTEND_ETP_LOCAL, vec![shared]),
        (30053, IPPROTO_UDP, 0, vec![be(10, 53, IPPROTO_UDP, true)]),
    ]);
    let mut s = Syncer::adopt(open()).unwrap();
    let r = s.sync(&w);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // 3 distinct backends (the shared one once), 3 services, the address set.
    assert_eq!(r.writes, 7);
    let maps = read_maps(&open()).unwrap();
    assert_eq!(maps.backends.len(), 3);
    assert_eq!(maps.services.len(), 3);
    let svc = &maps.services[&(30081, IPPROTO_TCP)];
    assert_eq!(svc.flags, FRONTEND_ETP_LOCAL);
    assert_eq!(maps.backends[&svc.backends[0]], shared);
    assert!(maps.backends.keys().all(|id| *id != 0), "id 0 is reserved");

    // A restarted agent adopts the maps: nothing to write, same ids.
    drop(s);
    let mut restarted = Syncer::adopt(open()).unwrap();
    let r = restarted.sync(&w);
    assert_eq!((r.writes, r.errors.len()), (0, 0));
    assert_eq!(read_maps(&open()).unwrap(), maps);

    // Drop one backend from one service: one service write and one backend removal; the
    // shared backend keeps its id.
    let w2 = want(&[
        (30080, IPPROTO_TCP, 0, vec![shared]),
        (30081, IPPROTO_TCP, FRONTEND_ETP_LOCAL, vec![shared]),
        (30053, IPPROTO_UDP, 0, vec![be(10, 53, IPPROTO_UDP, true)]),
    ]);
    let r = restarted.sync(&w2);
    assert_eq!((r.writes, r.errors.len()), (2, 0), "{:?}", r.errors);
    let after = read_maps(&open()).unwrap();
    assert_eq!(after.backends.len(), 2);
    assert_eq!(
        after.services[&(30081, IPPROTO_TCP)],
        maps.services[&(30081, IPPROTO_TCP)]
    );

    // Drift (someone deleted a service behind our back) is repaired by a resync.
    open().remove_service(30053, IPPROTO_UDP).unwrap();
    let r = restarted.resync(&w2);
    assert_eq!((r.writes, r.errors.len()), (1, 0));
    assert_eq!(read_maps(&open()).unwrap(), after);

    // Everything gone: services removed before their backends, addresses last.
    let r = restarted.sync(&Want::default());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let empty = read_maps(&open()).unwrap();
    assert!(empty.services.is_empty() && empty.backends.is_empty() && empty.node_addrs.is_empty());
    drop(_dp);
    let _ = nodeport_agent::unload(pins.layout(), false);
}

#[test]
fn replacing_every_service_at_once_keeps_the_new_services_slots() {
    // The lab found this: the new services take the ids the old ones free in the same sync, and
    // removing an old frontend deletes the slots of its id.
    let pins = TestPins::new();
    let _dp = Dataplane::load(pins.layout()).expect("load");
    let open = || ServiceTables::open(&pins.layout().dir()).expect("open maps");
    let mut s = Syncer::adopt(open()).unwrap();
    let four = |port| {
        (1..=4)
            .map(|i| be(10 + i, port, IPPROTO_TCP, false))
            .collect()
    };
    let r = s.sync(&want(&[
        (30080, IPPROTO_TCP, 0, four(8080)),
        (30081, IPPROTO_TCP, 0, four(8081)),
    ]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let replaced = want(&[
        (30090, IPPROTO_TCP, 0, four(9090)),
        (30091, IPPROTO_TCP, 0, four(9091)),
    ]);
    let r = s.sync(&replaced);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let maps = read_maps(&open()).expect("every frontend's slots are readable");
    assert_eq!(
        maps.services.keys().copied().collect::<Vec<_>>(),
        [(30090, IPPROTO_TCP), (30091, IPPROTO_TCP)]
    );
    for svc in maps.services.values() {
        let ports: BTreeSet<u16> = svc
            .backends
            .iter()
            .map(|id| maps.backends[id].addr.port())
            .collect();
        assert_eq!(svc.backends.len(), 4, "{svc:?}");
        assert_eq!(ports.len(), 1, "{svc:?}");
    }
    // What was written is what a restarted agent reads back: nothing to repair.
    let mut restarted = Syncer::adopt(open()).unwrap();
    let r = restarted.resync(&replaced);
    assert_eq!((r.writes, r.errors.len()), (0, 0), "{:?}", r.errors);
}
