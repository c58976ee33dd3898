//! Sequences of source events (what the kube-rs watchers and the manifests source emit) drive the
//! whole pipeline (cluster state -> kube-proxy semantics -> ids, diff, apply) into real pinned
//! maps: initial snapshots, an apply, a delete, and a re-list that omits an object.
use std::path::{Path, PathBuf};

use nodeport_agent::{
    Dataplane, PinLayout,
    model::{
        ClusterState, Kind, Resource, SourceEvent,
        desired::{SemanticsConfig, desired},
    },
    run::to_want,
    source::manifests::parse,
    sync::{Syncer, apply::read_maps},
    tables::ServiceTables,
};

fn objects(yaml: &str) -> Vec<Resource> {
    let (resources, problems) = parse(Path::new("test.yaml"), yaml);
    assert!(problems.is_empty(), "{problems:?}");
    resources
}

fn of_kind(all: &[Resource], kind: Kind) -> Vec<Resource> {
    all.iter().filter(|r| r.kind() == kind).cloned().collect()
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses:\n  - {type: InternalIP, address: 198.18.0.2}\n";

fn service(name: &str, node_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.{node_port_lo}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: {node_port}, protocol: TCP}}\n",
        node_port_lo = node_port % 200
    )
}

fn slice(service: &str, ips: &[(&str, &str)]) -> String {
    let eps: String = ips
        .iter()
        .map(|(ip, node)| {
            format!("- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{ready: true}}\n")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-x\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n{eps}"
    )
}

/// node port -> sorted backend addresses, as the maps hold them.
fn maps_view(t: &ServiceTables) -> Vec<(u16, Vec<String>)> {
    let state = read_maps(t).unwrap();
    state
        .services
        .values()
        .map(|s| {
            let mut b: Vec<String> = s
                .backends
                .iter()
                .map(|id| state.backends[id].addr.to_string())
                .collect();
            b.sort();
            (s.node_port, b)
        })
        .collect()
}

/// Applies `events` and syncs the maps; returns what they hold.
fn step(
    syncer: &mut Syncer,
    cfg: &SemanticsConfig,
    state: &mut ClusterState,
    events: Vec<SourceEvent>,
) -> Vec<(u16, Vec<String>)> {
    for e in events {
        state.apply(e);
    }
    assert!(
        state.synced(&Kind::ALL),
        "synced only after every kind's snapshot"
    );
    let report = syncer.sync(&to_want(&desired(state, cfg)));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    maps_view(syncer.tables())
}

#[test]
fn watcher_event_sequences_drive_the_maps() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "kernel test: run as root");
    let root = PathBuf::from(format!(
        "/sys/fs/bpf/nodeport-test-{}-events",
        std::process::id()
    ));
    let layout = PinLayout::new(&root);
    let _dp = Dataplane::load(&layout).expect("load");
    struct Unload(PinLayout);
    impl Drop for Unload {
        fn drop(&mut self) {
            let _ = nodeport_agent::unload(&self.0, false);
        }
    }
    let _unload = Unload(layout.clone());
    let mut syncer = Syncer::adopt(ServiceTables::open(&layout.dir()).unwrap()).unwrap();
    let cfg = SemanticsConfig::new("node-a");
    let mut state = ClusterState::default();

    // Initial lists: two services, one slice each.
    let all = objects(
        &[
            NODE.to_string(),
            service("web", 30080),
            service("api", 30090),
            slice(
                "web",
                &[("10.244.1.10", "node-a"), ("10.244.2.10", "node-b")],
            ),
            slice("api", &[("10.244.2.20", "node-b")]),
        ]
        .join("---\n"),
    );
    // Before every kind is listed, nothing may be written: the pipeline waits.
    state.apply(SourceEvent::Snapshot(
        Kind::Service,
        of_kind(&all, Kind::Service),
    ));
    assert!(!state.synced(&Kind::ALL));
    let view = step(
        &mut syncer,
        &cfg,
        &mut state,
        vec![
            SourceEvent::Snapshot(Kind::EndpointSlice, of_kind(&all, Kind::EndpointSlice)),
            SourceEvent::Snapshot(Kind::Node, of_kind(&all, Kind::Node)),
        ],
    );
    assert_eq!(
        view,
        [
            (
                30080,
                vec!["10.244.1.10:8080".into(), "10.244.2.10:8080".into()]
            ),
            (30090, vec!["10.244.2.20:8080".into()]),
        ]
    );
    assert_eq!(
        read_maps(syncer.tables())
            .unwrap()
            .node_addrs
            .into_iter()
            .collect::<Vec<_>>(),
        ["198.18.0.2".parse::<std::net::Ipv4Addr>().unwrap()]
    );

    // A web endpoint starts terminating: it leaves the slots, but its backend entry stays so
    // the connections it already serves go on (kube-proxy's conntrack does the same).
    let terminating = objects(&slice("web", &[("10.244.1.10", "node-a"), ("10.244.2.10", "node-b")]).replace(
        "- addresses: [\"10.244.2.10\"]\n  nodeName: node-b\n  conditions: {ready: true}",
        "- addresses: [\"10.244.2.10\"]\n  nodeName: node-b\n  conditions: {ready: false, serving: true, terminating: true}",
    ));
    let view = step(
        &mut syncer,
        &cfg,
        &mut state,
        vec![SourceEvent::Applied(terminating[0].clone())],
    );
    assert_eq!(view[0], (30080, vec!["10.244.1.10:8080".into()]));
    let kept: Vec<String> = read_maps(syncer.tables())
        .unwrap()
        .backends
        .values()
        .map(|b| b.addr.to_string())
        .collect();
    assert!(kept.contains(&"10.244.2.10:8080".to_string()), "{kept:?}");

    // An endpoint leaves web's slice (Applied).
    let changed = objects(&slice("web", &[("10.244.1.10", "node-a")]));
    let view = step(
        &mut syncer,
        &cfg,
        &mut state,
        vec![SourceEvent::Applied(changed[0].clone())],
    );
    assert_eq!(view[0], (30080, vec!["10.244.1.10:8080".into()]));

    // api's slice is deleted: the service stays, with no backends (its packets are dropped).
    let api_slice = of_kind(&all, Kind::EndpointSlice)
        .into_iter()
        .find(|r| r.key().name == "api-x")
        .unwrap();
    let view = step(
        &mut syncer,
        &cfg,
        &mut state,
        vec![SourceEvent::Deleted(api_slice)],
    );
    assert_eq!(view[1], (30090, vec![]));

    // A re-list (after a 410 Gone) that omits the api Service deletes it.
    let web_only: Vec<Resource> = of_kind(&all, Kind::Service)
        .into_iter()
        .filter(|r| r.key().name == "web")
        .collect();
    let view = step(
        &mut syncer,
        &cfg,
        &mut state,
        vec![SourceEvent::Snapshot(Kind::Service, web_only)],
    );
    assert_eq!(view, [(30080, vec!["10.244.1.10:8080".into()])]);
    // The backend no service uses any more is gone from the maps too.
    assert_eq!(read_maps(syncer.tables()).unwrap().backends.len(), 1);
}
