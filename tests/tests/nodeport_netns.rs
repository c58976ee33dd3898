//! End-to-end tests of the dataplane with real sockets, in network namespaces.
//!
//! Each test builds its own lab and tears it down on drop (also when it panics):
//!
//! ```text
//!                      lan (bridge br0)
//!          +----------------+----------------+
//!   node1 eth0 198.18.0.2   node2 eth0 198.18.0.3   client eth0 198.18.0.100
//!          | vp0                   | vp0  | vp1
//!   pod1 10.244.1.10        pod2 10.244.2.10  pod3 10.244.2.11
//! ```
//!
//! Pod CIDRs are 10.244.1.0/24 on node1 and 10.244.2.0/24 on node2; each node routes the other's
//! pod CIDR via the other node (kindnet style); the client routes the pod CIDRs via their nodes
//! (only used to show that traffic not for a nodePort is untouched). Every pod runs a TCP and a
//! UDP echo server on 8080 that answers which pod it is and which peer address it saw. Each node
//! loads its own dataplane under its own pin root and attaches it to its `eth0`.
//!
//! Addresses are TEST-NET (198.18.0.0/15) and 10.244.0.0/16, inside the namespaces only.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nodeport_agent::{
    AttachPlan, Dataplane, Ingress, PinLayout, Stats, TcBackend, XdpAttachMode,
    tables::{BackendEntry, ServiceEntry, ServiceTables},
};
use nodeport_common::{
    BACKEND_LOCAL, Config, Counter, FRONTEND_ETP_LOCAL, IPPROTO_TCP, IPPROTO_UDP,
};

const NODE1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const NODE2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// A second address of node1 that is *not* a NodePort address.
const NODE1_OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const POD1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const POD3: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);

const POD_PORT: u16 = 8080;
const TCP_NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30081;
const SSH_PORT: u16 = 2222;

const SVC_TCP: u32 = 1;
const SVC_UDP: u32 = 2;

const SNAT_MIN: u16 = 61000;
const SNAT_MAX: u16 = 65535;

/// Connections (and UDP sockets) per node in the load-balancing tests: with two backends, the
/// chance that one of them is never picked is 2^-39.
const FLOWS_PER_NODE: usize = 40;

/// Padding of large requests and answers: about 1.2 kB, one full-size segment or datagram.
const LARGE: usize = 1200;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(2);

const CONFIG: Config = Config {
    snat_port_min: SNAT_MIN,
    snat_port_max: SNAT_MAX,
    flags: 0,
    tcp_syn_timeout_s: 60,
    tcp_established_timeout_s: 21600,
    tcp_close_timeout_s: 10,
    udp_timeout_s: 60,
};

// ---------------------------------------------------------------------------------------------
// Namespaces, commands
// ---------------------------------------------------------------------------------------------

const NS_PREFIX: &str = "npn";

fn require_kernel() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these tests need root (euid is {euid}): they create network namespaces and load eBPF \
         programs; run them as root (CI does)"
    );
    if let Err(e) = nodeport_agent::pin::ensure_bpffs(Path::new("/sys/fs/bpf")) {
        panic!(
            "these tests need bpffs at /sys/fs/bpf ({e}): `mount -t bpf bpf /sys/fs/bpf` \
             (scripts/setup.sh does)"
        );
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/setup.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unique() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A named network namespace (`ip netns add`, so `ip -n` and a human debugging can see it),
/// deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(lab: &str, tag: &str) -> Self {
        let name = format!("{lab}-{tag}");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        // Quiet namespaces: no IPv6 (router solicitations, DAD) on any interface made later,
        // forwarding on (nodes route), no reverse-path filtering (a distribution's default of
        // strict rp_filter must never be what a failure is about).
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn exec(&self, cmd: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(cmd);
        run("ip", &all)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created in `f` belong to
    /// the namespace for their whole life, wherever they are used afterwards.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        let file = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: a valid namespace fd; setns(CLONE_NEWNET) changes this thread only.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "cleanup: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cleanup: ip netns del {}: {e}", self.name),
        }
    }
}

