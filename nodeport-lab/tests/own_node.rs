//! A node's own pods and processes reach nodePorts on the node's own address (socket load
//! balancing): seed 003's `kubectl exec dnsutils -- wget <each node IP>:30040`, a process on the
//! node, the counters that tell the socket path from the packet path, and agent restarts.
//!
//! Clients run as processes inside a pod's or node's cgroup (`Lab::exec_in_pod`,
//! `Lab::exec_on_node`): the agent's socket programs are attached to the node's cgroup and see
//! only its processes (a thread of this test in the node's namespace stays outside, and is
//! refused: the control). What each client saw is documented in docs/RELIABILITY.md ("Exposure").
//!
//! Each test brings up its own lab (prefix `npon<pid>-<n>`) and tears it down in a Drop guard.
//! They need root and fail (never skip) without it.
use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nodeport_lab::{
    Config,
    lab::http_get,
    probe::{Exchange, Proto},
    sys,
    workload::Pod,
};

mod support;
use support::{ECHO, TestLab, agent_binary, require_root, sweep_stale};

const PREFIX: &str = "npon";
const T: Duration = Duration::from_secs(2);
const NODE_PORT: u16 = 30040;
/// Every way a client asks: TCP, UDP (unconnected and connected), and both from an IPv6 socket
/// to the IPv4-mapped address (dual-stack clients).
const PROTOS: [Proto; 5] = Proto::ALL;

