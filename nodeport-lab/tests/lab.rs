//! The lab end to end: real namespaces, real agents (one per node, reading the manifests the lab
//! writes), real pods, real TCP and UDP from the client namespace.
//!
//! Each test brings up its own lab with its own prefix (`nplt<pid>-<n>`, never the user's
//! `np-lab`) and tears it down in a Drop guard, also when it fails. They need root and fail
//! (never skip) without it. Labs of test processes that were killed are removed by the next run.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use nodeport_lab::{
    CLIENT_ADDR, Config, down, lab::http_get, lab::is_connect_failure, leftovers, report, workload,
};

mod support;
use support::{ECHO, TestLab, agent_binary, require_root, sweep_stale};

const PREFIX: &str = "nplt";

fn shipped_workloads() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lab/workloads")
}

fn config(workloads: PathBuf) -> Config {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let prefix = format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    Config::new(&prefix, workloads, agent_binary(), ECHO.into())
}

/// Brings up a lab on `workloads` (a directory) with its own prefix.
fn lab_on(workloads: PathBuf, work: PathBuf) -> TestLab {
    require_root();
    sweep_stale(PREFIX);
    let cfg = config(workloads);
    let started = Instant::now();
    let lab = match nodeport_lab::up(cfg.clone()) {
        Ok(lab) => lab,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            panic!("lab up: {e:#}");
        }
    };
    eprintln!("lab {} up in {:?}", cfg.prefix, started.elapsed());
    TestLab { lab, cfg, work }
}