/// Deletes namespaces and pin roots left by earlier runs of these tests that were killed before
/// their guards ran: names carry the pid, so one whose process is gone is an orphan.
fn sweep_stale() {
    let orphan = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            })
    };
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if orphan(&name, &format!("{NS_PREFIX}-")) {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if orphan(&name, "np-netns-test-") {
                let _ = nodeport_agent::unload(&PinLayout::new(e.path()), true);
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------------

/// A node: its namespace and its dataplane's pin root (unloaded on drop, before the namespace
/// goes).
struct Node {
    layout: PinLayout,
    ns: Netns,
    addr: Ipv4Addr,
}

impl Drop for Node {
    fn drop(&mut self) {
        // Inside the node's namespace, so netlink filters (if the kernel had no tcx) are found on
        // the node's eth0, never on an interface of the same name elsewhere.
        let layout = self.layout.clone();
        let ns_path = self.ns.path();
        let unloaded = std::thread::spawn(move || {
            if let Ok(f) = File::open(&ns_path) {
                // SAFETY: as in Netns::run.
                unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            }
            nodeport_agent::unload(&layout, true)
        })
        .join();
        if !matches!(unloaded, Ok(Ok(_))) {
            eprintln!(
                "cleanup: unload {}: {unloaded:?}",
                self.layout.root().display()
            );
        }
        let root = self.layout.root();
        if root.exists()
            && let Err(e) = std::fs::remove_dir_all(root)
        {
            eprintln!("cleanup: removing {}: {e}", root.display());
        }
    }
}

struct Pod {
    ns: Netns,
    addr: Ipv4Addr,
    /// Index into `Lab::nodes`.
    node: usize,
    /// Backend id of this pod in both nodes' tables.
    backend_id: u32,
}

/// The whole topology. Field order is drop order: servers stop first (`Drop for Lab`), then the
/// nodes unload and go, then pods, the client and the bridge.
struct Lab {
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    client: Netns,
    _lan: Netns,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
    }
}

impl Lab {
    /// Builds the topology, starts the pods' servers, loads and attaches a dataplane on each
    /// node with `ingress`, and writes the config and node address (no services yet).
    fn new(ingress: Ingress) -> Self {
        require_kernel();
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_stale);
        let id = format!("{NS_PREFIX}-{}-{}", std::process::id(), unique());

        let lan = Netns::new(&id, "lan");
        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.ip(&["link", "set", "br0", "up"]);
        // Every namespace on the LAN gets eth0, whose peer is a port of br0.
        let join_lan = |ns: &Netns, port: &str, cidr: &str| {
            lan.ip(&[
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ]);
            lan.ip(&["link", "set", port, "master", "br0", "up"]);
            ns.ip(&["addr", "add", cidr, "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        };

        let client = Netns::new(&id, "cl");
        join_lan(&client, "pcl", &format!("{CLIENT}/24"));
        // The bridge's port towards the client computes checksums in software, as a physical NIC
        // on the way to a real client would: veth hands CHECKSUM_PARTIAL packets from end to end
        // and receivers trust them, so without a hop that finalizes checksums a wrong checksum
        // written by the dataplane (into a CHECKSUM_PARTIAL packet, say) would go unnoticed.
        // With it, the client's stack verifies every translated reply it gets.
        lan.exec(&["ethtool", "-K", "pcl", "tx", "off"]);
        client.ip(&["route", "add", "10.244.1.0/24", "via", &NODE1.to_string()]);
        client.ip(&["route", "add", "10.244.2.0/24", "via", &NODE2.to_string()]);

        let mut nodes = Vec::new();
        for (i, addr) in [NODE1, NODE2].into_iter().enumerate() {
            let n = i + 1;
            let ns = Netns::new(&id, &format!("n{n}"));
            let layout = PinLayout::new(format!(
                "/sys/fs/bpf/np-netns-test-{}-{}-node{n}",
                std::process::id(),
                unique()
            ));
            join_lan(&ns, &format!("pn{n}"), &format!("{addr}/24"));
            nodes.push(Node { layout, ns, addr });
        }
        nodes[0]
            .ns
            .ip(&["route", "add", "10.244.2.0/24", "via", &NODE2.to_string()]);
        nodes[1]
            .ns
            .ip(&["route", "add", "10.244.1.0/24", "via", &NODE1.to_string()]);

        let mut pods = Vec::new();
        for (i, (addr, node)) in [(POD1, 0), (POD2, 1), (POD3, 1)].into_iter().enumerate() {
            let ns = Netns::new(&id, &format!("p{}", i + 1));
            let node_ns = &nodes[node].ns;
            let gw = Ipv4Addr::new(10, 244, node as u8 + 1, 1).to_string();
            let host_if = format!(
                "vp{}",
                pods.iter().filter(|p: &&Pod| p.node == node).count()
            );
            node_ns.ip(&[
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ]);
            node_ns.ip(&["addr", "add", &format!("{gw}/32"), "dev", &host_if]);
            node_ns.ip(&["link", "set", &host_if, "up"]);
            node_ns.ip(&["route", "add", &format!("{addr}/32"), "dev", &host_if]);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "default", "via", &gw]);
            pods.push(Pod {
                ns,
                addr,
                node,
                backend_id: i as u32 + 1,
            });
        }

        let mut lab = Self {
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            nodes,
            pods,
            client,
            _lan: lan,
        };
        if matches!(ingress, Ingress::Xdp(_)) {
            // XDP cannot see an skb's checksum state: its incremental updates assume complete
            // checksums, which is what a physical NIC (native XDP's home) delivers. A veth hands
            // on CHECKSUM_PARTIAL packets instead, so here every sender computes full checksums,
            // as a remote host behind a NIC would. TC mode needs none of this (its helpers handle
            // partial checksums), and the agent chooses TC on veths (docs/ARCHITECTURE.md).
            lab.client.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
            for pod in &lab.pods {
                pod.ns.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
            }
        }
        for i in 0..lab.pods.len() {
            let addr = SocketAddrV4::new(lab.pods[i].addr, POD_PORT);
            let (tcp, udp) = lab.pods[i].ns.run(move || {
                (
                    TcpListener::bind(addr).expect("pod TCP listener"),
                    UdpSocket::bind(addr).expect("pod UDP socket"),
                )
            });
            lab.serve_tcp(tcp);
            lab.serve_udp(udp);
        }
        for node in &lab.nodes {
            let layout = node.layout.clone();
            node.ns.run(move || {
                let mut dp = Dataplane::load(&layout).expect("loading the dataplane");
                let plan = AttachPlan {
                    ingress,
                    egress: true,
                    tc_backend: TcBackend::Auto,
                };
                dp.attach_interface("eth0", &plan)
                    .expect("attaching to eth0");
                let mut t = ServiceTables::open(&layout.dir()).expect("opening the maps");
                t.set_config(&CONFIG).expect("config");
            });
            if let Ingress::Xdp(mode) = ingress {
                let link = node.ns.ip(&["-d", "link", "show", "dev", "eth0"]);
                let want = match mode {
                    XdpAttachMode::Generic => "xdpgeneric",
                    XdpAttachMode::Native => "xdp ",
                };
                assert!(link.contains(want), "no {want} program on eth0: {link}");
            }
            node.tables()
                .set_node_addrs(&[node.addr])
                .expect("node address");
        }
        lab
    }

    fn pod(&self, addr: Ipv4Addr) -> &Pod {
        self.pods.iter().find(|p| p.addr == addr).expect("a pod")
    }

    fn node_of(&self, addr: Ipv4Addr) -> &Node {
        self.nodes.iter().find(|n| n.addr == addr).expect("a node")
    }

    /// Writes `pods` as backends of both services on `node` (BACKEND_LOCAL for the pods on that
    /// node) and the services with those backends in that order.
    fn set_services(&self, node: usize, pods: &[Ipv4Addr], flags: u16) {
        let mut t = self.nodes[node].tables();
        let mut ids = Vec::new();
        for &addr in pods {
            let pod = self.pod(addr);
            let local = if pod.node == node { BACKEND_LOCAL } else { 0 };
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                t.put_backend(
                    backend_id(pod.backend_id, proto),
                    BackendEntry {
                        addr: SocketAddrV4::new(pod.addr, POD_PORT),
                        proto,
                        flags: local,
                    },
                )
                .expect("put_backend");
            }
            ids.push(pod.backend_id);
        }
        for (svc_id, proto, node_port) in [
            (SVC_TCP, IPPROTO_TCP, TCP_NODE_PORT),
            (SVC_UDP, IPPROTO_UDP, UDP_NODE_PORT),
        ] {
            t.put_service(&ServiceEntry {
                node_port,
                proto,
                svc_id,
                flags,
                affinity_timeout_s: 0,
                backends: ids.iter().map(|&id| backend_id(id, proto)).collect(),
                cluster_backends: Vec::new(),
            })
            .expect("put_service");
        }
    }

    /// Both pods of the default setup (pod1 on node1, pod2 on node2) behind both services on
    /// both nodes.
    fn set_default_services(&self) {
        for node in 0..self.nodes.len() {
            self.set_services(node, &[POD1, POD2], 0);
        }
    }

    fn serve_tcp(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = self.stop.clone();
        self.servers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let stop = stop.clone();
                        std::thread::spawn(move || echo_tcp(conn, peer, &stop));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        }));
    }

    fn serve_udp(&mut self, socket: UdpSocket) {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let stop = self.stop.clone();
        self.servers.push(std::thread::spawn(move || {
            let me = socket.local_addr().expect("local addr");
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                match socket.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let _ = socket.send_to(answer(me, peer, &req).as_bytes(), peer);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("recv_from: {e}"),
                }
            }
        }));
    }

    /// Counters of every node, for failure messages.
    fn report(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&format!("--- counters of node {}:\n", n.addr));
            match n.stats() {
                Ok(s) => {
                    for (c, t) in s.iter().filter(|(_, t)| t.packets > 0) {
                        out.push_str(&format!("  {:24} {}\n", c.name(), t.packets));
                    }
                }
                Err(e) => out.push_str(&format!("  unreadable: {e}\n")),
            }
        }
        out
    }
}

