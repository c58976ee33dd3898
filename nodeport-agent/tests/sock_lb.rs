//! Socket load balancing (docs/ARCHITECTURE.md, "Own node"): the real agent with `--cgroup`
//! serves nodePorts on the node's own address to processes in that cgroup, the node's own and its
//! pods', whose packets never cross the interface the XDP/TC programs are on. Real TCP and UDP
//! sockets: connect() reaches a backend and getpeername() still names the nodePort; unconnected
//! UDP sendto()/recvfrom() likewise; the backend sees the client's own address (no NAT on the
//! wire); a service without endpoints is refused at once; the programs keep working with the agent
//! killed, a restarted agent swaps them in place, and unload takes them off the cgroup.
//!
//! This binary holds one test on purpose: it moves its own process into the test's cgroup
//! (membership is per process, and sockets take the cgroup of the process that creates them).
mod support;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use nodeport_agent::{PinLayout, Stats};
use nodeport_common::SockCounter;
use serde_json::{Value, json};
use support::{
    agent::{AGENT, Agent, Pins, wait_for},
    netns::{NODE, Ns, Topology, require_root},
};

const POD1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const WEB: u16 = 30080;
const DNS: u16 = 30053;
const EMPTY: u16 = 30090;
/// externalTrafficPolicy=Local, POD1 on this node and POD2 listed on another.
const LOCAL: u16 = 30081;
/// externalTrafficPolicy=Local, only POD2, listed on another node.
const LOCAL_ELSEWHERE: u16 = 30082;
const T: Duration = Duration::from_secs(2);

fn manifests() -> String {
    let svc = |name: &str, proto: &str, node_port: u16, target: u16| {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"namespace": "default", "name": name},
               "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                        "ports": [{"name": "p", "port": 80, "targetPort": target,
                                   "protocol": proto, "nodePort": node_port}]}})
    };
    let etp_local = |mut svc: Value| {
        svc["spec"]["externalTrafficPolicy"] = json!("Local");
        svc
    };
    let slice = |name: &str, proto: &str, port: u16, pods: &[Ipv4Addr]| {
        // POD2 counts as another node's pod for the eTP=Local services (it is reachable from
        // this node all the same, as another node's pods are).
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|a| {
                let node = if name.starts_with("local") && *a == POD2 {
                    "node-b"
                } else {
                    "node-a"
                };
                json!({"addresses": [a.to_string()], "nodeName": node,
                       "conditions": {"ready": true}})
            })
            .collect();
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"namespace": "default", "name": format!("{name}-1"),
                            "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4", "endpoints": endpoints,
               "ports": [{"name": "p", "port": port, "protocol": proto}]})
    };
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                      "status": {"addresses": [{"type": "InternalIP", "address": NODE.to_string()}]}});
    [
        node,
        svc("web", "TCP", WEB, 8080),
        slice("web", "TCP", 8080, &[POD1, POD2]),
        svc("dns", "UDP", DNS, 8081),
        slice("dns", "UDP", 8081, &[POD1, POD2]),
        svc("empty", "TCP", EMPTY, 8080),
        slice("empty", "TCP", 8080, &[]),
        etp_local(svc("local", "TCP", LOCAL, 8080)),
        slice("local", "TCP", 8080, &[POD1, POD2]),
        etp_local(svc("local-elsewhere", "TCP", LOCAL_ELSEWHERE, 8080)),
        slice("local-elsewhere", "TCP", 8080, &[POD2]),
    ]
    .iter()
    .map(|v| format!("---\n{}", serde_yaml_ng::to_string(v).unwrap()))
    .collect()
}

/// A cgroup for this test; the process is moved back out and the cgroup removed on drop.
struct Cgroup {
    path: PathBuf,
    home: PathBuf,
}

impl Cgroup {
    fn new(name: &str) -> Self {
        let mount = nodeport_agent::cgroup::cgroup2_mount()
            .expect("no cgroup2 mount: socket load balancing needs cgroup v2");
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("no cgroup v2 entry in /proc/self/cgroup");
        let home = mount.join(rel.trim_start_matches('/'));
        let path = mount.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).unwrap();
        Self { path, home }
    }

    fn enter(&self) {
        move_self(&self.path);
    }

    fn leave(&self) {
        move_self(&self.home);
    }
}

fn move_self(cgroup: &Path) {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .unwrap_or_else(|e| panic!("moving into {}: {e}", cgroup.display()));
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.leave();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A UDP echo in `pod`: answers each datagram with "<pod ip> <peer>".
fn serve_udp(pod: &Ns, addr: Ipv4Addr, port: u16, stop: Arc<AtomicBool>) {
    let socket = pod.run(move || UdpSocket::bind(SocketAddrV4::new(addr, port)).unwrap());
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(format!("{addr} {peer}").as_bytes(), peer);
            }
        }
    });
}

/// What one TCP exchange through the nodePort showed: the socket's peer (getpeername), its own
/// address, and the pod's answer "<pod ip> <the peer the pod saw>".
struct Exchange {
    peer: SocketAddr,
    local: SocketAddr,
    pod: String,
    pod_saw: String,
}

