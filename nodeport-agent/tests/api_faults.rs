//! API faults (docs/RELIABILITY.md, "API faults"): the real agent (`nodeport-agent run
//! --kubeconfig`, so `run::run` with the Kubernetes source) in a node namespace, its dataplane
//! attached to eth0 and serving real TCP connections to pods, follows a fake API server
//! (tests/support/fake_api.rs) that drops watch connections mid-stream, answers 410 Gone on
//! watches and lists, 500s, answers slowly, and sends only bookmarks. During each fault a change
//! is made (the Service "web" moves from one pod to the other); throughout, the maps hold the last
//! known state (or, where the change can get through, the new one: never anything else), a kept
//! connection to another Service keeps answering, and new connections reach the pod of the state
//! in the maps. After the fault the change converges; how long that took is printed.
//!
//! Also prints the Kubernetes path's change-to-map latency without faults
//! (`NODEPORT_KUBE_UPDATES` changes, 20 by default).
//!
//! Short form (the test command): one round of every fault, 3 s each. Long form:
//! `NODEPORT_FAULT_ROUNDS=10 NODEPORT_FAULT_SECONDS=10 cargo test -p nodeport-agent --test
//! api_faults -- --nocapture`.
mod support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::{
    agent::{Agent, Pins, wait_for},
    fake_api::{Fake, Faults, Res, ServerInNetns, kubeconfig},
    netns::{NODE, Topology, ask, require_root},
};

const PREFIX: &str = "npaf";
const POD1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const WEB: u16 = 30080;
const OTHER: u16 = 30081;