impl Node {
    fn tables(&self) -> ServiceTables {
        ServiceTables::open(&self.layout.dir()).expect("opening the pinned maps")
    }

    fn stats(&self) -> Result<Stats, nodeport_agent::Error> {
        Stats::read_pinned(&self.layout)
    }

    fn counter(&self, c: Counter) -> u64 {
        self.stats().expect("reading np_stats").get(c).packets
    }
}

/// Backends of the TCP and UDP services are separate entries (a backend has one protocol).
fn backend_id(pod_id: u32, proto: u8) -> u32 {
    if proto == IPPROTO_TCP {
        pod_id
    } else {
        100 + pod_id
    }
}

// ---------------------------------------------------------------------------------------------
// The echo protocol
// ---------------------------------------------------------------------------------------------

/// The request: `who <pad x's>`. The pad makes both directions carry as much data as wanted,
/// so packets larger than their headers (payload in skb fragments) are exercised too.
fn request(pad: usize) -> String {
    format!("who {}", "x".repeat(pad))
}

/// What a pod answers to `request`: which pod it is, whom it saw, and as many bytes as it got.
fn answer(me: SocketAddr, peer: SocketAddr, request: &str) -> String {
    let pad = request.trim_end().strip_prefix("who ").map_or(0, str::len);
    format!("{} {} {}\n", me.ip(), peer, "y".repeat(pad))
}