fn tcp_exchange(port: u16) -> std::io::Result<Exchange> {
    let s = TcpStream::connect_timeout(&SocketAddrV4::new(NODE, port).into(), T)?;
    s.set_read_timeout(Some(T))?;
    let (peer, local) = (s.peer_addr()?, s.local_addr()?);
    (&s).write_all(b"hi\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let mut words = line.split_whitespace().map(str::to_owned);
    Ok(Exchange {
        peer,
        local,
        pod: words.next().unwrap_or_default(),
        pod_saw: words.next().unwrap_or_default(),
    })
}

/// Unconnected UDP: three sendto()s to the nodePort from one socket, each answered; returns who
/// each answer came from (as the application sees it) and the pod that answered.
fn udp_unconnected() -> std::io::Result<Vec<(SocketAddr, String)>> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(T))?;
    let mut answers = Vec::new();
    for _ in 0..3 {
        s.send_to(b"q", SocketAddrV4::new(NODE, DNS))?;
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf)?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let pod = text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        answers.push((from, pod));
    }
    Ok(answers)
}

fn udp_connected() -> std::io::Result<(SocketAddr, String)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(T))?;
    s.connect(SocketAddrV4::new(NODE, DNS))?;
    s.send(b"q")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    Ok((
        s.peer_addr()?,
        String::from_utf8_lossy(&buf[..n]).into_owned(),
    ))
}

fn sock(pins: &Pins, c: SockCounter) -> u64 {
    Stats::read_pinned(&PinLayout::new(&pins.root))
        .unwrap()
        .sock(c)
}