fn svc(name: &str, node_port: u16) -> Value {
    json!({"metadata": {"namespace": "default", "name": name,
                        "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                               "protocol": "TCP", "nodePort": node_port}]}})
}

fn slice(service: &str, pod: Ipv4Addr) -> Value {
    json!({"metadata": {"namespace": "default", "name": format!("{service}-abc12"),
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "endpoints": [{"addresses": [pod.to_string()], "nodeName": "node-a",
                          "conditions": {"ready": true}}],
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn node() -> Value {
    json!({"metadata": {"name": "node-a"},
           "status": {"addresses": [{"type": "InternalIP", "address": NODE.to_string()}]}})
}

fn state(web: Ipv4Addr) -> BTreeMap<u16, Vec<SocketAddrV4>> {
    BTreeMap::from([
        (WEB, vec![SocketAddrV4::new(web, 8080)]),
        (OTHER, vec![SocketAddrV4::new(POD2, 8080)]),
    ])
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One fault: how it starts (given the fake), the faults in force meanwhile, and whether the
/// change made during it can get through before it ends.
struct Fault {
    name: &'static str,
    start: fn(&Fake),
    faults: Faults,
    change_can_pass: bool,
    /// Bookmarks sent every 300 ms while it lasts.
    bookmarks: bool,
}

fn faults() -> Vec<Fault> {
    vec![
        Fault {
            name: "watch connections dropped mid-event",
            start: |f| Res::ALL.into_iter().for_each(|r| f.drop_watches(r)),
            faults: Faults::default(),
            change_can_pass: true,
            bookmarks: false,
        },
        Fault {
            name: "410 Gone on watches, then on lists",
            start: |f| Res::ALL.into_iter().for_each(|r| f.expire(r)),
            faults: Faults {
                gone_on_list: true,
                ..Faults::default()
            },
            change_can_pass: false,
            bookmarks: false,
        },
        Fault {
            name: "500 on every request (watches dropped)",
            start: |f| Res::ALL.into_iter().for_each(|r| f.drop_watches(r)),
            faults: Faults {
                status: Some(500),
                ..Faults::default()
            },
            change_can_pass: false,
            bookmarks: false,
        },
        Fault {
            name: "every response 2 s late (watches dropped)",
            start: |f| Res::ALL.into_iter().for_each(|r| f.drop_watches(r)),
            faults: Faults {
                delay: Duration::from_secs(2),
                ..Faults::default()
            },
            change_can_pass: true,
            bookmarks: false,
        },
        Fault {
            name: "bookmarks only (events held back)",
            start: |_| {},
            faults: Faults {
                bookmarks_only: true,
                ..Faults::default()
            },
            change_can_pass: false,
            bookmarks: true,
        },
    ]
}

#[test]
fn dataplane_keeps_the_last_known_state_through_api_faults_and_converges_after() {
    require_root();
    let rounds = env_or("NODEPORT_FAULT_ROUNDS", 1);
    let fault_time = Duration::from_secs(env_or("NODEPORT_FAULT_SECONDS", 3));
    let net = Topology::new(PREFIX, &[POD1, POD2]);
    let pins = Pins::new(PREFIX);

    let fake = Fake::default();
    fake.put(Res::Nodes, node());
    fake.put(Res::Services, svc("web", WEB));
    fake.put(Res::Services, svc("other", OTHER));
    fake.put(Res::EndpointSlices, slice("web", POD1));
    fake.put(Res::EndpointSlices, slice("other", POD2));
    let server = ServerInNetns::start(&fake, &net.node.path());
    let config = pins.work.join("kubeconfig");
    std::fs::write(&config, kubeconfig(server.port)).unwrap();
    let log = pins.work.join("agent.log");
    let mut agent = Agent::start(
        &net.node,
        &["--kubeconfig", config.to_str().unwrap()],
        &pins.root,
        &log,
    );

    let first = wait_for("the first sync", &agent, Duration::from_secs(30), || {
        pins.services() == state(POD1)
    });
    println!("first sync from the fake API server: {first:?}");
    let mut kept = net.connect(OTHER).expect("connecting to the other service");
    assert_eq!(ask(&mut kept).unwrap(), POD2.to_string());
    let web_answers = |want: Ipv4Addr| {
        let mut c = net.connect(WEB).expect("a new connection to web");
        assert_eq!(ask(&mut c).unwrap(), want.to_string(), "web answered by");
    };
    web_answers(POD1);

    // Baseline: a change without any fault.
    let mut current = POD1;
    let flip = |current: &mut Ipv4Addr| {
        *current = if *current == POD1 { POD2 } else { POD1 };
        fake.put(Res::EndpointSlices, slice("web", *current));
    };
    let t = Instant::now();
    flip(&mut current);
    wait_for(
        "the baseline change",
        &agent,
        Duration::from_secs(10),
        || pins.services() == state(current),
    );
    let mut figures = vec![("no fault".to_owned(), 0, t.elapsed(), Duration::ZERO)];
    web_answers(current);

    // The Kubernetes path's change-to-map latency without faults, for docs/BENCHMARKS.md beside
    // the manifests path's (which polls its directory).
    let samples = env_or("NODEPORT_KUBE_UPDATES", 20);
    let mut latencies: Vec<Duration> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            flip(&mut current);
            while pins.services() != state(current) {
                assert!(t.elapsed() < Duration::from_secs(10), "{}", agent.log());
                std::thread::sleep(Duration::from_millis(1));
            }
            let took = t.elapsed();
            // Past the agent's debounce window (--min-sync-period-ms 50), so each change is
            // its own sync.
            std::thread::sleep(Duration::from_millis(100));
            took
        })
        .collect();
    latencies.sort();
    let rank = |p: usize| latencies[(p * latencies.len()).div_ceil(100).max(1) - 1];
    println!(
        "Kubernetes source, endpoint change to maps over {samples} changes (--min-sync-period-ms 50): p50 {:?}, p99 {:?}, max {:?}",
        rank(50),
        rank(99),
        latencies.last().unwrap()
    );

    for round in 1..=rounds {
        for fault in faults() {
            let before = current;
            let requests_before = fake.requests().len();
            (fault.start)(&fake);
            fake.set_faults(fault.faults.clone());
            let changed_at = Instant::now();
            flip(&mut current);
            let (mut checks, mut passed_during) = (0, None);
            let mut next_check = Instant::now();
            while changed_at.elapsed() < fault_time {
                let maps = pins.services();
                if maps != state(before) {
                    assert!(
                        fault.change_can_pass && maps == state(current),
                        "{}: the maps left the last known state: {maps:?}; agent log:\n{}",
                        fault.name,
                        agent.log()
                    );
                    passed_during.get_or_insert(changed_at.elapsed());
                }
                if Instant::now() >= next_check {
                    if fault.bookmarks {
                        for res in Res::ALL {
                            fake.bookmark(res);
                        }
                    }
                    assert_eq!(
                        ask(&mut kept).expect("the kept connection broke"),
                        POD2.to_string()
                    );
                    web_answers(if passed_during.is_some() {
                        current
                    } else {
                        before
                    });
                    assert!(agent.alive(), "the agent exited:\n{}", agent.log());
                    checks += 1;
                    next_check += Duration::from_millis(300);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let requests = fake.requests().len() - requests_before;
            fake.set_faults(Faults::default());
            let ended = Instant::now();
            wait_for(
                &format!("convergence after: {}", fault.name),
                &agent,
                Duration::from_secs(90),
                || pins.services() == state(current),
            );
            let (total, after) = match passed_during {
                Some(t) => (t, Duration::ZERO),
                None => (changed_at.elapsed(), ended.elapsed()),
            };
            web_answers(current);
            println!(
                "round {round}: {}: {requests} API requests and {checks} connection checks during the fault ({fault_time:?}); the change in the maps {total:?} after it was made, {after:?} after the fault ended",
                fault.name,
            );
            figures.push((fault.name.to_owned(), round, total, after));
            assert!(
                requests > 0 || fault.bookmarks,
                "{}: the agent made no request during the fault",
                fault.name
            );
        }
    }

    println!("\n| fault | round | change to maps | fault end to maps (0: during the fault) |");
    println!("|-------|------:|---------------:|------------------:|");
    for (name, round, total, after) in &figures {
        println!(
            "| {name} | {round} | {:.2} s | {:.2} s |",
            total.as_secs_f64(),
            after.as_secs_f64()
        );
    }
    let log = agent.log();
    assert!(
        log.contains("410 Gone") || log.contains("listing again"),
        "{log}"
    );
    assert!(log.contains("serving the last known state"), "{log}");
    drop(agent);
    drop(server);
}