/// One answer of a pod, as the client received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    /// The pod that answered.
    pod: Ipv4Addr,
    /// The peer address the pod saw.
    peer: SocketAddrV4,
    /// The client's own address of this flow.
    client: SocketAddrV4,
}

fn parse_answer(text: &str, client: SocketAddr, pad: usize) -> std::io::Result<Seen> {
    let bad = |what: &str| {
        std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "{what} in answer {:?}",
                text.chars().take(80).collect::<String>()
            ),
        )
    };
    let mut parts = text.trim_end().split(' ');
    let pod = parts.next().and_then(|p| p.parse().ok());
    let peer = parts.next().and_then(|p| p.parse().ok());
    let echoed = parts.next().map_or(0, str::len);
    let SocketAddr::V4(client) = client else {
        return Err(bad("IPv6 client"));
    };
    if echoed != pad {
        return Err(bad(&format!("{echoed} bytes echoed instead of {pad}")));
    }
    match (pod, peer) {
        (Some(pod), Some(peer)) => Ok(Seen { pod, peer, client }),
        _ => Err(bad("no pod or peer")),
    }
}

/// Answers every request line on `conn` until the client closes or the lab stops.
fn echo_tcp(conn: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    let me = conn.local_addr().expect("local addr");
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        // A read that times out keeps what it read so far in `line`.
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                if writer
                    .write_all(answer(me, peer, &line).as_bytes())
                    .is_err()
                {
                    return;
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A client TCP connection (created in the client namespace) that asks and reads answers.
struct Conn {
    reader: BufReader<TcpStream>,
    local: SocketAddr,
}

impl Conn {
    fn open(client: &Netns, dst: SocketAddrV4) -> std::io::Result<Self> {
        client.run(|| Self::connect(dst))
    }

    /// Connects from the calling thread's namespace.
    fn connect(dst: SocketAddrV4) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&dst.into(), CONNECT_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let local = s.local_addr()?;
        Ok(Self {
            reader: BufReader::new(s),
            local,
        })
    }

    /// Sends a request with `pad` bytes of padding and reads the answer.
    fn ask(&mut self, pad: usize) -> std::io::Result<Seen> {
        self.reader
            .get_mut()
            .write_all(format!("{}\n", request(pad)).as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        parse_answer(&line, self.local, pad)
    }
}

/// One TCP connection: connect, ask once, close. Runs in the calling thread's namespace.
fn tcp_once(dst: SocketAddrV4, pad: usize) -> std::io::Result<Seen> {
    Conn::connect(dst)?.ask(pad)
}

/// One UDP exchange from a fresh socket. The answer must come from `dst` itself.
fn udp_once(dst: SocketAddrV4, pad: usize) -> std::io::Result<Seen> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.connect(dst)?; // only datagrams from dst are received
    let local = s.local_addr()?;
    s.send(request(pad).as_bytes())?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf)?;
    parse_answer(&String::from_utf8_lossy(&buf[..n]), local, pad)
}