/// Connections from inside the cgroup, through the node's own address: every check of the
/// module doc. `from` runs a closure in the node or a pod namespace.
fn check_served(who: &str, run: &dyn Fn(Box<dyn FnOnce() -> String + Send>) -> String) {
    let report = run(Box::new(|| {
        let mut pods = BTreeSet::new();
        for _ in 0..40 {
            let x = tcp_exchange(WEB).unwrap_or_else(|e| panic!("TCP to {NODE}:{WEB}: {e}"));
            assert_eq!(x.peer, SocketAddr::from((NODE, WEB)), "getpeername");
            // No NAT on the wire: the pod saw this socket's own address.
            assert_eq!(x.pod_saw, x.local.to_string(), "what the pod saw");
            pods.insert(x.pod);
        }
        let want: BTreeSet<String> = [POD1, POD2].iter().map(|p| p.to_string()).collect();
        assert_eq!(pods, want, "40 connections reach both backends");

        // Each socket keeps its backend for every datagram (as a conntrack'd UDP flow would);
        // thirty sockets spread over both (all on one: a 2^-29 chance).
        let mut udp_pods = BTreeSet::new();
        for _ in 0..30 {
            let answers = udp_unconnected().expect("unconnected UDP");
            for (from, _) in &answers {
                assert_eq!(
                    *from,
                    SocketAddr::from((NODE, DNS)),
                    "recvfrom names the nodePort"
                );
            }
            let pods: BTreeSet<&String> = answers.iter().map(|(_, p)| p).collect();
            assert_eq!(pods.len(), 1, "one socket, one backend: {answers:?}");
            udp_pods.extend(pods.into_iter().cloned());
        }
        assert_eq!(udp_pods, want, "thirty UDP sockets reach both backends");
        let (peer, answer) = udp_connected().expect("connected UDP");
        assert_eq!(peer, SocketAddr::from((NODE, DNS)));
        assert!(
            answer.starts_with(&format!("{POD1} ")) || answer.starts_with(&format!("{POD2} ")),
            "{answer}"
        );

        // Dual-stack clients: an IPv6 socket naming the node as ::ffff:<address> (the …6 hooks
        // for TCP and recvfrom; the kernel hands a v4-mapped sendto to the sendmsg4 hook).
        let mapped = |port| SocketAddr::from((NODE.to_ipv6_mapped(), port));
        let s6 = TcpStream::connect_timeout(&mapped(WEB), T).expect("TCP6 to the mapped address");
        assert_eq!(s6.peer_addr().unwrap(), mapped(WEB), "getpeername on IPv6");
        s6.set_read_timeout(Some(T)).unwrap();
        (&s6).write_all(b"hi\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s6).read_line(&mut line).unwrap();
        assert!(
            want.iter().any(|p| line.starts_with(&format!("{p} "))),
            "{line}"
        );
        let u6 = UdpSocket::bind("[::]:0").expect("an IPv6 UDP socket");
        u6.set_read_timeout(Some(T)).unwrap();
        u6.send_to(b"q", mapped(DNS)).unwrap();
        let mut buf = [0u8; 512];
        let (_, from) = u6.recv_from(&mut buf).expect("UDP6 answer");
        assert_eq!(from, mapped(DNS), "recvfrom on IPv6 names the nodePort");

        let refused = tcp_exchange(EMPTY).err().map(|e| e.kind());
        assert_eq!(refused, Some(ErrorKind::ConnectionRefused), "no endpoints");
        let refused = tcp_exchange(30999).err().map(|e| e.kind());
        assert_eq!(
            refused,
            Some(ErrorKind::ConnectionRefused),
            "not a nodePort"
        );
        format!("{pods:?}")
    }));
    println!("{who}: served, backends {report}");
}

#[test]
fn the_nodes_own_processes_and_pods_reach_its_node_ports() {
    require_root();
    let net = Topology::new("npsk", &[POD1, POD2]);
    let stop = Arc::new(AtomicBool::new(false));
    serve_udp(&net.pods[0], POD1, 8081, stop.clone());
    serve_udp(&net.pods[1], POD2, 8081, stop.clone());
    let pins = Pins::new("npsk");
    let dir = pins.work.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("objects.yaml"), manifests()).unwrap();
    let cgroup = Cgroup::new("npsk");
    let cg = cgroup.path.to_str().unwrap().to_owned();
    let source = ["--manifests", dir.to_str().unwrap(), "--cgroup", &cg];
    let log = pins.work.join("agent.log");
    let agent = Agent::start(&net.node, &source, &pins.root, &log);
    wait_for(
        "services in the maps",
        &agent,
        Duration::from_secs(30),
        || pins.services().len() == 5,
    );
    wait_for("socket programs attached", &agent, T * 5, || {
        agent.log().contains("np_sk_connect4 on cgroup")
    });

    // Outside the cgroup nothing changes: the node's own connection is refused as before.
    let outside = net.node.run(|| tcp_exchange(WEB).err().map(|e| e.kind()));
    assert_eq!(outside, Some(ErrorKind::ConnectionRefused));
    // From outside the node (the packet path), externalTrafficPolicy=Local means this node's
    // endpoints only, and none here is a drop. (Checked before this process joins the cgroup:
    // there, the socket programs would translate the client namespace's connections too.)
    let from_client = net.client.run(|| {
        let pods: BTreeSet<String> = (0..20)
            .map(|_| {
                tcp_exchange(LOCAL)
                    .expect("client to the eTP=Local service")
                    .pod
            })
            .collect();
        (pods, tcp_exchange(LOCAL_ELSEWHERE).err().map(|e| e.kind()))
    });
    assert_eq!(from_client.0, BTreeSet::from([POD1.to_string()]));
    assert_eq!(
        from_client.1,
        Some(ErrorKind::TimedOut),
        "no local endpoint: dropped"
    );

    cgroup.enter();
    let node = &net.node;
    check_served("the node itself", &|f| node.run(f));
    let pod2 = &net.pods[1];
    check_served("a pod on the node", &|f| pod2.run(f));
    // Per check: 40 TCP connects, 90 UDP sendto()s, a UDP connect and the two IPv6 calls
    // translated; 40 getpeername()s, 90 recvfrom()s, a getpeername() and the two IPv6 calls
    // restored; one connect to the service without endpoints.
    let counted = SockCounter::ALL.map(|c| (c.name(), sock(&pins, c)));
    println!("socket counters: {counted:?}");
    assert_eq!(
        counted,
        [
            ("sock_translated", 2 * 133),
            ("sock_no_backend", 2),
            ("sock_restored", 2 * 133),
            ("sock_nat_insert_failed", 0)
        ]
    );

    // The node's own clients of an externalTrafficPolicy=Local service reach every endpoint of
    // the cluster, as kube-proxy routes them (its "short-circuit" to the cluster chain).
    let own = node.run(|| {
        let pods: BTreeSet<String> = (0..40)
            .map(|_| {
                tcp_exchange(LOCAL)
                    .expect("node to the eTP=Local service")
                    .pod
            })
            .collect();
        let elsewhere = tcp_exchange(LOCAL_ELSEWHERE).expect("node to the one on another node");
        (pods, elsewhere.pod)
    });
    let both: BTreeSet<String> = [POD1, POD2].iter().map(|p| p.to_string()).collect();
    assert_eq!(own.0, both);
    assert_eq!(own.1, POD2.to_string());

    // The programs are pinned: with the agent killed they keep serving; a new agent swaps them.
    drop(agent);
    check_served("the node, no agent running", &|f| node.run(f));
    let agent = Agent::start(&net.node, &source, &pins.root, &log);
    wait_for("socket programs replaced in place", &agent, T * 15, || {
        agent.log().matches("np_sk_connect4 on cgroup").count() >= 2
            && agent.log().contains("replaced in place")
    });
    check_served("the node, after a restart", &|f| node.run(f));

    // Unload takes the programs off the cgroup.
    drop(agent);
    let out = std::process::Command::new(AGENT)
        .args(["unload", "--pin-root", &pins.root])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = net.node.run(|| tcp_exchange(WEB).err().map(|e| e.kind()));
    assert_eq!(after, Some(ErrorKind::ConnectionRefused), "after unload");
    stop.store(true, Ordering::Relaxed);
}
