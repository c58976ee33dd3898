//! Hostile manifests and objects (docs/RELIABILITY.md, "Hostile manifests and objects"): the real
//! agent in a node namespace, fed through the manifests source and through the Kubernetes source
//! (a fake API server, tests/support/fake_api.rs) with a file that does not parse, objects with
//! fields of the wrong type or missing, a Service with 5,000 ports, an EndpointSlice with 10,000
//! endpoints, two Services on one nodePort, a nodePort outside --service-node-port-range, an IPv6
//! endpoint in an IPv4 slice and a Node with IPv6 addresses. Each bad thing is logged naming the
//! object (or file) and what is wrong; every other service is in the maps and answers real TCP
//! connections; the huge objects are taken in bounded time.
mod support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use nodeport_agent::{PinLayout, tables::ServiceTables};
use serde_json::{Value, json};
use support::{
    agent::{Agent, Pins, wait_for},
    fake_api::{Fake, Res, ServerInNetns, kubeconfig},
    netns::{NODE, Topology, ask, require_root},
};

const POD1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const GOOD: u16 = 30080;
const DUP: u16 = 30085;
const HUGE_ENDPOINTS: u16 = 30086;
const MIXED_FAMILY: u16 = 30087;
const REPAIRED: u16 = 30088;
/// The 5,000-port Service: 2,500 nodePorts from here, each on TCP and UDP.
const HUGE_PORTS_FIRST: u16 = 30100;
const HUGE_PORTS: usize = 5000;
const HUGE_ENDPOINT_COUNT: u32 = 10_000;

// ---- objects ----

fn meta(name: &str, created: &str) -> Value {
    json!({"namespace": "default", "name": name, "creationTimestamp": created})
}

fn svc(name: &str, node_port: u16, created: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(name, created),
           "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                               "protocol": "TCP", "nodePort": node_port}]}})
}

fn slice(name: &str, service: &str, addresses: &[String]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "nodeName": "node-a", "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"namespace": "default", "name": name,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn node() -> Value {
    // Dual stack: the IPv6 address is not served by this IPv4 dataplane, and not an error.
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
           "status": {"addresses": [{"type": "InternalIP", "address": NODE.to_string()},
                                    {"type": "InternalIP", "address": "fd00::2"}]}})
}

fn huge_ports() -> Value {
    let ports: Vec<Value> = (0..HUGE_PORTS)
        .map(|i| {
            let (node_port, proto) = (
                HUGE_PORTS_FIRST + (i / 2) as u16,
                if i % 2 == 0 { "TCP" } else { "UDP" },
            );
            json!({"name": format!("p{i}"), "port": 1000 + i, "targetPort": 8080,
                   "protocol": proto, "nodePort": node_port})
        })
        .collect();
    let mut s = svc("huge-ports", 0, "2026-01-01T00:00:00Z");
    s["spec"]["ports"] = json!(ports);
    s
}

fn huge_endpoints() -> Value {
    let base = u32::from(Ipv4Addr::new(10, 100, 0, 1));
    let addresses: Vec<String> = (0..HUGE_ENDPOINT_COUNT)
        .map(|i| Ipv4Addr::from(base + i).to_string())
        .collect();
    slice("huge-endpoints-1", "huge-endpoints", &addresses)
}

/// Everything valid (or valid to the decoder: the semantics reject some), shared by both sources.
fn objects() -> Vec<Value> {
    vec![
        node(),
        svc("good", GOOD, "2026-01-01T00:00:00Z"),
        slice("good-1", "good", &[POD1.to_string()]),
        // Two Services on one nodePort: the older keeps it (the apiserver's allocator would have
        // refused the younger one).
        svc("dup-a", DUP, "2026-01-01T00:00:00Z"),
        slice("dup-a-1", "dup-a", &[POD2.to_string()]),
        svc("dup-b", DUP, "2026-01-02T00:00:00Z"),
        slice("dup-b-1", "dup-b", &[POD1.to_string()]),
        svc("out-of-range", 40000, "2026-01-01T00:00:00Z"),
        svc("mixed-family", MIXED_FAMILY, "2026-01-01T00:00:00Z"),
        slice(
            "mixed-family-1",
            "mixed-family",
            &["fd00::10".to_owned(), POD2.to_string()],
        ),
        huge_ports(),
        svc("huge-endpoints", HUGE_ENDPOINTS, "2026-01-01T00:00:00Z"),
        huge_endpoints(),
    ]
}

// ---- what the maps hold ----

/// (nodePort, protocol) → backends.
fn frontends(pins: &Pins) -> BTreeMap<(u16, u8), Vec<SocketAddrV4>> {
    let Ok(t) = ServiceTables::open(&PinLayout::new(&pins.root).dir()) else {
        return BTreeMap::new();
    };
    let backends: BTreeMap<u32, SocketAddrV4> = t
        .backends()
        .unwrap_or_default()
        .into_iter()
        .map(|(id, b)| (id, b.addr))
        .collect();
    t.services()
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            let mut addrs: Vec<SocketAddrV4> = s
                .backends
                .iter()
                .filter_map(|id| backends.get(id).copied())
                .collect();
            addrs.sort();
            ((s.node_port, s.proto), addrs)
        })
        .collect()
}