/// One exchange of `proto` with `dst`.
fn once(proto: u8, dst: SocketAddrV4, pad: usize) -> std::io::Result<Seen> {
    if proto == IPPROTO_TCP {
        tcp_once(dst, pad)
    } else {
        udp_once(dst, pad)
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// What a backend must have seen for a flow from the client through `node`: the client itself
/// (DNAT only) for a pod on that node; the node address with the client's port or one from the
/// SNAT range for a pod elsewhere.
fn check_seen(lab: &Lab, node: Ipv4Addr, seen: &Seen) -> Result<(), String> {
    let pod = lab.pod(seen.pod);
    let local = lab.nodes[pod.node].addr == node;
    let ok = if local {
        seen.peer == seen.client && *seen.client.ip() == CLIENT
    } else {
        *seen.peer.ip() == node
            && ((SNAT_MIN..=SNAT_MAX).contains(&seen.peer.port())
                || seen.peer.port() == seen.client.port())
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "through node {node}, {} pod {} saw {} for client {}",
            if local { "local" } else { "remote" },
            seen.pod,
            seen.peer,
            seen.client
        ))
    }
}

/// Many flows of `proto` through each node, alternately with small and large requests and
/// answers: every answer arrives, both pods serve, every pod saw the right peer. Stops at the
/// third failed flow (each costs a timeout).
fn balance_through_both_nodes(lab: &Lab, proto: u8) {
    let (port, name) = if proto == IPPROTO_TCP {
        (TCP_NODE_PORT, "TCP")
    } else {
        (UDP_NODE_PORT, "UDP")
    };
    for node in [NODE1, NODE2] {
        let dst = SocketAddrV4::new(node, port);
        let (seen, failed) = lab.client.run(|| {
            let (mut seen, mut failed) = (Vec::new(), Vec::new());
            for i in 0..FLOWS_PER_NODE {
                let pad = if i % 2 == 0 { 0 } else { LARGE };
                match once(proto, dst, pad) {
                    Ok(s) => seen.push(s),
                    Err(e) => failed.push(format!("flow #{i} ({pad} bytes padding): {e}")),
                }
                if failed.len() >= 3 {
                    break;
                }
            }
            (seen, failed)
        });
        assert!(
            failed.is_empty(),
            "{name} to {dst}: flows failed: {failed:#?}\n({} succeeded)\n{}",
            seen.len(),
            lab.report()
        );
        let wrong: Vec<String> = seen
            .iter()
            .filter_map(|s| check_seen(lab, node, s).err())
            .collect();
        assert!(wrong.is_empty(), "{name} to {dst}: {wrong:#?}");
        for pod in [POD1, POD2] {
            assert!(
                seen.iter().any(|s| s.pod == pod),
                "{name} to {dst}: pod {pod} never answered in {FLOWS_PER_NODE} flows: {seen:?}"
            );
        }
    }
}

fn assert_no_drops(lab: &Lab) {
    for n in &lab.nodes {
        let stats = n.stats().expect("np_stats");
        let drops: Vec<_> = stats
            .iter()
            .filter(|(c, t)| c.is_drop() && t.packets > 0)
            .map(|(c, t)| format!("{}={}", c.name(), t.packets))
            .collect();
        assert!(
            drops.is_empty(),
            "node {} dropped: {drops:?}\n{}",
            n.addr,
            lab.report()
        );
    }
}

