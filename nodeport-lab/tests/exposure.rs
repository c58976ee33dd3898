//! Exposure, in the lab: a nodePort answers only on the node's nodePort addresses (the Node's
//! InternalIP/ExternalIP, narrowed by `--nodeport-addresses`), never on its other addresses
//! (loopback, the pod-facing gateway, an extra address on its interface); the node's own
//! processes and pods reach it on those addresses too (socket load balancing on the node's
//! cgroup), and a service without endpoints refuses them; the health and metrics listener binds
//! where `--healthz-bind-address` says. What this promises, and how it compares with kube-proxy,
//! is in docs/RELIABILITY.md ("Exposure").
//!
//! Each test brings up its own lab (prefix `npex<pid>-<n>`) and tears it down in a Drop guard.
//! They need root and fail (never skip) without it.
use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use nodeport_lab::{
    Config,
    lab::http_get,
    probe::{Failure, Proto},
    sys,
};

mod support;
use support::{ECHO, TestLab, agent_binary, require_root, sweep_stale};

const PREFIX: &str = "npex";
const T: Duration = Duration::from_secs(2);
const NODE_PORT: u16 = 30310;
/// A Service whose selector matches no pod.
const EMPTY_PORT: u16 = 30311;
/// kube-proxy's healthz port, `0x2810` in /proc/net/tcp.
const HEALTHZ_PORT: u16 = 10256;

/// `web` on the worker, a NodePort Service for it.
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
        ports: [{containerPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30310}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  type: NodePort
  selector: {app: nothing-has-this-label}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30311}
"#;

fn lab_up(agent_args: &[&str]) -> TestLab {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    require_root();
    sweep_stale(PREFIX);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("{PREFIX}{}-{n}", std::process::id());
    let work = std::env::temp_dir().join(format!("nodeport-exposure-{prefix}"));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("workload.yaml"), WORKLOAD).unwrap();
    let mut cfg = Config::new(&prefix, work.clone(), agent_binary(), ECHO.into());
    cfg.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
    let lab = match nodeport_lab::up(cfg.clone()) {
        Ok(lab) => lab,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            panic!("lab up: {e:#}");
        }
    };
    TestLab { lab, cfg, work }
}

/// How a connection attempt to a nodePort ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The echo pod answered (the packet was translated).
    Answered,
    /// Nothing listens there: the node's own stack reset the connection (not translated).
    Refused,
    Other(String),
}

fn outcome(result: Result<nodeport_lab::probe::Exchange, nodeport_lab::ClientError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Answered,
        Err(e) if e.failure == Failure::Refused => Outcome::Refused,
        Err(e) => Outcome::Other(e.to_string()),
    }
}

fn attempt(addr: Ipv4Addr, port: u16) -> Outcome {
    match http_get(addr, port, T) {
        Ok(_) => Outcome::Answered,
        Err(e) => match e
            .root_cause()
            .downcast_ref::<std::io::Error>()
            .map(|e| e.kind())
        {
            Some(ErrorKind::ConnectionRefused) => Outcome::Refused,
            _ => Outcome::Other(format!("{e:#}")),
        },
    }
}

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

    /// A connection attempt from a thread of this test inside namespace `ns`: outside every
    /// cgroup of the lab.
    fn attempt_in(&self, ns: &str, addr: Ipv4Addr) -> Outcome {
        sys::in_netns(ns, || attempt(addr, NODE_PORT)).unwrap()
    }

    /// A connection attempt by a process in `pod` (its namespace and cgroup).
    fn attempt_from_pod(&self, pod: &str, addr: Ipv4Addr, port: u16) -> Outcome {
        let target = SocketAddrV4::new(addr, port);
        outcome(self.lab.exec_in_pod(pod, target, Proto::Tcp, T))
    }

    /// A connection attempt by a process on `node` (its namespace and cgroup, outside pods).
    fn attempt_from_node(&self, node: &str, addr: Ipv4Addr) -> Outcome {
        let target = SocketAddrV4::new(addr, NODE_PORT);
        outcome(self.lab.exec_on_node(node, target, Proto::Tcp, T))
    }

    /// `nodeport-agent list addresses` of a node: the addresses its dataplane serves.
    fn served_addresses(&self, node: &str) -> Vec<String> {
        let json = self.lab.agent_list(node, "addresses", true).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    /// TCP listeners in a node's namespace, from its /proc/net/tcp: (address, port).
    fn listeners(&self, node: &str) -> BTreeSet<SocketAddrV4> {
        let text = sys::exec_in(node, &["cat", "/proc/net/tcp"]).unwrap();
        text.lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // st 0A is TCP_LISTEN; addresses are the kernel's u32 in host order, hex.
                if f.get(3) != Some(&"0A") {
                    return None;
                }
                let (a, p) = f.get(1)?.split_once(':')?;
                let addr = Ipv4Addr::from(u32::from_be(u32::from_str_radix(a, 16).ok()?));
                Some(SocketAddrV4::new(addr, u16::from_str_radix(p, 16).ok()?))
            })
            .collect()
    }
}