/// Seed 003: `echo` (TCP and UDP 8080, nodePort 30040) pinned to the worker, `dnsutils` beside
/// it, and a second client pod on worker2.
const WORKLOAD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      nodeSelector: {nodeport-lab/node: worker}
      containers:
      - name: echo
        image: nodeport-echo
        ports:
        - {name: http, containerPort: 8080, protocol: TCP}
        - {name: udp, containerPort: 8080, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  type: NodePort
  selector: {app: echo}
  ports:
  - {name: http, port: 8080, targetPort: http, nodePort: 30040, protocol: TCP}
  - {name: udp, port: 8080, targetPort: udp, nodePort: 30040, protocol: UDP}
"#;

/// `web`: 3 replicas over the two workers, behind a Service without affinity (30050) and one
/// with ClientIP affinity (30051); `echo` behind an externalTrafficPolicy=Local Service (30052);
/// client pods on each worker.
const BALANCING: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - {name: web, image: nodeport-echo, ports: [{name: http, containerPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {port: 80, targetPort: http, nodePort: 30050}
---
apiVersion: v1
kind: Service
metadata: {name: web-sticky}
spec:
  type: NodePort
  sessionAffinity: ClientIP
  selector: {app: web}
  ports:
  - {port: 80, targetPort: http, nodePort: 30051}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      nodeSelector: {nodeport-lab/node: worker}
      containers:
      - {name: echo, image: nodeport-echo, ports: [{name: http, containerPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-local}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: echo}
  ports:
  - {port: 80, targetPort: http, nodePort: 30052}
"#;

/// The client pods of both workloads: `dnsutils` on the worker, `other` on worker2.
const CLIENT_PODS: &str = r#"
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: dnsutils}
spec:
  replicas: 1
  selector: {matchLabels: {app: dnsutils}}
  template:
    metadata: {labels: {app: dnsutils}}
    spec:
      nodeSelector: {nodeport-lab/node: worker}
      containers:
      - {name: dnsutils, image: nodeport-echo, ports: [{containerPort: 5353, protocol: UDP}]}
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
      - {name: other, image: nodeport-echo, ports: [{containerPort: 5353, protocol: UDP}]}
"#;

fn lab_up() -> TestLab {
    lab_up_with(WORKLOAD)
}

/// A lab running `workload` and the client pods.
fn lab_up_with(workload: &str) -> TestLab {
    let workload = format!("{workload}{CLIENT_PODS}");
    static NEXT: AtomicU32 = AtomicU32::new(0);
    require_root();
    sweep_stale(PREFIX);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("{PREFIX}{}-{n}", std::process::id());
    let work = std::env::temp_dir().join(format!("nodeport-own-node-{prefix}"));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("workload.yaml"), workload).unwrap();
    let cfg = Config::new(&prefix, work.clone(), agent_binary(), ECHO.into());
    let lab = match nodeport_lab::up(cfg.clone()) {
        Ok(lab) => lab,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            panic!("lab up: {e:#}");
        }
    };
    TestLab { lab, cfg, work }
}

/// The lab's nodes and pods by role.
struct Cast {
    cp: Ipv4Addr,
    worker: String,
    w_addr: Ipv4Addr,
    worker2: String,
    w2_addr: Ipv4Addr,
    echo: Pod,
    dnsutils: Pod,
    other: Pod,
}

impl TestLab {
    fn cast(&self) -> Cast {
        let node = |suffix: &str| {
            let name = format!("{}-{suffix}", self.cfg.prefix);
            let n = self.lab.node(&name).unwrap_or_else(|| panic!("no {name}"));
            (n.name, n.addr)
        };
        let pod = |deployment: &str| {
            let mut pods = self
                .lab
                .pods()
                .iter()
                .filter(|p| p.deployment == deployment);
            let p = pods.next().unwrap_or_else(|| panic!("no {deployment} pod"));
            assert!(pods.next().is_none(), "one {deployment} pod");
            p.clone()
        };
        let ((worker, w_addr), (worker2, w2_addr)) = (node("worker"), node("worker2"));
        let cast = Cast {
            cp: node("control-plane").1,
            worker,
            w_addr,
            worker2,
            w2_addr,
            echo: pod("echo"),
            dnsutils: pod("dnsutils"),
            other: pod("other"),
        };
        assert_eq!(cast.echo.node, cast.worker);
        assert_eq!(cast.dnsutils.node, cast.worker);
        assert_eq!(cast.other.node, cast.worker2);
        cast
    }

    fn exchange_from_pod(&self, pod: &Pod, addr: Ipv4Addr, proto: Proto) -> Exchange {
        let target = SocketAddrV4::new(addr, NODE_PORT);
        self.lab
            .exec_in_pod(&pod.name, target, proto, T)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn exchange_from_node(&self, node: &str, addr: Ipv4Addr, proto: Proto) -> Exchange {
        let target = SocketAddrV4::new(addr, NODE_PORT);
        self.lab
            .exec_on_node(node, target, proto, T)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The exchange reached the echo pod on `proto`'s port, and the client's socket names the
/// address it asked for (getpeername / recvfrom restored), not the pod.
fn assert_served(x: &Exchange, echo: &Pod, asked: Ipv4Addr, proto: Proto) {
    assert_eq!(x.answer.pod, echo.name, "{x:?}");
    assert_eq!(x.answer.port, 8080, "{x:?}");
    let wire = if matches!(proto, Proto::Tcp | Proto::TcpV4Mapped) {
        "TCP"
    } else {
        "UDP"
    };
    assert_eq!(x.answer.proto, wire, "{x:?}");
    assert_eq!(
        x.peer,
        SocketAddrV4::new(asked, NODE_PORT),
        "{proto}: {x:?}"
    );
}

#[test]
fn a_pod_reaches_the_service_on_every_node_address_its_own_included() {
    let t = lab_up();
    let c = t.cast();
    let packets_before = t.translated(&c.worker);
    let sock_before = t.sock(&c.worker, "sock_translated");
    let sock2_before = t.sock(&c.worker2, "sock_translated");

    // Seed 003: dnsutils (on the worker, beside the echo pod) to every node's address. Its own
    // node's address is translated at the syscall, so the pod sees dnsutils' own address; the
    // others are reached over the wire and source-NATed by that node's packet path, so the pod
    // sees that node's address.
    for addr in [c.cp, c.w_addr, c.w2_addr] {
        for proto in PROTOS {
            let x = t.exchange_from_pod(&c.dnsutils, addr, proto);
            assert_served(&x, &c.echo, addr, proto);
            let seen = if addr == c.w_addr {
                c.dnsutils.ip
            } else {
                addr
            };
            assert_eq!(x.answer.client, seen.to_string(), "{addr} {proto}: {x:?}");
            eprintln!(
                "{} -> {addr}:{NODE_PORT} {proto}: answered by {} ({}), which saw {}:{}; \
                 the client's socket names {}",
                c.dnsutils.name,
                x.answer.pod,
                x.answer.pod_ip,
                x.answer.client,
                x.answer.client_port,
                x.peer
            );
        }
    }
    // A pod on worker2 to worker2's address: translated there to the pod on the worker, routed
    // pod to pod (kindnet's routes), no NAT: the echo pod sees the other pod's address.
    for proto in PROTOS {
        let x = t.exchange_from_pod(&c.other, c.w2_addr, proto);
        assert_served(&x, &c.echo, c.w2_addr, proto);
        assert_eq!(x.answer.client, c.other.ip.to_string(), "{proto}: {x:?}");
    }

    // One translation per connect() (TCP, connected UDP) and per sendto(): one per way on each node,
    // counted by the socket programs of the client's own node only. The worker's packet path
    // translated nothing: dnsutils' packets to the other nodes leave through eth0's egress, and
    // their replies come back for dnsutils itself (reverse-translated by the node that served
    // them), never for a worker nodePort.
    assert_eq!(
        t.sock(&c.worker, "sock_translated") - sock_before,
        PROTOS.len() as u64
    );
    assert_eq!(
        t.sock(&c.worker2, "sock_translated") - sock2_before,
        PROTOS.len() as u64
    );
    assert_eq!(t.translated(&c.worker), packets_before);
    assert_eq!(t.sock(&c.worker, "sock_no_backend"), 0);
}

#[test]
fn a_process_on_the_node_reaches_its_own_address_and_the_client_namespace_keeps_the_packet_path() {
    let t = lab_up();
    let c = t.cast();
    let gateway = t.lab.node(&c.worker).unwrap().gateway();

    // A process on the worker (its cgroup, outside every pod) to the worker's address: sent to
    // the pod at connect()/sendto(), out of the pod's veth, so the pod sees the address the
    // node sends from on that veth, the pod gateway.
    let sock_before = t.sock(&c.worker, "sock_translated");
    let packets_before = t.translated(&c.worker);
    for proto in PROTOS {
        let x = t.exchange_from_node(&c.worker, c.w_addr, proto);
        assert_served(&x, &c.echo, c.w_addr, proto);
        assert_eq!(x.answer.client, gateway.to_string(), "{proto}: {x:?}");
    }
    assert_eq!(
        t.sock(&c.worker, "sock_translated") - sock_before,
        PROTOS.len() as u64
    );
    assert_eq!(t.translated(&c.worker), packets_before);

    // A process on worker2 to worker2's address: the backend is on the worker, reached via
    // worker2's eth0, so the pod sees worker2's address, without any NAT.
    for proto in PROTOS {
        let x = t.exchange_from_node(&c.worker2, c.w2_addr, proto);
        assert_served(&x, &c.echo, c.w2_addr, proto);
        assert_eq!(x.answer.client, c.w2_addr.to_string(), "{proto}: {x:?}");
    }

    // Control: the same node, but a thread of this test (in the worker's network namespace,
    // outside its cgroup). The socket programs never see it, the packets never cross eth0's
    // ingress: refused by the node's stack.
    let outside = sys::in_netns(&c.worker, || http_get(c.w_addr, NODE_PORT, T))
        .unwrap()
        .expect_err("a process outside the node's cgroup must not be served");
    assert_eq!(
        outside
            .root_cause()
            .downcast_ref::<std::io::Error>()
            .map(|e| e.kind()),
        Some(ErrorKind::ConnectionRefused),
        "{outside:#}"
    );

    // The client namespace (outside every node's cgroup) still goes through the worker's
    // packet path: a new flow per connection, no socket translation.
    let sock_before = t.sock(&c.worker, "sock_translated");
    let new_flow_before = t.counters(&c.worker)["new_flow"];
    for _ in 0..3 {
        let a = t.lab.get(c.w_addr, NODE_PORT, T).unwrap();
        assert_eq!(a.pod, c.echo.name);
        assert_eq!(a.client, nodeport_lab::CLIENT_ADDR.to_string(), "{a:?}");
    }
    let udp = t.lab.udp(c.w_addr, NODE_PORT, T).unwrap();
    assert_eq!(udp.client, nodeport_lab::CLIENT_ADDR.to_string(), "{udp:?}");
    assert_eq!(t.counters(&c.worker)["new_flow"] - new_flow_before, 4);
    assert_eq!(t.sock(&c.worker, "sock_translated"), sock_before);
}

#[test]
fn restarted_agents_keep_serving_pods_on_their_own_node() {
    let t = lab_up();
    let c = t.cast();
    let cgroup = t.cfg.node_cgroup(&c.worker).unwrap();
    let attached = || -> Vec<String> {
        let out = sys::run("bpftool", &["cgroup", "show", cgroup.to_str().unwrap()]).unwrap();
        let mut progs: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .filter(|name| name.starts_with("np_sk_"))
            .map(str::to_owned)
            .collect();
        progs.sort();
        progs
    };
    // connect, sendmsg, recvmsg and getpeername, for IPv4 and IPv6 sockets.
    let programs = attached();
    assert_eq!(programs.len(), 8, "the worker's cgroup: {programs:?}");
    let check = |when: &str| {
        for proto in PROTOS {
            let x = t
                .lab
                .exec_in_pod(
                    &c.dnsutils.name,
                    SocketAddrV4::new(c.w_addr, NODE_PORT),
                    proto,
                    T,
                )
                .unwrap_or_else(|e| panic!("{when}: {e}"));
            assert_served(&x, &c.echo, c.w_addr, proto);
            assert_eq!(x.answer.client, c.dnsutils.ip.to_string(), "{when}: {x:?}");
        }
    };
    // The agent's log line per socket program: "np_sk_connect4 on cgroup …: attached", then
    // "…: replaced in place" by every later agent.
    let log = t.cfg.agent_log(&c.worker);
    let swaps = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("np_sk_connect4 on cgroup")
            .count()
    };
    let restart = |when: &str| {
        let before = swaps();
        let pid = t.lab.agent_pid(&c.worker).expect("the worker's agent runs");
        sys::stop(pid, Duration::from_secs(10));
        assert!(t.lab.agent_pid(&c.worker).is_none());
        check(&format!("{when}, while the worker's agent is down"));
        t.lab.start_agent(&c.worker, &t.cfg.agent).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while swaps() == before {
            assert!(
                Instant::now() < deadline,
                "{when}: the restarted agent never reached the cgroup; its log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        t.lab.wait_synced(Duration::from_secs(30)).unwrap();
    };
    check("before the restarts");

    // The lab's restart path (the reliability scenario's: stop the agent, start it as the
    // DaemonSet would). The links are pinned, so pods are served while it is down too.
    restart("the first restart");
    check("after the first restart");
    // Swapped in place, not attached twice.
    assert_eq!(
        attached(),
        programs,
        "the worker's cgroup after the restart"
    );

    // Restarts under a pod's stream of new connections: none fails.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (done, failures) = std::thread::scope(|s| {
        let client = s.spawn(|| {
            let (mut done, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let target = SocketAddrV4::new(c.w_addr, NODE_PORT);
                match t.lab.exec_in_pod(&c.dnsutils.name, target, Proto::Tcp, T) {
                    Ok(x) if x.answer.pod == c.echo.name => done += 1,
                    Ok(x) => failures.push(format!("answered by {x:?}")),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (done, failures)
        });
        for n in 0..3 {
            restart(&format!("restart {n} under load"));
        }
        stop.store(true, Ordering::Relaxed);
        client.join().unwrap()
    });
    eprintln!("{done} connections through 3 restarts of the worker's agent");
    assert_eq!(failures, Vec::<String>::new());
    assert!(done > 3, "{done} exchanges");
    assert_eq!(attached(), programs);

    // `up` on a running lab restarts a dead agent the same way.
    sys::stop(t.lab.agent_pid(&c.worker).unwrap(), Duration::from_secs(10));
    let lab = nodeport_lab::up(t.cfg.clone()).unwrap();
    assert!(lab.agent_pid(&c.worker).is_some());
    check("after `up` restarted it");
    assert_eq!(attached(), programs);
}

#[test]
fn the_socket_path_balances_like_the_packet_path() {
    let t = lab_up_with(BALANCING);
    let node = |suffix: &str| {
        let n = t.lab.node(&format!("{}-{suffix}", t.cfg.prefix)).unwrap();
        (n.name, n.addr)
    };
    let ((_, w_addr), (worker2, w2_addr)) = (node("worker"), node("worker2"));
    let pod = |deployment: &str| {
        t.lab
            .pods()
            .iter()
            .find(|p| p.deployment == deployment)
            .unwrap()
            .clone()
    };
    let (dnsutils, other, echo) = (pod("dnsutils"), pod("other"), pod("echo"));
    let web: std::collections::BTreeSet<String> = t
        .lab
        .pods()
        .iter()
        .filter(|p| p.deployment == "web")
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(web.len(), 3);
    let get = |pod: &Pod, addr: Ipv4Addr, port: u16| {
        t.lab
            .exec_in_pod(&pod.name, SocketAddrV4::new(addr, port), Proto::Tcp, T)
    };

    // Every backend, local or on the other worker, is chosen (each new connect() picks a random
    // slot): 30 connections miss one of 3 backends with probability 3 * (2/3)^30, 1.5e-5.
    let mut seen = BTreeMap::<String, u32>::new();
    for _ in 0..30 {
        let x = get(&dnsutils, w_addr, 30050).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(x.answer.client, dnsutils.ip.to_string(), "{x:?}");
        *seen.entry(x.answer.pod).or_default() += 1;
    }
    eprintln!(
        "30 connections from {} to its node's address: {seen:?}",
        dnsutils.name
    );
    assert_eq!(
        seen.keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        web
    );

    // ClientIP affinity: every connection from the pod goes to the same backend.
    let sticky: std::collections::BTreeSet<String> = (0..10)
        .map(|_| {
            get(&dnsutils, w_addr, 30051)
                .unwrap_or_else(|e| panic!("{e}"))
                .answer
                .pod
        })
        .collect();
    assert_eq!(
        sticky.len(),
        1,
        "ClientIP affinity from one pod: {sticky:?}"
    );

    // externalTrafficPolicy=Local governs traffic from outside: from the client, worker2 (no
    // local endpoint) drops it. Traffic a node's own pods send is local-origin, which kube-proxy
    // sends to every endpoint (its KUBE-SVL chain is only for external sources): served from
    // either worker's pods, on their own node's address, without NAT.
    for (client, addr) in [(&dnsutils, w_addr), (&other, w2_addr)] {
        let x = get(client, addr, 30052).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(x.answer.pod, echo.name, "{x:?}");
        assert_eq!(x.answer.client, client.ip.to_string(), "{x:?}");
    }
    let from_client = t
        .lab
        .get(w2_addr, 30052, T)
        .expect_err("eTP Local, no local endpoint");
    assert!(
        nodeport_lab::lab::is_connect_failure(&from_client),
        "{from_client:#}"
    );
    assert_eq!(t.sock(&worker2, "sock_no_backend"), 0);
}
