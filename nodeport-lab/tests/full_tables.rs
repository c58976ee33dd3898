//! Full tables, in the lab with real flows: connection tracking filled past its capacity keeps
//! serving new flows (LRU eviction), an exhausted SNAT port range drops new flows to that backend
//! with `drop_snat_exhausted` and serves again once flows close, the agent's metrics show the
//! pressure, nothing crashes, and a pinned table of another size is refused with a clear error.
//!
//! Short form (the test command): agents run with `--conntrack-entries 4096 --rev-nat-entries
//! 4096 --snat-ports 61000-61063`. Long form, the real default capacities (524,288 flows, 4,536
//! SNAT ports): `NODEPORT_FULL_TABLES=long cargo test --release -p nodeport-lab --test
//! full_tables` after `cargo build --release -p nodeport-agent`. Figures are printed with
//! `--nocapture`; docs/RELIABILITY.md records them.
//!
//! Each test brings up its own lab (prefix `npft<pid>-<n>`) and tears it down in a Drop guard.
//! They need root and fail (never skip) without it.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nodeport_lab::{CLIENT_ADDR, Config, lab::http_get, sys};

mod support;
use support::{ECHO, TestLab, agent_binary, require_root, sweep_stale};

const PREFIX: &str = "npft";
const T: Duration = Duration::from_secs(2);
const WEB_TCP: u16 = 30210;
const WEB_UDP: u16 = 30211;
const OTHER_TCP: u16 = 30212;

/// Table sizes and SNAT range of one form of the tests.
#[derive(Debug)]
struct Form {
    name: &'static str,
    conntrack: u32,
    snat_ports: u16,
    /// Extra agent arguments (none in the long form: the defaults are what it measures).
    agent_args: Vec<String>,
}

fn form() -> Form {
    match std::env::var("NODEPORT_FULL_TABLES").as_deref() {
        Err(_) | Ok("short") => Form {
            name: "short",
            conntrack: 4096,
            snat_ports: 64,
            agent_args: [
                "--conntrack-entries",
                "4096",
                "--rev-nat-entries",
                "4096",
                "--snat-ports",
                "61000-61063",
            ]
            .map(String::from)
            .to_vec(),
        },
        Ok("long") => Form {
            name: "long",
            conntrack: 524_288,
            snat_ports: 4536,
            agent_args: Vec::new(),
        },
        Ok(other) => panic!("NODEPORT_FULL_TABLES={other:?}: expected short or long"),
    }
}

/// Many concurrent connections and datagram sockets: raised before the lab starts, so the pods'
/// echo servers (our children) inherit it too.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write only the struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    assert!(
        lim.rlim_cur >= 16_384,
        "RLIMIT_NOFILE hard limit {} is below the 16,384 the SNAT test holds open",
        lim.rlim_max
    );
}

fn lab_up(agent_args: &[String]) -> TestLab {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    require_root();
    raise_nofile();
    sweep_stale(PREFIX);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("{PREFIX}{}-{n}", std::process::id());
    let work = std::env::temp_dir().join(format!("nodeport-full-tables-{prefix}"));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("workload.yaml"), WORKLOAD).unwrap();
    let mut cfg = Config::new(&prefix, work.clone(), agent_binary(), ECHO.into());
    cfg.agent_args = agent_args.to_vec();
    let started = Instant::now();
    let lab = match nodeport_lab::up(cfg.clone()) {
        Ok(lab) => lab,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            panic!("lab up: {e:#}");
        }
    };
    eprintln!("lab {prefix} up in {:?}", started.elapsed());
    TestLab { lab, cfg, work }
}

/// `web` (TCP and UDP) on the worker, `other` on worker2; both NodePort.
const WORKLOAD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      nodeSelector: {nodeport-lab/node: worker}
      containers:
      - name: web
        image: nodeport-echo
        ports: [{containerPort: 8080, name: http}, {containerPort: 5353, name: dns, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30210}
  - {name: dns, port: 53, targetPort: dns, nodePort: 30211, protocol: UDP}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: other}
spec:
  replicas: 1
  selector: {matchLabels: {app: other}}
  template:
    metadata: {labels: {app: other}}
    spec:
      nodeSelector: {nodeport-lab/node: worker2}
      containers:
      - name: other
        image: nodeport-echo
        ports: [{containerPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: other}
spec:
  type: NodePort
  selector: {app: other}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30212}
"#;

impl TestLab {
    fn node(&self, suffix: &str) -> (String, Ipv4Addr) {
        let n = self
            .lab
            .nodes()
            .into_iter()
            .find(|n| n.name == format!("{}-{suffix}", self.cfg.prefix))
            .unwrap_or_else(|| panic!("no node {suffix}"));
        (n.name, n.addr)
    }