/// `GET /healthz` (call from inside a namespace): the status code.
fn healthz(addr: Ipv4Addr) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&SocketAddrV4::new(addr, HEALTHZ_PORT).into(), T)?;
    s.set_read_timeout(Some(T))?;
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

#[test]
fn node_ports_answer_only_on_the_node_addresses() {
    let t = lab_up(&[]);
    let (worker, w_addr) = t.node("worker");
    let (_, cp_addr) = t.node("control-plane");
    let (_, w2_addr) = t.node("worker2");
    let gateway = t.lab.node(&worker).unwrap().gateway();
    let pod = t.lab.pods()[0].clone();
    assert_eq!(pod.node, worker);

    // The configured addresses answer: every node's InternalIP, from the client.
    for addr in [cp_addr, w_addr, w2_addr] {
        assert_eq!(
            t.lab.in_client(|| attempt(addr, NODE_PORT)).unwrap(),
            Outcome::Answered,
            "{addr}:{NODE_PORT} from the client"
        );
    }
    assert_eq!(t.served_addresses(&worker), [w_addr.to_string()]);

    // Every other address of the worker, through its interface (so through the dataplane):
    // an extra address on eth0 that the Node object does not list, and the pod-facing gateway
    // (the client routes the pod CIDR via the worker, as a router next to the node could).
    let extra = Ipv4Addr::new(198, 18, 0, 53);
    sys::ip_in(
        &worker,
        &["addr", "add", &format!("{extra}/24"), "dev", "eth0"],
    )
    .unwrap();
    sys::ip_in(
        &t.cfg.client_ns(),
        &["route", "add", "10.244.1.0/24", "via", &w_addr.to_string()],
    )
    .unwrap();
    let before = t.translated(&worker);
    let passed_before = t.counters(&worker)["pass_not_nodeport"];
    for addr in [extra, gateway] {
        assert_eq!(
            t.lab.in_client(|| attempt(addr, NODE_PORT)).unwrap(),
            Outcome::Refused,
            "{addr}:{NODE_PORT} from the client must not be translated"
        );
    }
    // From the node itself and from its pod, as processes in their cgroups: the node's
    // nodePort address is served at the syscall (socket load balancing); loopback and the
    // gateway are not nodePort addresses and are refused by the node's stack.
    let sock_before = t.sock(&worker, "sock_translated");
    for (addr, want) in [
        (Ipv4Addr::LOCALHOST, Outcome::Refused),
        (gateway, Outcome::Refused),
        (w_addr, Outcome::Answered),
    ] {
        assert_eq!(
            t.attempt_from_node(&worker, addr),
            want,
            "{addr}:{NODE_PORT} from a process on {worker}"
        );
        assert_eq!(
            t.attempt_from_pod(&pod.name, addr, NODE_PORT),
            want,
            "{addr}:{NODE_PORT} from pod {}",
            pod.name
        );
    }
    // Exactly the two connects to the node's address were translated.
    assert_eq!(t.sock(&worker, "sock_translated") - sock_before, 2);
    // A thread of this test in the node's or the pod's namespace is outside their cgroups: no
    // socket program sees it, and locally sent packets never cross eth0's ingress hook.
    let pod_ns = t.cfg.pod_ns(&pod.name);
    for ns in [&worker, &pod_ns] {
        for addr in [Ipv4Addr::LOCALHOST, w_addr, gateway] {
            assert_eq!(
                t.attempt_in(ns, addr),
                Outcome::Refused,
                "{addr}:{NODE_PORT} from outside the cgroup in {ns}"
            );
        }
    }
    assert_eq!(t.sock(&worker, "sock_translated") - sock_before, 2);
    assert_eq!(
        t.translated(&worker),
        before,
        "the worker translated a packet to an address that is not a nodePort address"
    );

    // A Service without endpoints is refused at once, as kube-proxy's REJECT would: from the
    // pod the socket programs leave the connect() alone, from the client the packet path hands
    // the SYN to the node's stack untouched (`pass_no_backend`); nothing listens there.
    let no_backend = t.sock(&worker, "sock_no_backend");
    let started = std::time::Instant::now();
    assert_eq!(
        t.attempt_from_pod(&pod.name, w_addr, EMPTY_PORT),
        Outcome::Refused
    );
    let refused_in = started.elapsed();
    assert!(refused_in < T, "refused after {refused_in:?}");
    assert_eq!(t.sock(&worker, "sock_no_backend") - no_backend, 1);
    eprintln!("{w_addr}:{EMPTY_PORT} (no endpoints) from the pod: refused in {refused_in:?}");
    let no_backend = t.counters(&worker)["pass_no_backend"];
    let from_client = t.lab.in_client(|| attempt(w_addr, EMPTY_PORT)).unwrap();
    assert_eq!(
        from_client,
        Outcome::Refused,
        "{w_addr}:{EMPTY_PORT} from the client"
    );
    assert!(t.counters(&worker)["pass_no_backend"] > no_backend);
    // The client's SYNs did reach the dataplane and were passed: counted, untouched. (The
    // node's and the pod's own attempts never crossed eth0's ingress.)
    let passed = t.counters(&worker)["pass_not_nodeport"] - passed_before;
    assert!(passed >= 2, "pass_not_nodeport grew by {passed}");

    // A pod reaches another node's nodePort over the wire (out of its node's interface, into
    // the other node's packet path), answered by itself through that node.
    let a = sys::in_netns(&pod_ns, || http_get(w2_addr, NODE_PORT, T))
        .unwrap()
        .unwrap_or_else(|e| panic!("pod -> {w2_addr}:{NODE_PORT}: {e:#}"));
    assert_eq!(a.client, w2_addr.to_string(), "{a:?}");

    // The health and metrics listener: the lab's --healthz-bind-address 0.0.0.0:10256 (the
    // default) is a wildcard listener, reachable on the node's address.
    let listeners = t.listeners(&worker);
    assert!(
        listeners.contains(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, HEALTHZ_PORT)),
        "{listeners:?}"
    );
    assert_eq!(t.lab.in_client(|| healthz(w_addr).unwrap()).unwrap(), 200);
    eprintln!("{worker} listens on {listeners:?}");
}