/// Brings up a lab on the given workload YAML (written to a fresh directory).
fn lab_with(yaml: &str) -> TestLab {
    let work = std::env::temp_dir().join(format!(
        "nodeport-lab-test-{}-{}",
        std::process::id(),
        WORK.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("workload.yaml"), yaml).unwrap();
    lab_on(work.clone(), work)
}

static WORK: AtomicU32 = AtomicU32::new(0);

impl TestLab {
    /// Replaces the workload YAML and applies it.
    fn apply(&mut self, yaml: &str) -> nodeport_lab::ApplyReport {
        std::fs::write(self.work.join("workload.yaml"), yaml).unwrap();
        self.lab.apply().unwrap_or_else(|e| panic!("apply: {e:#}"))
    }

    fn node_addrs(&self) -> Vec<(String, Ipv4Addr)> {
        self.lab
            .nodes()
            .into_iter()
            .map(|n| (n.name, n.addr))
            .collect()
    }
}

const T: Duration = Duration::from_secs(2);

/// A request's outcome: the answering pod, or (failed while connecting?, the error).
type Outcome = Result<String, (bool, String)>;

/// A Deployment and a NodePort Service for it.
fn web(replicas: usize, selector: &str, node_port: u16, extra_svc: &str, pod_spec: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
{pod_spec}      containers:
      - name: web
        image: nodeport-echo
        ports: [{{containerPort: 8080, name: http}}, {{containerPort: 5353, name: dns, protocol: UDP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
{extra_svc}  selector: {selector}
  ports:
  - {{name: http, port: 80, targetPort: http, nodePort: {node_port}}}
"#
    )
}

#[test]
fn shipped_workloads_answer_on_every_node_and_every_node_port() {
    let t = lab_on(
        shipped_workloads(),
        std::env::temp_dir().join(format!("nodeport-lab-test-{}-shipped", std::process::id())),
    );
    let services = t.lab.services().unwrap();
    let nodes = t.node_addrs();
    let mut checked = 0;
    for svc in &services {
        let selected: BTreeSet<String> = workload::selected(svc, t.lab.pods())
            .into_iter()
            .map(|p| p.name.clone())
            .collect();
        assert!(
            !selected.is_empty(),
            "{:?} selects no pod",
            svc.metadata.name
        );
        for port in svc.spec.as_ref().unwrap().ports.iter().flatten() {
            let node_port = port.node_port.unwrap() as u16;
            let proto = port.protocol.clone().unwrap();
            for (node, addr) in &nodes {
                let a = report::ask(&t.lab, *addr, node_port, &proto)
                    .unwrap_or_else(|e| panic!("{addr}:{node_port}/{proto}: {e:#}"));
                assert!(
                    selected.contains(&a.pod),
                    "{a:?} is not a backend of {svc:?}"
                );
                // eTP Cluster: a local backend sees the client, a remote one the node.
                let want = if a.node == *node { CLIENT_ADDR } else { *addr };
                assert_eq!(a.client, want.to_string(), "via {node}: {a:?}");
                checked += 1;
            }
        }
    }
    // 5 frontends (podinfo, myapp, livefire, echo TCP and UDP) on 3 nodes.
    assert_eq!(checked, 15);

    // The echo pod, pinned to the first worker, seen through every node.
    let echo_node = t
        .lab
        .pods()
        .iter()
        .find(|p| p.deployment == "echo")
        .unwrap()
        .node
        .clone();
    assert!(echo_node.ends_with("-worker"), "{echo_node}");

    // Up again: nothing changes (same pods), everything still answers.
    let before: Vec<String> = t.lab.pods().iter().map(|p| p.name.clone()).collect();
    let again = nodeport_lab::up(t.cfg.clone()).unwrap_or_else(|e| panic!("second up: {e:#}"));
    let after: Vec<String> = again.pods().iter().map(|p| p.name.clone()).collect();
    assert_eq!(before, after, "a second up recreated pods");
    for (_, addr) in &nodes {
        again.get(*addr, 31000, T).unwrap();
    }
    drop(again);

    // Down leaves nothing (and a second down is fine).
    let cfg = t.cfg.clone();
    drop(t);
    assert_eq!(leftovers(&cfg), Vec::<String>::new());
    down(&cfg).unwrap();
}

#[test]
fn requests_spread_plausibly_uniformly_over_the_backends() {
    let t = lab_with(&web(6, "{app: web}", 30100, "", ""));
    let nodes = t.node_addrs();
    let pods: BTreeSet<String> = t.lab.pods().iter().map(|p| p.name.clone()).collect();
    assert_eq!(pods.len(), 6);
    let sample = || -> BTreeMap<String, usize> {
        t.lab
            .in_client(|| {
                let mut counts = BTreeMap::new();
                for i in 0..600 {
                    let a = http_get(nodes[i % nodes.len()].1, 30100, T).unwrap();
                    *counts.entry(a.pod).or_insert(0usize) += 1;
                }
                counts
            })
            .unwrap()
    };
    // A uniform spread exceeds the bound with probability 0.001 (CI saw it happen once), so a
    // spread over the bound is sampled again: twice in a row is a one-in-a-million chance for a
    // uniform selection, while a biased one (a slot never used, a modulo bias) fails both.
    let mut verdicts = Vec::new();
    for _ in 0..2 {
        let counts = sample();
        assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), pods);
        let v: Vec<usize> = counts.values().copied().collect();
        let chi = report::chi_squared(&v);
        let bound = report::chi_squared_bound(v.len() - 1);
        eprintln!("{counts:?}: chi-squared {chi:.1}, bound {bound:.1}");
        if chi <= bound {
            return;
        }
        verdicts.push(format!("{counts:?}, chi-squared {chi:.1} > {bound:.1}"));
    }
    panic!("not plausibly uniform, twice: {verdicts:#?}");
}

#[test]
fn a_selector_matching_no_pod_is_refused_until_it_is_fixed() {
    // Seed 001's mistake: the Service also selects a label no pod has.
    let mut t = lab_with(&web(2, "{app: web, type: front-end}", 30101, "", ""));
    let nodes = t.node_addrs();
    for (node, _) in &nodes {
        let programmed = t.lab.programmed(node).unwrap();
        assert_eq!(
            programmed[&(30101, "TCP".to_owned())],
            BTreeSet::new(),
            "the frontend exists without backends on {node}"
        );
    }
    // As in the seed (`curl: (7) … Connection refused`): a service without endpoints is
    // refused at once, on every node (kube-proxy's REJECT; here the node's own stack answers).
    for (node, addr) in &nodes {
        let started = std::time::Instant::now();
        let e = t
            .lab
            .get(*addr, 30101, T)
            .expect_err("no pod is selected, yet something answered");
        assert!(is_connect_failure(&e), "{node}: {e:#}");
        let io = e
            .root_cause()
            .downcast_ref::<std::io::Error>()
            .map(|e| e.kind());
        assert_eq!(
            io,
            Some(std::io::ErrorKind::ConnectionRefused),
            "{node}: {e:#}"
        );
        assert!(
            started.elapsed() < T,
            "{node}: refused after {:?}",
            started.elapsed()
        );
    }
    // Fixing the selector: every node answers, from both pods.
    t.apply(&web(2, "{app: web}", 30101, "", ""));
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        let (_, addr) = nodes[i % nodes.len()];
        seen.insert(t.lab.get(addr, 30101, T).unwrap().pod);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// Scaling while a client loops, with a new connection per request through every node in turn:
/// no connection attempt ever fails (new flows only go to pods that serve: new pods serve before
/// their slices name them, removed ones are first marked terminating and only deleted after every
/// agent stopped sending them new flows), and the last answers come from the surviving pods.
/// Exchanges already under way with a pod that starts terminating finish too: the agent keeps a
/// terminating endpoint's backend (without slots) until the endpoint leaves the slices, as
/// kube-proxy's conntrack lets such flows finish.
#[test]
fn scaling_while_a_client_loops_never_fails_a_connection() {
    let mut t = lab_with(&web(2, "{app: web}", 30102, "", ""));
    let nodes = t.node_addrs();
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<(Instant, Outcome)>>> = Arc::default();
    let client = {
        let (stop, results, nodes) = (stop.clone(), results.clone(), nodes.clone());
        let ns = t.cfg.client_ns();
        std::thread::spawn(move || {
            nodeport_lab::sys::in_netns(&ns, || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let r = http_get(nodes[i % nodes.len()].1, 30102, T)
                        .map(|a| a.pod)
                        .map_err(|e| (is_connect_failure(&e), format!("{e:#}")));
                    results.lock().unwrap().push((Instant::now(), r));
                    i += 1;
                }
            })
            .unwrap()
        })
    };
    let mut removed = 0;
    // While an apply that removes pods runs.
    let mut removal_windows = Vec::new();
    for replicas in [5, 1, 3, 2] {
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let r = t.apply(&web(replicas, "{app: web}", 30102, "", ""));
        if !r.deleted.is_empty() {
            removal_windows.push(started..Instant::now());
        }
        removed += r.deleted.len();
        assert_eq!(t.lab.pods().len(), replicas);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let results = results.lock().unwrap();
    let ok = results.iter().filter(|r| r.1.is_ok()).count();
    let failed: Vec<_> = results
        .iter()
        .filter_map(|(at, r)| r.as_ref().err().map(|e| (at, e)))
        .collect();
    eprintln!(
        "{ok} answers, {} failures, {removed} pods removed: {failed:?}",
        failed.len()
    );
    assert!(ok > 200, "the client loop made only {ok} requests");
    assert_eq!(removed, 5, "5 -> 1 removes 4, 3 -> 2 one");
    assert!(
        failed.is_empty(),
        "exchanges failed while scaling (windows of pod removal: {removal_windows:?}): {failed:?}"
    );
    // The last answers come from the surviving pods only.
    let live: BTreeSet<String> = t.lab.pods().iter().map(|p| p.name.clone()).collect();
    let tail: BTreeSet<String> = results
        .iter()
        .rev()
        .take(20)
        .filter_map(|r| r.1.as_ref().ok())
        .cloned()
        .collect();
    assert!(tail.is_subset(&live), "{tail:?} vs {live:?}");
}

#[test]
fn external_traffic_policy_local_answers_only_on_nodes_with_a_local_pod() {
    let t = lab_with(&web(
        1,
        "{app: web}",
        30103,
        "  externalTrafficPolicy: Local\n",
        "      nodeSelector: {nodeport-lab/node: worker2}\n",
    ));
    let pod = &t.lab.pods()[0];
    assert!(pod.node.ends_with("-worker2"));
    for (node, addr) in t.node_addrs() {
        let r = t.lab.get(addr, 30103, Duration::from_millis(500));
        if node == pod.node {
            for _ in 0..20 {
                let a = t.lab.get(addr, 30103, T).unwrap();
                assert_eq!(a.pod, pod.name);
                assert_eq!(
                    a.client,
                    CLIENT_ADDR.to_string(),
                    "eTP Local keeps the client address"
                );
            }
        } else {
            let e = r.expect_err("a node without a local pod answered");
            assert!(is_connect_failure(&e), "{node}: {e:#}");
        }
    }
}

#[test]
fn a_udp_service_answers_on_every_node() {
    let yaml = web(2, "{app: web}", 30104, "", "").replace(
        "  - {name: http, port: 80, targetPort: http, nodePort: 30104}",
        "  - {name: dns, port: 53, targetPort: dns, nodePort: 30104, protocol: UDP}",
    );
    let t = lab_with(&yaml);
    let mut seen = BTreeSet::new();
    for round in 0..10 {
        for (node, addr) in t.node_addrs() {
            let a = t
                .lab
                .udp(addr, 30104, T)
                .unwrap_or_else(|e| panic!("UDP via {node}: {e:#}"));
            assert_eq!((a.proto.as_str(), a.port), ("UDP", 5353));
            let want = if a.node == node { CLIENT_ADDR } else { addr };
            assert_eq!(
                a.client,
                want.to_string(),
                "round {round} via {node}: {a:?}"
            );
            seen.insert(a.pod);
        }
    }
    assert_eq!(seen.len(), 2, "datagrams reach both pods: {seen:?}");
}

#[test]
fn down_after_a_crash_and_a_failed_up_leave_nothing_behind() {
    let t = lab_with(&web(2, "{app: web}", 30105, "", ""));
    let cfg = t.cfg.clone();
    // A process only the pod's cgroup knows of (in no namespace of the lab), as a client started
    // in the pod and left behind would be.
    let pod = t.lab.pods()[0].clone();
    let cgroup = cfg.pod_cgroup(&pod.node, &pod.name).unwrap();
    let stray = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec sleep 600",
            cgroup.display()
        ))
        .spawn()
        .unwrap();
    let stray_pid = stray.id() as i32;
    let in_cgroup = std::time::Instant::now();
    while !nodeport_lab::sys::cgroup_pids(&cgroup).contains(&stray_pid) {
        assert!(in_cgroup.elapsed() < std::time::Duration::from_secs(5));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // A crash: every process of the lab killed, and the state file lost.
    for ns in nodeport_lab::sys::netns_list()
        .into_iter()
        .filter(|n| cfg.owns(n))
    {
        for pid in nodeport_lab::sys::netns_pids(&ns) {
            // SAFETY: a process in one of this test's namespaces.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    std::fs::remove_file(cfg.state_dir().join("state.json")).unwrap();
    let left = leftovers(&cfg);
    assert!(
        left.iter().any(|l| l
            == &format!(
                "process {stray_pid} in cgroup {}",
                cfg.node_cgroup(&pod.node).unwrap().display()
            )),
        "{left:?}"
    );
    down(&cfg).unwrap_or_else(|e| panic!("down after a crash: {e:#}"));
    assert_eq!(leftovers(&cfg), Vec::<String>::new());
    // (`down` reaped it: this test is its parent.)
    assert!(
        !nodeport_lab::sys::alive(stray_pid),
        "down left the stray process running"
    );
    drop(stray);
    assert!(!cgroup.exists());

    // A failure midway (a Deployment the apiserver would refuse): cleaned up, and said.
    std::fs::write(
        t.work.join("workload.yaml"),
        web(1, "{app: web}", 30105, "", "")
            .replace("matchLabels: {app: web}", "matchLabels: {app: other}"),
    )
    .unwrap();
    let e = nodeport_lab::up(cfg.clone()).expect_err("a bad Deployment");
    let text = format!("{e:#}");
    assert!(
        text.contains("lab up failed") && text.contains("does not match"),
        "{text}"
    );
    assert_eq!(leftovers(&cfg), Vec::<String>::new());
}