const TCP: u8 = 6;

fn pod(ip: Ipv4Addr) -> Vec<SocketAddrV4> {
    vec![SocketAddrV4::new(ip, 8080)]
}

/// Whether the maps hold every valid service as it should be, and nothing of the rejected ones.
fn all_good_served(maps: &BTreeMap<(u16, u8), Vec<SocketAddrV4>>) -> bool {
    let huge_ports = (0..HUGE_PORTS)
        .filter(|i| {
            let key = (
                HUGE_PORTS_FIRST + (i / 2) as u16,
                if i % 2 == 0 { 6 } else { 17 },
            );
            maps.contains_key(&key)
        })
        .count();
    maps.get(&(GOOD, TCP)) == Some(&pod(POD1))
        && maps.get(&(DUP, TCP)) == Some(&pod(POD2))
        && maps.get(&(MIXED_FAMILY, TCP)) == Some(&pod(POD2))
        && maps
            .get(&(HUGE_ENDPOINTS, TCP))
            .is_some_and(|b| b.len() == HUGE_ENDPOINT_COUNT as usize)
        && huge_ports == HUGE_PORTS
        && !maps.keys().any(|(p, _)| *p == 40000)
}

fn check_connections(net: &Topology) {
    for (port, want) in [(GOOD, POD1), (DUP, POD2), (MIXED_FAMILY, POD2)] {
        let mut c = net
            .connect(port)
            .unwrap_or_else(|e| panic!("connecting to nodePort {port}: {e}"));
        assert_eq!(ask(&mut c).unwrap(), want.to_string(), "nodePort {port}");
    }
}

/// Every line the agent must have logged, as substrings.
fn assert_logged(agent: &Agent, wanted: &[&str]) {
    wait_for(
        "the problems logged",
        agent,
        Duration::from_secs(20),
        || {
            let log = agent.log();
            wanted.iter().all(|w| log.contains(w))
        },
    );
    let log = agent.log();
    for w in wanted {
        let line = log.lines().find(|l| l.contains(w)).unwrap();
        println!("logged: {}", line.trim());
    }
}