fn load_balancing(ingress: Ingress) {
    let started = Instant::now();
    let lab = Lab::new(ingress);
    lab.set_default_services();
    eprintln!("lab ready in {:?}", started.elapsed());
    balance_through_both_nodes(&lab, IPPROTO_UDP);
    balance_through_both_nodes(&lab, IPPROTO_TCP);
    assert_no_drops(&lab);
    for n in &lab.nodes {
        let s = n.stats().expect("np_stats");
        for c in [Counter::NewFlow, Counter::Established, Counter::Reply] {
            assert!(
                s.get(c).packets > 0,
                "node {}: no {} packets\n{}",
                n.addr,
                c.name(),
                lab.report()
            );
        }
    }
    eprintln!("{}done in {:?}", lab.report(), started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// TC ingress + TC egress: TCP and UDP through each node reach the local and the remote pod; a
/// local pod sees the client, a remote one the node address.
#[test]
fn tc_nodeport_reaches_local_and_remote_backends() {
    load_balancing(Ingress::Tc);
}

/// Generic XDP ingress (with TC ingress beside it as the fallback, and TC egress): the same.
///
/// The client's packets (and the pods') reach the nodes' XDP as CHECKSUM_PARTIAL skbs, since they
/// come from veths; the bridge port towards the client finalizes checksums (see `Lab::new`), so a
/// checksum the XDP program got wrong shows up as a reply the client's stack discards.
#[test]
fn xdp_generic_nodeport_reaches_local_and_remote_backends() {
    load_balancing(Ingress::Xdp(XdpAttachMode::Generic));
}

/// externalTrafficPolicy=Local: a node without a local backend drops (the client times out), a
/// node with one serves it and the pod sees the client's own address.
#[test]
fn etp_local_drops_without_local_backend_and_keeps_client_address() {
    let lab = Lab::new(Ingress::Tc);
    lab.set_services(0, &[], FRONTEND_ETP_LOCAL);
    lab.set_services(1, &[POD2], FRONTEND_ETP_LOCAL);

    let node1 = &lab.nodes[0];
    let before = node1.counter(Counter::DropNoLocalBackend);
    let started = Instant::now();
    let tcp = lab
        .client
        .run(|| tcp_once(SocketAddrV4::new(NODE1, TCP_NODE_PORT), 0));
    match tcp {
        // Dropped, not refused: a refusal would be node1's own stack answering RST, i.e. the
        // packet was passed instead of dropped.
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!(
            "TCP to {NODE1}:{TCP_NODE_PORT} (eTP Local, no local backend) should time out, got \
             {other:?}\n{}",
            lab.report()
        ),
    }
    assert!(
        started.elapsed() < CONNECT_TIMEOUT + Duration::from_millis(1500),
        "the connect timeout did not bound the attempt"
    );
    let udp = lab
        .client
        .run(|| udp_once(SocketAddrV4::new(NODE1, UDP_NODE_PORT), 0));
    assert!(
        matches!(&udp, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "UDP to {NODE1}:{UDP_NODE_PORT} (eTP Local, no local backend) should get no answer, got \
         {udp:?}"
    );
    let dropped = node1.counter(Counter::DropNoLocalBackend) - before;
    assert!(
        dropped >= 2,
        "node1 counted {dropped} drop_no_local_backend packets\n{}",
        lab.report()
    );
    assert_eq!(node1.counter(Counter::NewFlow), 0, "{}", lab.report());

    for (proto, port) in [(IPPROTO_UDP, UDP_NODE_PORT), (IPPROTO_TCP, TCP_NODE_PORT)] {
        let dst = SocketAddrV4::new(NODE2, port);
        let seen: Vec<std::io::Result<Seen>> = lab.client.run(|| {
            (0..10)
                .map(|i| once(proto, dst, if i % 2 == 0 { 0 } else { LARGE }))
                .collect()
        });
        for s in seen {
            let s = s.unwrap_or_else(|e| panic!("to {dst}: {e}\n{}", lab.report()));
            assert_eq!(s.pod, POD2, "to {dst}: only the local pod may serve");
            assert_eq!(
                s.peer, s.client,
                "to {dst}: eTP Local must keep the client's address"
            );
            assert_eq!(*s.peer.ip(), CLIENT);
        }
    }
    assert_eq!(
        lab.nodes[1].counter(Counter::DropNoLocalBackend),
        0,
        "{}",
        lab.report()
    );
}

/// Established TCP connections stay on their backend while other backends come and go; a
/// connection whose own backend is removed is balanced anew and reset by the new backend.
#[test]
fn established_connection_survives_backend_churn() {
    let lab = Lab::new(Ingress::Tc);
    lab.set_default_services();
    let node1 = &lab.nodes[0];
    let dst = SocketAddrV4::new(NODE1, TCP_NODE_PORT);

    // One connection served by the local pod (pod1), one by the remote pod (pod2).
    let (mut to_local, mut to_remote) = (None, None);
    for _ in 0..FLOWS_PER_NODE {
        if to_local.is_some() && to_remote.is_some() {
            break;
        }
        let mut c = Conn::open(&lab.client, dst).expect("connect");
        let seen = c.ask(0).expect("first answer");
        check_seen(&lab, NODE1, &seen).unwrap();
        let slot = if seen.pod == POD1 {
            &mut to_local
        } else {
            &mut to_remote
        };
        if slot.is_none() {
            *slot = Some((c, seen));
        }
    }
    let (Some((mut a, seen_a)), Some((mut b, seen_b))) = (to_local, to_remote) else {
        panic!("no connection to each pod in {FLOWS_PER_NODE} tries");
    };
    let still = |c: &mut Conn, first: &Seen, when: &str| {
        for pad in [0, LARGE] {
            let seen = c.ask(pad).unwrap_or_else(|e| {
                panic!(
                    "{when}: connection to {} broke: {e}\n{}",
                    first.pod,
                    lab.report()
                )
            });
            assert_eq!(&seen, first, "{when}: the connection moved");
        }
    };

    // Add pod3 (remote for node1): new connections reach it, the old ones stay.
    lab.set_services(0, &[POD1, POD2, POD3], 0);
    still(&mut a, &seen_a, "after adding pod3");
    still(&mut b, &seen_b, "after adding pod3");
    let mut to_pod3 = None;
    for _ in 0..FLOWS_PER_NODE {
        let mut c = Conn::open(&lab.client, dst).expect("connect");
        let seen = c.ask(LARGE).expect("answer");
        check_seen(&lab, NODE1, &seen).unwrap();
        if seen.pod == POD3 {
            to_pod3 = Some((c, seen));
            break;
        }
    }
    let (mut c, _) = to_pod3.expect("no new connection reached the added pod3");

    // Remove pod3 again: a and b stay; c's next packet is balanced anew and the new backend,
    // which knows nothing of the connection, resets it.
    let reselected = node1.counter(Counter::Reselected);
    lab.set_services(0, &[POD1, POD2], 0);
    let mut t = node1.tables();
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        t.remove_backend(backend_id(lab.pod(POD3).backend_id, proto))
            .expect("remove_backend");
    }
    still(&mut a, &seen_a, "after removing pod3");
    still(&mut b, &seen_b, "after removing pod3");
    let moved = c.ask(0);
    assert!(
        moved.is_err(),
        "the connection to removed pod3 still answers: {moved:?}"
    );
    assert!(
        node1.counter(Counter::Reselected) > reselected,
        "no reselected packet\n{}",
        lab.report()
    );

    // Remove pod2 (b's backend): a, on pod1, is untouched.
    lab.set_services(0, &[POD1], 0);
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        t.remove_backend(backend_id(lab.pod(POD2).backend_id, proto))
            .expect("remove_backend");
    }
    for i in 0..5 {
        still(&mut a, &seen_a, &format!("after removing pod2 (#{i})"));
    }
    assert!(
        b.ask(0).is_err(),
        "the connection to removed pod2 still answers"
    );
    assert_eq!(node1.counter(Counter::DropStaleSlot), 0, "{}", lab.report());
}

/// Connects from `local` (bound with SO_REUSEADDR, so two connections to different destinations
/// can share one client port, as the kernel allows) to `dst`, from the calling thread's namespace.
fn connect_from(local: SocketAddrV4, dst: SocketAddrV4) -> std::io::Result<Conn> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::V4(local).into())?;
    s.connect_timeout(&SocketAddr::V4(dst).into(), CONNECT_TIMEOUT)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let local = s.local_addr()?;
    Ok(Conn {
        reader: BufReader::new(s),
        local,
    })
}