#[test]
fn nodeport_addresses_and_healthz_bind_address_restrict_exposure() {
    // Only the worker's address is a nodePort address; the listener binds loopback only.
    let t = lab_up(&[
        "--nodeport-addresses",
        "198.18.0.3/32",
        "--healthz-bind-address",
        "127.0.0.1:10256",
    ]);
    let (worker, w_addr) = t.node("worker");
    let (cp, cp_addr) = t.node("control-plane");
    let (w2, w2_addr) = t.node("worker2");
    assert_eq!(w_addr, Ipv4Addr::new(198, 18, 0, 3));

    assert_eq!(t.served_addresses(&worker), [w_addr.to_string()]);
    for node in [&cp, &w2] {
        assert_eq!(t.served_addresses(node), Vec::<String>::new(), "{node}");
    }
    assert_eq!(
        t.lab.in_client(|| attempt(w_addr, NODE_PORT)).unwrap(),
        Outcome::Answered
    );
    // The other nodes' only addresses are outside --nodeport-addresses: not translated, so their
    // stacks refuse (they serve the same nodePort with the flag off, in the test above).
    for (node, addr) in [(&cp, cp_addr), (&w2, w2_addr)] {
        let before = t.translated(node);
        assert_eq!(
            t.lab.in_client(|| attempt(addr, NODE_PORT)).unwrap(),
            Outcome::Refused,
            "{addr}:{NODE_PORT} is outside --nodeport-addresses"
        );
        assert_eq!(t.translated(node), before, "{node} translated");
    }
    // The same for the nodes' own processes: outside --nodeport-addresses, the socket programs
    // leave them alone (np_addr4 is the one list of nodePort addresses).
    for (node, addr) in [(&cp, cp_addr), (&w2, w2_addr)] {
        let before = t.sock(node, "sock_translated") + t.sock(node, "sock_no_backend");
        assert_eq!(
            t.attempt_from_node(node, addr),
            Outcome::Refused,
            "{addr}:{NODE_PORT} from {node} is outside --nodeport-addresses"
        );
        let after = t.sock(node, "sock_translated") + t.sock(node, "sock_no_backend");
        assert_eq!(after, before, "{node}'s socket programs acted");
    }
    assert_eq!(t.attempt_from_node(&worker, w_addr), Outcome::Answered);

    // The listener is on loopback only: /proc/net/tcp, and by connecting.
    for node in [&worker, &cp, &w2] {
        let listeners = t.listeners(node);
        let on_port: Vec<_> = listeners
            .iter()
            .filter(|s| s.port() == HEALTHZ_PORT)
            .collect();
        assert_eq!(
            on_port,
            [&SocketAddrV4::new(Ipv4Addr::LOCALHOST, HEALTHZ_PORT)],
            "{node}"
        );
        assert_eq!(
            sys::in_netns(node, || healthz(Ipv4Addr::LOCALHOST).unwrap()).unwrap(),
            200,
            "{node}"
        );
    }
    let refused = t
        .lab
        .in_client(|| healthz(w_addr).map_err(|e| e.kind()))
        .unwrap();
    assert_eq!(refused, Err(ErrorKind::ConnectionRefused));
}