fn yaml(v: &Value) -> String {
    format!("---\n{}", serde_yaml_ng::to_string(v).unwrap())
}

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[test]
fn hostile_manifests_are_reported_by_name_and_every_other_service_works() {
    require_root();
    let net = Topology::new("npho", &[POD1, POD2]);
    let pins = Pins::new("npho");
    let dir = pins.work.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let good: String = objects().iter().map(yaml).collect();
    write(&dir, "10-objects.yaml", &good);
    write(
        &dir,
        "20-malformed.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken\nspec: [\n",
    );
    write(
        &dir,
        "21-wrong-type.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: wrong-type, namespace: default}\nspec:\n  type: NodePort\n  ports:\n  - {port: 80, nodePort: thirty}\n",
    );
    write(
        &dir,
        "22-missing-fields.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: missing-port, namespace: default}\nspec:\n  type: NodePort\n  ports:\n  - {nodePort: 30090}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: no-address-type, namespace: default, labels: {kubernetes.io/service-name: good}}\nendpoints: []\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {namespace: default}\nspec: {type: NodePort}\n",
    );
    let bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();

    let started = Instant::now();
    let agent = Agent::start(
        &net.node,
        &["--manifests", dir.to_str().unwrap()],
        &pins.root,
        &pins.work.join("agent.log"),
    );
    let took = wait_for(
        "every valid service in the maps",
        &agent,
        Duration::from_secs(120),
        || all_good_served(&frontends(&pins)),
    );
    println!(
        "manifests ({} KiB): every valid service in the maps {:?} after the agent started ({:?} since)",
        bytes / 1024,
        took,
        started.elapsed()
    );
    check_connections(&net);
    assert_logged(
        &agent,
        &[
            "20-malformed.yaml, document 1 (from line 1)",
            "21-wrong-type.yaml, document 1 (from line 1): Service default/wrong-type: ",
            // Missing required fields decode as their defaults (k8s-openapi), then the semantics
            // reject them as the apiserver would.
            "Service default/missing-port problem=port 0/TCP: port 0 is not in 1-65535 (missing?)",
            "EndpointSlice default/no-address-type problem=no addressType; ignored",
            "Service without metadata.name",
            "Service default/dup-b problem=port \"http\" (80/TCP): nodePort 30085/TCP is already claimed by Service default/dup-a",
            "Service default/out-of-range problem=port \"http\" (80/TCP): nodePort 40000 is outside the nodePort range 30000-32767",
            "EndpointSlice default/mixed-family-1 problem=endpoint address \"fd00::10\" is IPv6 in an IPv4 slice",
        ],
    );
    assert!(
        !agent.log().contains("panicked"),
        "the agent panicked:\n{}",
        agent.log()
    );
    // The objects the semantics reject are counted by kind (files and objects that do not parse
    // never become objects: they are only logged).
    let metrics = net.node.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:10256").expect("metrics listener");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    });
    for line in [
        "nodeport_invalid_objects{kind=\"Service\"} 3",
        "nodeport_invalid_objects{kind=\"EndpointSlice\"} 2",
        "nodeport_invalid_objects{kind=\"Node\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }

    // Repairing the broken file serves it, and changes nothing else.
    let before = frontends(&pins);
    write(
        &dir,
        "20-malformed.yaml",
        &yaml(&svc("repaired", REPAIRED, "2026-01-01T00:00:00Z")),
    );
    wait_for(
        "the repaired service",
        &agent,
        Duration::from_secs(30),
        || frontends(&pins).contains_key(&(REPAIRED, TCP)),
    );
    let mut after = frontends(&pins);
    after.remove(&(REPAIRED, TCP));
    assert_eq!(after, before, "repairing one file changed other services");
    check_connections(&net);
    drop(agent);
}

#[test]
fn hostile_objects_from_the_api_are_reported_by_name_and_every_other_service_works() {
    require_root();
    let net = Topology::new("nphk", &[POD1, POD2]);
    let pins = Pins::new("nphk");
    let fake = Fake::default();
    for o in objects() {
        let res = match o["kind"].as_str().unwrap() {
            "Service" => Res::Services,
            "EndpointSlice" => Res::EndpointSlices,
            _ => Res::Nodes,
        };
        fake.put(res, o);
    }
    // A field of the wrong type (an API server newer than the agent's types could send one): in
    // the very first list, where it would fail the whole list without per-object decoding.
    let mut wrong = svc("wrong-type", 30089, "2026-01-01T00:00:00Z");
    wrong["spec"]["ports"][0]["port"] = json!("eighty");
    // Why the source decodes objects one by one: as a whole, the list does not decode.
    let list = json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": "1"},
                      "items": [svc("good", GOOD, "2026-01-01T00:00:00Z"), wrong.clone()]});
    assert!(
        serde_json::from_value::<kube::core::ObjectList<k8s_openapi::api::core::v1::Service>>(list)
            .is_err()
    );
    fake.put(Res::Services, wrong.clone());
    let server = ServerInNetns::start(&fake, &net.node.path());
    let config = pins.work.join("kubeconfig");
    std::fs::write(&config, kubeconfig(server.port)).unwrap();

    let started = Instant::now();
    let agent = Agent::start(
        &net.node,
        &["--kubeconfig", config.to_str().unwrap()],
        &pins.root,
        &pins.work.join("agent.log"),
    );
    let took = wait_for(
        "every valid service in the maps",
        &agent,
        Duration::from_secs(120),
        || all_good_served(&frontends(&pins)),
    );
    println!(
        "Kubernetes source: every valid service in the maps {took:?} after the agent started ({:?} since)",
        started.elapsed()
    );
    check_connections(&net);
    assert_logged(
        &agent,
        &[
            "object=default/wrong-type error=invalid type: string \"eighty\", expected i32",
            "Service default/dup-b problem=port \"http\" (80/TCP): nodePort 30085/TCP is already claimed by Service default/dup-a",
            "Service default/out-of-range problem=port \"http\" (80/TCP): nodePort 40000 is outside the nodePort range",
            "EndpointSlice default/mixed-family-1 problem=endpoint address \"fd00::10\" is IPv6 in an IPv4 slice",
        ],
    );

    // The good Service turns bad in a watch event: it is no longer served (as a re-list would
    // have it), the others are untouched; fixed, it is served again.
    let before = frontends(&pins);
    let mut bad_good = svc("good", GOOD, "2026-01-01T00:00:00Z");
    bad_good["spec"]["ports"][0]["nodePort"] = json!([30080]);
    fake.put(Res::Services, bad_good);
    wait_for(
        "the broken Service withdrawn",
        &agent,
        Duration::from_secs(20),
        || !frontends(&pins).contains_key(&(GOOD, TCP)),
    );
    let mut after = frontends(&pins);
    let mut expected = before.clone();
    expected.remove(&(GOOD, TCP));
    after.remove(&(GOOD, TCP));
    assert_eq!(after, expected, "one broken Service changed others");
    assert!(
        agent
            .log()
            .contains("object=default/good error=invalid type: sequence")
    );
    fake.put(Res::Services, svc("good", GOOD, "2026-01-01T00:00:00Z"));
    wait_for(
        "the fixed Service served",
        &agent,
        Duration::from_secs(20),
        || frontends(&pins) == before,
    );
    check_connections(&net);
    drop(agent);
    drop(server);
}
