//! `nodeport-agent run --manifests DIR` end to end, in network namespaces with real TCP: the
//! agent programs the maps from manifests, follows edits while traffic flows, reports a bad
//! manifest without disturbing the rest, and is killed (SIGKILL) and restarted while a TCP
//! connection stays open: the connection keeps working throughout and the restarted agent adopts
//! the maps (same ids) instead of rewriting them.
use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

const AGENT: &str = env!("CARGO_BIN_EXE_nodeport-agent");
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const POD1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const NODE_PORT: u16 = 30080;

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Self {
        let ns = Self(format!("npr-{}-{tag}", std::process::id()));
        let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
        run("ip", &["netns", "add", &ns.0]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(format!("/run/netns/{}", self.0)).expect("netns file");
        std::thread::spawn(move || {
            // SAFETY: a valid netns fd; only this thread moves.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A pod's echo server: for every line, answers "<pod ip> <peer ip:port>".
fn serve(pod: &Ns, addr: Ipv4Addr, stop: Arc<AtomicBool>) {
    let listener = pod.run(move || TcpListener::bind(SocketAddrV4::new(addr, 8080)).unwrap());
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, peer)) => {
                    std::thread::spawn(move || {
                        s.set_nonblocking(false).unwrap();
                        let mut w = s.try_clone().unwrap();
                        for line in BufReader::new(s).lines() {
                            if line.is_err() || writeln!(w, "{addr} {peer}").is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(node: &Ns, manifests: &Path, pin_root: &str, log: &Path) -> Self {
        let child = Command::new("nsenter")
            .args([&format!("--net=/run/netns/{}", node.0), AGENT, "run"])
            .args(["--node-name", "node-a", "--interfaces", "eth0"])
            .arg("--manifests")
            .arg(manifests)
            .args(["--pin-root", pin_root, "--min-sync-period-ms", "50"])
            .args(["--healthz-bind-address", "127.0.0.1:10256"])
            .stdout(Stdio::null())
            .stderr(File::options().create(true).append(true).open(log).unwrap())
            .spawn()
            .expect("starting the agent");
        Self {
            child,
            log: log.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn services(pin_root: &str) -> serde_json::Value {
    let out = Command::new(AGENT)
        .args(["list", "services", "-o", "json", "--pin-root", pin_root])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn backend_addrs(pin_root: &str) -> Vec<String> {
    let v = services(pin_root);
    let mut out: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["node_port"] == NODE_PORT)
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| b["address"].as_str().unwrap_or_default().to_owned())
        .collect();
    out.sort();
    out
}

fn wait_for(what: &str, agent: &Agent, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_manifests(dir: &Path, pods: &[Ipv4Addr]) {
    let endpoints: String = pods
        .iter()
        .map(|p| {
            format!(
                "  - addresses: [\"{p}\"]\n    nodeName: node-a\n    conditions: {{ready: true}}\n"
            )
        })
        .collect();
    let text = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: \"{NODE}\"}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default, creationTimestamp: \"2026-01-01T00:00:00Z\"}}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: echo}}\n\
         addressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n{endpoints}"
    );
    // Written whole and renamed, as kubectl or a ConfigMap update would.
    let tmp = dir.join(".echo.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("echo.yaml")).unwrap();
}

/// One request on a (kept-alive) connection; returns the serving pod and the peer it saw.
fn ask(conn: &mut BufReader<TcpStream>) -> std::io::Result<(String, String)> {
    conn.get_mut().write_all(b"hi\n")?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(pod), Some(peer)) => Ok((pod.to_owned(), peer.to_owned())),
        _ => Err(std::io::Error::other(format!("bad answer {line:?}"))),
    }
}

fn connect(client: &Ns) -> std::io::Result<BufReader<TcpStream>> {
    client.run(|| {
        let s = TcpStream::connect_timeout(
            &SocketAddrV4::new(NODE, NODE_PORT).into(),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(BufReader::new(s))
    })
}

fn healthz(node: &Ns) -> String {
    get(node, "/healthz")
}

fn get(node: &Ns, path: &'static str) -> String {
    node.run(move || {
        let mut s = TcpStream::connect("127.0.0.1:10256").ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
    .unwrap_or_default()
}

#[test]
fn agent_follows_manifests_and_survives_a_restart_without_dropping_connections() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "kernel test: run as root (bash scripts/test.sh)"
    );
    let client = Ns::new("cl");
    let node = Ns::new("node");
    let pod1 = Ns::new("p1");
    let pod2 = Ns::new("p2");
    node.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &client.0,
    ]);
    node.ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"]);
    node.ip(&["link", "set", "eth0", "up"]);
    client.ip(&["addr", "add", "198.18.0.100/24", "dev", "eth0"]);
    client.ip(&["link", "set", "eth0", "up"]);
    for (i, (pod, addr)) in [(&pod1, POD1), (&pod2, POD2)].into_iter().enumerate() {
        let host = format!("vp{i}");
        node.ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &pod.0,
        ]);
        node.ip(&["addr", "add", "10.244.1.1/32", "dev", &host]);
        node.ip(&["link", "set", &host, "up"]);
        node.ip(&["route", "add", &format!("{addr}/32"), "dev", &host]);
        pod.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", "default", "via", "10.244.1.1"]);
    }
    run(
        "ip",
        &[
            "netns",
            "exec",
            &node.0,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    serve(&pod1, POD1, stop.clone());
    serve(&pod2, POD2, stop.clone());

    let work = std::env::temp_dir().join(format!("np-agent-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let log = work.join("agent.log");
    let pin_root = format!("/sys/fs/bpf/nodeport-test-{}-agent-run", std::process::id());
    let cleanup = scopeguard(pin_root.clone(), work.clone(), stop.clone());

    // The agent programs the maps from the manifests.
    write_manifests(&manifests, &[POD1]);
    let agent = Agent::start(&node, &manifests, &pin_root, &log);
    wait_for("the service in the maps", &agent, || {
        backend_addrs(&pin_root) == ["10.244.1.10:8080"]
    });
    wait_for("/healthz 200", &agent, || {
        healthz(&node).starts_with("HTTP/1.1 200")
    });

    let mut kept = connect(&client).expect("connecting through the nodePort");
    let (pod, peer) = ask(&mut kept).unwrap();
    assert_eq!(pod, POD1.to_string());
    assert!(
        peer.starts_with(&format!("{CLIENT}:")),
        "a local pod sees the client: {peer}"
    );

    // Editing the manifests while traffic flows: a second pod joins.
    write_manifests(&manifests, &[POD1, POD2]);
    wait_for("two backends", &agent, || {
        backend_addrs(&pin_root).len() == 2
    });
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let mut c = connect(&client).expect("new connection");
        seen.insert(ask(&mut c).unwrap().0);
    }
    assert_eq!(seen.len(), 2, "new connections reach both pods: {seen:?}");
    assert_eq!(
        ask(&mut kept).unwrap().0,
        POD1.to_string(),
        "the kept connection stays on its pod"
    );

    // /metrics names services and counts the dataplane's packets by reason.
    let metrics = get(&node, "/metrics");
    assert!(
        metrics.contains("service=\"default/echo:http\""),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"new_flow\""), "{metrics}");

    // A bad manifest is reported and changes nothing else.
    std::fs::write(
        manifests.join("bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: out-of-range}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  ports:\n  - {port: 80, nodePort: 40000, protocol: TCP}\n---\nnot: [valid\n",
    )
    .unwrap();
    wait_for("the bad manifest reported", &agent, || {
        let log = agent.log();
        log.contains("out-of-range") && log.contains("bad.yaml")
    });
    assert_eq!(backend_addrs(&pin_root).len(), 2);
    assert_eq!(ask(&mut kept).unwrap().0, POD1.to_string());

    // SIGKILL: no clean shutdown at all. The pinned dataplane keeps serving on its own.
    let ids_before = services(&pin_root);
    drop(agent);
    assert_eq!(
        ask(&mut kept).unwrap().0,
        POD1.to_string(),
        "connection broken by agent death"
    );
    let mut c = connect(&client).expect("new connection without an agent");
    ask(&mut c).unwrap();

    // A new agent adopts the maps: same services and ids, and the connection still flows.
    let agent = Agent::start(&node, &manifests, &pin_root, &log);
    wait_for("/healthz 200 after restart", &agent, || {
        healthz(&node).starts_with("HTTP/1.1 200")
    });
    let mut after = services(&pin_root);
    let mut before = ids_before;
    // Packet counters move with the traffic; compare everything else.
    for v in [&mut after, &mut before] {
        for s in v.as_array_mut().into_iter().flatten() {
            s["packets"] = 0.into();
            s["bytes"] = 0.into();
        }
    }
    assert_eq!(after, before, "the restarted agent rewrote ids or services");
    for _ in 0..5 {
        assert_eq!(ask(&mut kept).unwrap().0, POD1.to_string());
    }
    assert!(
        agent.log().contains("adopted the pinned maps"),
        "{}",
        agent.log()
    );
    drop(agent);
    drop(cleanup);
}

/// Unloads the dataplane and removes the work directory when the test ends, also on panic.
struct Cleanup(String, PathBuf, Arc<AtomicBool>);

fn scopeguard(pin_root: String, work: PathBuf, stop: Arc<AtomicBool>) -> Cleanup {
    Cleanup(pin_root, work, stop)
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.2.store(true, Ordering::Relaxed);
        let _ = Command::new(AGENT)
            .args(["unload", "--pin-root", &self.0])
            .output();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}