/// One client port, two nodePorts served by the same local pod (docs/RELIABILITY.md, packet
/// fuzzing finding 2): without a remap both connections would reach the pod as one tuple. The
/// second gets another source port (the client's address kept, as netfilter's implicit
/// source-port remap does), and both real TCP connections work side by side.
#[test]
fn one_client_port_to_two_node_ports_of_one_local_pod_keeps_both_connections() {
    const SECOND_NODE_PORT: u16 = 30082;
    const CLIENT_PORT: u16 = 45678;
    let lab = Lab::new(Ingress::Tc);
    lab.set_services(0, &[POD1], 0);
    lab.nodes[0]
        .tables()
        .put_service(&ServiceEntry {
            node_port: SECOND_NODE_PORT,
            proto: IPPROTO_TCP,
            svc_id: 3,
            flags: 0,
            affinity_timeout_s: 0,
            backends: vec![backend_id(lab.pod(POD1).backend_id, IPPROTO_TCP)],
            cluster_backends: Vec::new(),
        })
        .expect("put_service");
    let local = SocketAddrV4::new(CLIENT, CLIENT_PORT);
    let (first, second) = lab.client.run(|| {
        (
            connect_from(local, SocketAddrV4::new(NODE1, TCP_NODE_PORT)),
            connect_from(local, SocketAddrV4::new(NODE1, SECOND_NODE_PORT)),
        )
    });
    let mut first = first.unwrap_or_else(|e| panic!("first connection: {e}\n{}", lab.report()));
    let mut second = second.unwrap_or_else(|e| panic!("second connection: {e}\n{}", lab.report()));
    let mut peers = Vec::new();
    for round in 0..3 {
        for (name, c) in [("first", &mut first), ("second", &mut second)] {
            let pad = if round == 1 { LARGE } else { 0 };
            let seen = c.ask(pad).unwrap_or_else(|e| {
                panic!("{name} connection, round {round}: {e}\n{}", lab.report())
            });
            assert_eq!(seen.pod, POD1);
            assert_eq!(seen.client, local, "{name}: the client's own socket");
            assert_eq!(
                *seen.peer.ip(),
                CLIENT,
                "{name}: DNAT only keeps the client's address"
            );
            if round == 0 {
                peers.push(seen.peer);
            } else {
                assert_eq!(seen.peer, peers[usize::from(name == "second")]);
            }
        }
    }
    assert_eq!(
        peers[0], local,
        "the first connection keeps the client's port"
    );
    assert_ne!(peers[1], local, "the second connection is remapped");
    assert!(
        (SNAT_MIN..=SNAT_MAX).contains(&peers[1].port()),
        "remapped to {} outside the SNAT range",
        peers[1]
    );
    let rows = nodeport_agent::inspect::conntrack(&lab.nodes[0].tables()).expect("conntrack");
    assert!(
        rows.iter()
            .any(|r| r.port_remap == Some(peers[1].to_string())
                && r.frontend == format!("{NODE1}:{SECOND_NODE_PORT}")),
        "list conntrack shows the remap: {rows:?}"
    );
}