    /// `GET path` on the agent's health and metrics port of a node, from the client.
    fn scrape(&self, addr: Ipv4Addr, path: &str) -> anyhow::Result<(u16, String)> {
        self.lab.in_client(|| http_text(addr, 10256, path))?
    }

    /// The node's /metrics as `name{labels}` → value.
    fn metrics(&self, addr: Ipv4Addr) -> BTreeMap<String, f64> {
        let (code, body) = self
            .scrape(addr, "/metrics")
            .unwrap_or_else(|e| panic!("scraping {addr}: {e:#}"));
        assert_eq!(code, 200, "{body}");
        parse_metrics(&body)
    }

    /// Polls /metrics until `ok` holds (the tables are counted every 10 s).
    fn wait_metrics(
        &self,
        addr: Ipv4Addr,
        what: &str,
        ok: impl Fn(&BTreeMap<String, f64>) -> bool,
    ) -> BTreeMap<String, f64> {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let m = self.metrics(addr);
            if ok(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{addr}: metrics never showed {what}: {m:#?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every agent still runs (the one process in its node's namespace) and answers /healthz.
    fn assert_agents_healthy(&self) {
        for n in self.lab.nodes() {
            let agents: Vec<i32> = sys::netns_pids(&n.name)
                .into_iter()
                .filter(|p| sys::runs(*p, "nodeport-agent"))
                .collect();
            assert_eq!(agents.len(), 1, "agent of {} is not running", n.name);
            let (code, body) = self
                .scrape(n.addr, "/healthz")
                .unwrap_or_else(|e| panic!("/healthz of {}: {e:#}", n.name));
            assert_eq!(code, 200, "/healthz of {}: {body}", n.name);
        }
    }

    /// Tracked flows on a node, from `nodeport-agent list conntrack -o json`.
    fn conntrack(&self, node: &str) -> Vec<serde_json::Value> {
        let text = self
            .lab
            .agent_list(node, "conntrack", true)
            .unwrap_or_else(|e| panic!("list conntrack on {node}: {e:#}"));
        serde_json::from_str(&text).unwrap()
    }
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

fn packets(m: &BTreeMap<String, f64>, reason: &str) -> f64 {
    metric(m, &format!("nodeport_packets_total{{reason=\"{reason}\"}}"))
}

fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// One HTTP/1.1 GET (call from inside a namespace): status code and body.
fn http_text(addr: Ipv4Addr, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&SocketAddrV4::new(addr, port).into(), T)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end in {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// Client source addresses for `flows` one-datagram flows (one address has ~64k ports): the
/// client's own, then extra ones on its interface (TEST-NET, inside the lab's bridge network).
fn client_sources(t: &TestLab, flows: usize) -> Vec<Ipv4Addr> {
    let per_addr = 64_000;
    let mut addrs = vec![CLIENT_ADDR];
    for i in 1..flows.div_ceil(per_addr) {
        let a = Ipv4Addr::new(198, 18, 0, 100 + i as u8);
        sys::ip_in(
            &t.cfg.client_ns(),
            &["addr", "add", &format!("{a}/24"), "dev", "eth0"],
        )
        .unwrap();
        addrs.push(a);
    }
    addrs
}

#[test]
fn conntrack_past_capacity_keeps_serving_new_flows() {
    let f = form();
    let t = lab_up(&f.agent_args);
    let (worker, w_addr) = t.node("worker");
    let (_, cp_addr) = t.node("control-plane");
    let (_, w2_addr) = t.node("worker2");
    let cap = f.conntrack as usize;
    // Three times the table in the short form; 1.25 times in the long one (655k flows).
    let flows = if f.name == "short" {
        3 * cap
    } else {
        cap + cap / 4
    };
    let before = t.metrics(w_addr);

    // One datagram per flow from distinct (address, port) tuples to the worker's nodePort; the
    // pod is local there, so every flow takes a conntrack and a reverse-NAT entry (no SNAT
    // port, which would bound them to the SNAT range).
    let sources = client_sources(&t, flows);
    let started = Instant::now();
    let sent: Vec<SocketAddrV4> = t
        .lab
        .in_client(|| {
            let mut sent = Vec::with_capacity(flows);
            'all: for addr in &sources {
                for port in 1024..=u16::MAX {
                    if sent.len() == flows {
                        break 'all;
                    }
                    let src = SocketAddrV4::new(*addr, port);
                    // A port the client's stack already uses is skipped.
                    let Ok(s) = UdpSocket::bind(src) else {
                        continue;
                    };
                    if s.send_to(b"x", SocketAddrV4::new(w_addr, WEB_UDP)).is_ok() {
                        sent.push(src);
                    }
                }
            }
            sent
        })
        .unwrap();
    let send_time = started.elapsed();
    assert_eq!(sent.len(), flows, "could not send {flows} flows");
    eprintln!(
        "[{}] {flows} UDP flows ({} source addresses) to {w_addr}:{WEB_UDP} sent in {send_time:?}",
        f.name,
        sources.len()
    );
    std::thread::sleep(Duration::from_secs(1));

    // New flows keep being served: a new UDP exchange, a new TCP connection, on the full node
    // and through the others (SNAT to the same pod), and the other service.
    for addr in [w_addr, cp_addr, w2_addr] {
        t.lab
            .udp(addr, WEB_UDP, T)
            .unwrap_or_else(|e| panic!("new UDP flow via {addr} with a full table: {e:#}"));
        t.lab
            .get(addr, WEB_TCP, T)
            .unwrap_or_else(|e| panic!("new TCP flow via {addr} with a full table: {e:#}"));
    }
    t.lab.get(w2_addr, OTHER_TCP, T).unwrap();

    // The dataplane counted every flow as new and never failed an insert: the LRU evicted.
    let after = t.metrics(w_addr);
    let new_flows = packets(&after, "new_flow") - packets(&before, "new_flow");
    assert!(
        new_flows >= flows as f64,
        "{new_flows} new flows counted for {flows} sent"
    );
    assert_eq!(
        packets(&after, "drop_ct_insert"),
        0.0,
        "an insert into a full LRU table failed"
    );

    // Which flows the table holds: the most recent ones, not the first.
    let started = Instant::now();
    let tracked: BTreeSet<String> = t
        .conntrack(&worker)
        .iter()
        .filter_map(|r| r["client"].as_str().map(str::to_owned))
        .collect();
    eprintln!(
        "[{}] `nodeport-agent list conntrack -o json` on {worker}: {} flows in {:?}",
        f.name,
        tracked.len(),
        started.elapsed()
    );
    assert!(tracked.len() <= cap, "{} > capacity {cap}", tracked.len());
    let held = |range: &[SocketAddrV4]| {
        range
            .iter()
            .filter(|s| tracked.contains(&s.to_string()))
            .count()
    };
    let (first, last) = (held(&sent[..200]), held(&sent[flows - 200..]));
    eprintln!(
        "[{}] of the first 200 flows {first} are tracked, of the last 200 {last}",
        f.name
    );
    assert!(
        first <= 20,
        "the oldest flows were not evicted: {first}/200 held"
    );
    assert!(
        last >= 180,
        "the newest flows were evicted: {last}/200 held"
    );

    // The metrics show the pressure once the periodic count ran.
    let ct_entries = "nodeport_map_entries{map=\"np_ct4\"}";
    let m = t.wait_metrics(w_addr, "a full np_ct4", |m| {
        metric(m, ct_entries) >= 0.75 * cap as f64
    });
    assert_eq!(
        metric(&m, "nodeport_map_capacity{map=\"np_ct4\"}"),
        cap as f64,
        "np_ct4's capacity is not the configured one"
    );
    eprintln!(
        "[{}] {worker} metrics: np_ct4 {} of {}, fill {:.3}; np_rnat4 {}; count took {:.3} s",
        f.name,
        metric(&m, ct_entries),
        metric(&m, "nodeport_map_capacity{map=\"np_ct4\"}"),
        metric(&m, "nodeport_map_fill_ratio{map=\"np_ct4\"}"),
        metric(&m, "nodeport_map_entries{map=\"np_rnat4\"}"),
        metric(&m, "nodeport_table_count_duration_seconds"),
    );
    t.assert_agents_healthy();

    // The sizes are fixed when the maps are created: an agent asking another size of the pinned
    // tables is refused with an error naming the remedy, and the tables keep their size.
    let (worker2, _) = t.node("worker2");
    for pid in sys::netns_pids(&worker2) {
        sys::stop(pid, Duration::from_secs(5));
    }
    let log = t.work.join("mismatch.log");
    let other = (f.conntrack / 2).to_string();
    let mut cmd = Command::new(agent_binary());
    cmd.args(["run", "--node-name", &worker2, "--interfaces", "eth0"])
        .arg("--manifests")
        .arg(t.cfg.manifests_dir())
        .arg("--pin-root")
        .arg(t.cfg.pin_root(&worker2))
        .args(["--conntrack-entries", &other, "--rev-nat-entries", &other]);
    let pid = sys::spawn_in_netns(&worker2, &mut cmd, &log).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sys::alive(pid) {
        assert!(Instant::now() < deadline, "the agent accepted other sizes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!(
        "[{}] agent with --conntrack-entries {other}: {}",
        f.name,
        text.trim()
    );
    for want in [
        "max_entries",
        &format!("--conntrack-entries {other}"),
        "nodeport-agent unload",
    ] {
        assert!(text.contains(want), "{want:?} missing from: {text}");
    }
    let pinned = t.cfg.pin_root(&worker2).join("v1/np_ct4");
    let show = sys::run(
        "bpftool",
        &["map", "show", "pinned", pinned.to_str().unwrap()],
    )
    .unwrap();
    assert!(
        show.contains(&format!("max_entries {}", f.conntrack)),
        "np_ct4 changed size: {show}"
    );
    // `nodeport-agent status` reports the pinned tables' own size, not the object's default.
    let status = sys::run(
        agent_binary().to_str().unwrap(),
        &[
            "status",
            "-o",
            "json",
            "--pin-root",
            t.cfg.pin_root(&worker2).to_str().unwrap(),
        ],
    )
    .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let capacity = |map: &str| {
        status["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|m| m["map"] == map))
            .and_then(|m| m["capacity"].as_u64())
    };
    assert_eq!(capacity("np_ct4"), Some(u64::from(f.conntrack)), "{status}");
    assert_eq!(
        capacity("np_rnat4"),
        Some(u64::from(f.conntrack)),
        "{status}"
    );
}

#[test]
fn snat_exhaustion_drops_counts_and_recovers() {
    let f = form();
    let t = lab_up(&f.agent_args);
    let (cp, cp_addr) = t.node("control-plane");
    let (_, w2_addr) = t.node("worker2");
    let range = usize::from(f.snat_ports);
    let before = t.metrics(cp_addr);

    // The pod runs on the worker: every connection through the control plane is source-NATed
    // to (control-plane address, port from the range) towards the same pod. Connections are
    // opened at once and held, so each keeps its port; some attempts find no free port.
    let attempts = range + range / 2;
    let started = Instant::now();
    let streams: Vec<TcpStream> = t
        .lab
        .in_client(|| {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..attempts)
                    .map(|_| {
                        std::thread::Builder::new()
                            .stack_size(64 * 1024)
                            .spawn_scoped(s, || {
                                TcpStream::connect_timeout(
                                    &SocketAddrV4::new(cp_addr, WEB_TCP).into(),
                                    Duration::from_secs(3),
                                )
                                .ok()
                            })
                            .unwrap()
                    })
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| h.join().unwrap())
                    .collect()
            })
        })
        .unwrap();
    let held = streams.len();
    eprintln!(
        "[{}] {attempts} concurrent connections via {cp_addr}:{WEB_TCP} with {range} SNAT ports: \
         {held} established in {:?}",
        f.name,
        started.elapsed()
    );
    assert!(held <= range, "{held} connections through {range} ports");
    assert!(
        held >= range - range / 8,
        "only {held} of {range} ports were used before allocation failed"
    );
    let m = t.metrics(cp_addr);
    let exhausted = packets(&m, "drop_snat_exhausted") - packets(&before, "drop_snat_exhausted");
    eprintln!("[{}] drop_snat_exhausted on {cp}: {exhausted}", f.name);
    assert!(exhausted > 0.0, "no SNAT exhaustion counted");
    let snat_flows = t
        .conntrack(&cp)
        .iter()
        .filter(|r| !r["snat"].is_null() && r["state"] == "established")
        .count();
    assert_eq!(snat_flows, held, "established SNAT flows on {cp}");

    // The metrics show it: the busiest pair holds every port it could get.
    let m = t.wait_metrics(cp_addr, "the SNAT pressure", |m| {
        metric(m, "nodeport_snat_ports_used_max") == held as f64
    });
    assert_eq!(metric(&m, "nodeport_snat_ports"), range as f64);

    // Only that (node address, backend) pair is exhausted: the same pod through another node,
    // and another service through this one, are served; nothing crashed.
    t.lab.get(w2_addr, WEB_TCP, T).unwrap();
    t.lab.get(cp_addr, OTHER_TCP, T).unwrap();
    t.assert_agents_healthy();

    // Closing the connections frees their ports once the closed flows expire (10 s): a
    // reclaimed port is reused even before the agent's sweep removes the entry.
    drop(streams);
    let closed = Instant::now();
    let deadline = closed + Duration::from_secs(40);
    while t
        .lab
        .get(cp_addr, WEB_TCP, Duration::from_millis(500))
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "still no free SNAT port {:?} after closing",
            closed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let recovered = closed.elapsed();
    let batch = range.min(32);
    let served: usize = t
        .lab
        .in_client(|| {
            (0..batch)
                .filter(|_| http_get(cp_addr, WEB_TCP, T).is_ok())
                .count()
        })
        .unwrap();
    assert_eq!(served, batch, "new connections after the ports were freed");
    eprintln!(
        "[{}] first new connection via {cp_addr} served {recovered:?} after closing the held \
         ones, then {batch} more",
        f.name
    );
    t.assert_agents_healthy();
}