/// Traffic that is not for a nodePort passes untouched: a node's own service on another port, a
/// node address that is not a NodePort address, and pod addresses routed through the nodes.
#[test]
fn traffic_not_for_a_node_port_is_untouched() {
    let lab = Lab::new(Ingress::Tc);
    lab.set_default_services();
    let node1 = lab.node_of(NODE1);
    node1
        .ns
        .ip(&["addr", "add", &format!("{NODE1_OTHER}/24"), "dev", "eth0"]);
    // The node's own servers: an "ssh" on 2222, and one on the nodePort itself, which only a
    // destination that is not a NodePort address may reach.
    let (ssh, own) = node1.ns.run(|| {
        (
            TcpListener::bind(("0.0.0.0", SSH_PORT)).expect("ssh-like listener"),
            TcpListener::bind(("0.0.0.0", TCP_NODE_PORT)).expect("node's own listener"),
        )
    });
    let mut lab = lab;
    lab.serve_tcp(ssh);
    lab.serve_tcp(own);
    let lab = lab;
    let node1 = lab.node_of(NODE1);

    let before = node1.stats().expect("np_stats");
    let check = |dst: SocketAddrV4, want_server: Ipv4Addr| {
        let seen = lab
            .client
            .run(|| tcp_once(dst, LARGE))
            .unwrap_or_else(|e| panic!("TCP to {dst}: {e}\n{}", lab.report()));
        assert_eq!(
            seen.pod, want_server,
            "TCP to {dst} answered by the wrong server"
        );
        assert_eq!(
            seen.peer, seen.client,
            "TCP to {dst}: the server must see the client"
        );
        assert_eq!(*seen.peer.ip(), CLIENT);
    };
    // The ssh-like port on a NodePort address.
    check(SocketAddrV4::new(NODE1, SSH_PORT), NODE1);
    // The nodePort on an address that is not a NodePort address: the node's own listener.
    check(SocketAddrV4::new(NODE1_OTHER, TCP_NODE_PORT), NODE1_OTHER);
    // Pods directly, routed through node1 and node2.
    check(SocketAddrV4::new(POD1, POD_PORT), POD1);
    check(SocketAddrV4::new(POD2, POD_PORT), POD2);
    // The nodePort on a pod address is nothing special: the pod refuses it.
    let refused = lab
        .client
        .run(|| tcp_once(SocketAddrV4::new(POD1, TCP_NODE_PORT), 0));
    assert!(
        matches!(&refused, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "TCP to {POD1}:{TCP_NODE_PORT} should be refused by the pod, got {refused:?}"
    );
    let udp = lab
        .client
        .run(|| udp_once(SocketAddrV4::new(POD1, POD_PORT), LARGE))
        .expect("UDP to pod1 directly");
    assert_eq!((udp.pod, udp.peer), (POD1, udp.client));

    let delta = node1.stats().expect("np_stats").since(&before);
    assert!(
        delta.get(Counter::PassNotNodePort).packets > 0,
        "pass_not_nodeport did not grow\n{}",
        lab.report()
    );
    for c in [Counter::NewFlow, Counter::Established, Counter::Reply] {
        assert_eq!(
            delta.get(c).packets,
            0,
            "node1 translated traffic not for a nodePort ({})\n{}",
            c.name(),
            lab.report()
        );
    }
    assert!(
        node1.tables().conntrack().expect("conntrack").is_empty(),
        "node1 tracked a flow"
    );

    // And the nodePort on the NodePort address still goes to the pods, not to the node's own
    // listener on the same port.
    let seen = lab
        .client
        .run(|| tcp_once(SocketAddrV4::new(NODE1, TCP_NODE_PORT), 0))
        .expect("nodePort");
    assert!(
        [POD1, POD2].contains(&seen.pod),
        "nodePort answered by {}",
        seen.pod
    );
    assert_no_drops(&lab);
}
