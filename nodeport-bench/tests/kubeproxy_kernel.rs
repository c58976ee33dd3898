//! kube-proxy's rules, as rendered by `nodeport_bench::kubeproxy`, installed in a real node
//! namespace and driven with real TCP and UDP connections (needs root; fails without it).
//!
//! Topology, all namespaces named `kpk<pid><test>-…`:
//!
//! ```text
//! client 192.168.77.2 ── 192.168.77.1 node (forwarding, the rules) 10.244.1.1 ── 10.244.1.2 pod1
//!                                                                 10.244.2.1 ── 10.244.2.2 pod2
//! ```
//!
//! The pods run std TCP and UDP servers answering `<pod> <peer ip>:<peer port>`; the sockets are
//! made inside the pod namespaces (a socket stays in the namespace it was made in) and served
//! from threads of this process.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use nodeport_bench::kubeproxy::{
    IptablesBackend, Mode, ProxyInput, install, install_with, remove, render,
};
use nodeport_lab::sys::{exec_in, in_netns, ip_in, netns_add, netns_del, netns_list, netns_pids};
use serde_json::json;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const POD_PORT_TCP: u16 = 8080;
const POD_PORT_UDP: u16 = 5353;
const NP_TCP: u16 = 30080;
const NP_UDP: u16 = 30053;
const NP_EMPTY: u16 = 30099;
const NODE_NAME: &str = "kpk-node";

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap();
    assert_eq!(
        uid, "0",
        "kubeproxy_kernel needs root (network namespaces, iptables, nft)"
    );
}

/// The namespaces of one run; deleted on drop, failing or not.
struct Topology {
    prefix: String,
}

impl Topology {
    fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    /// `tag` keeps the namespaces of tests running in parallel in one process apart.
    fn up(tag: char) -> Topology {
        require_root();
        sweep_leftovers();
        let t = Topology {
            prefix: format!("kpk{}{tag}-", std::process::id()),
        };
        let (client, node) = (t.ns("client"), t.ns("node"));
        netns_add(&node, true).unwrap();
        netns_add(&client, false).unwrap();
        ip_in(
            &node,
            &[
                "link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", &client,
            ],
        )
        .unwrap();
        ip_in(
            &node,
            &["addr", "add", &format!("{NODE_IP}/24"), "dev", "c0"],
        )
        .unwrap();
        ip_in(&node, &["link", "set", "c0", "up"]).unwrap();
        ip_in(
            &client,
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"],
        )
        .unwrap();
        ip_in(&client, &["link", "set", "eth0", "up"]).unwrap();
        for i in [1, 2] {
            let pod = t.ns(&format!("pod{i}"));
            netns_add(&pod, false).unwrap();
            let dev = format!("p{i}");
            ip_in(
                &node,
                &[
                    "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns", &pod,
                ],
            )
            .unwrap();
            ip_in(
                &node,
                &["addr", "add", &format!("10.244.{i}.1/24"), "dev", &dev],
            )
            .unwrap();
            ip_in(&node, &["link", "set", &dev, "up"]).unwrap();
            ip_in(
                &pod,
                &["addr", "add", &format!("10.244.{i}.2/24"), "dev", "eth0"],
            )
            .unwrap();
            ip_in(&pod, &["link", "set", "eth0", "up"]).unwrap();
            ip_in(
                &pod,
                &["route", "add", "default", "via", &format!("10.244.{i}.1")],
            )
            .unwrap();
        }
        t
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in netns_list() {
            if ns.starts_with(&self.prefix) {
                netns_del(&ns);
            }
        }
    }
}

/// Namespaces of earlier runs that were killed before their guard ran.
fn sweep_leftovers() {
    for ns in netns_list() {
        let Some(pid) = ns
            .strip_prefix("kpk")
            .map(|r| {
                r.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() && netns_pids(&ns).is_empty() {
            netns_del(&ns);
        }
    }
}

/// Echo servers in pod `i`: TCP and UDP, answering `pod<i> <peer>`.
fn start_pod_servers(t: &Topology, i: u8) {
    let pod = t.ns(&format!("pod{i}"));
    let addr = Ipv4Addr::new(10, 244, i, 2);
    let tcp = in_netns(&pod, || TcpListener::bind((addr, POD_PORT_TCP)))
        .unwrap()
        .unwrap();
    let udp = in_netns(&pod, || UdpSocket::bind((addr, POD_PORT_UDP)))
        .unwrap()
        .unwrap();
    thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(mut conn) = conn else { continue };
            let peer = conn.peer_addr().unwrap();
            let _ = conn.write_all(format!("pod{i} {peer}").as_bytes());
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("pod{i} {peer}").as_bytes(), peer);
        }
    });
}

/// A server on the node itself at `port`: if no rule rejected the packets, connections to
/// nodeIP:port would reach it.
fn start_node_listener(t: &Topology, port: u16) {
    let l = in_netns(&t.ns("node"), || TcpListener::bind((NODE_IP, port)))
        .unwrap()
        .unwrap();
    thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(b"node");
        }
    });
}

fn tcp_from_client(t: &Topology, port: u16) -> std::io::Result<String> {
    in_netns(&t.ns("client"), move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(
            &SocketAddrV4::new(NODE_IP, port).into(),
            Duration::from_secs(3),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .unwrap()
}

fn udp_from_client(t: &Topology, port: u16) -> std::io::Result<(String, std::net::SocketAddr)> {
    in_netns(&t.ns("client"), move || {
        let s = UdpSocket::bind((CLIENT_IP, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(b"hello", (NODE_IP, port))?;
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    })
    .unwrap()
}

fn service(name: &str, cluster_ip: &str, proto: &str, port: u16, node_port: u16) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": name},
        "spec": {"type": "NodePort", "clusterIP": cluster_ip,
                 "ports": [{"name": "p", "port": port, "protocol": proto, "nodePort": node_port}]},
    }))
    .unwrap()
}

fn slice(service: &str, proto: &str, port: u16, ips: &[&str]) -> EndpointSlice {
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "nodeName": NODE_NAME, "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("{service}-x"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "p", "port": port, "protocol": proto}],
    }))
    .unwrap()
}

fn objects() -> (Vec<Service>, Vec<EndpointSlice>) {
    let pods = ["10.244.1.2", "10.244.2.2"];
    (
        vec![
            service("web", "10.96.0.10", "TCP", 80, NP_TCP),
            service("dns", "10.96.0.11", "UDP", 53, NP_UDP),
            service("empty", "10.96.0.12", "TCP", 80, NP_EMPTY),
        ],
        vec![
            slice("web", "TCP", POD_PORT_TCP, &pods),
            slice("dns", "UDP", POD_PORT_UDP, &pods),
        ],
    )
}

fn input<'a>(services: &'a [Service], slices: &'a [EndpointSlice]) -> ProxyInput<'a> {
    ProxyInput {
        node_name: NODE_NAME,
        // --nodeport-addresses=192.168.77.1/32
        node_ips: &[NODE_IP],
        cluster_cidr: "10.244.0.0/16".parse().unwrap(),
        services,
        slices,
    }
}

fn node_cmd(t: &Topology, cmd: &[&str]) -> String {
    exec_in(&t.ns("node"), cmd).unwrap()
}

/// Rules that are not kube-proxy's, which `remove` must leave alone.
fn add_foreign_rules(t: &Topology) {
    node_cmd(
        t,
        &[
            "iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT",
        ],
    );
    node_cmd(t, &["nft", "add table ip keepme; add chain ip keepme c"]);
}

fn assert_foreign_rules_kept(t: &Topology) {
    let saved = node_cmd(t, &["iptables-save", "-t", "filter"]);
    assert!(
        saved.contains("-A INPUT -p tcp -m tcp --dport 9 -j ACCEPT"),
        "{saved}"
    );
    let tables = node_cmd(t, &["nft", "list", "tables"]);
    assert!(tables.contains("table ip keepme"), "{tables}");
}

fn assert_no_kube_proxy_rules(t: &Topology, mode: Mode) {
    for table in ["filter", "nat"] {
        let saved = node_cmd(t, &["iptables-nft-save", "-t", table]);
        assert!(
            !saved.contains("KUBE-"),
            "{mode:?}: left in {table}:\n{saved}"
        );
    }
    // x_tables: only the tables that exist (saving one creates it).
    let legacy = node_cmd(t, &["cat", "/proc/net/ip_tables_names"]);
    for table in legacy.lines().filter(|l| ["filter", "nat"].contains(l)) {
        let saved = node_cmd(t, &["iptables-legacy-save", "-t", table]);
        assert!(
            !saved.contains("KUBE-"),
            "{mode:?}: left in legacy {table}:\n{saved}"
        );
    }
    let tables = node_cmd(t, &["nft", "list", "tables"]);
    assert!(!tables.contains("kube-proxy"), "{mode:?}: {tables}");
}

/// Through nodeIP:nodePort from the client: both pods reached over TCP and UDP, each seeing
/// the node's address on its link (masquerade), not the client's; the service without
/// endpoints rejected although a server listens on the node at that port.
fn check_traffic(t: &Topology, mode: Mode) {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let answer = tcp_from_client(t, NP_TCP).unwrap_or_else(|e| panic!("{mode:?} TCP: {e}"));
        let (pod, peer) = answer.split_once(' ').unwrap();
        let peer: SocketAddrV4 = peer.parse().unwrap();
        let i: u8 = pod.trim_start_matches("pod").parse().unwrap();
        assert_eq!(
            *peer.ip(),
            Ipv4Addr::new(10, 244, i, 1),
            "{mode:?}: {pod} saw {peer}, not the node's address"
        );
        seen.insert(pod.to_owned());
    }
    assert_eq!(
        seen.len(),
        2,
        "{mode:?}: TCP reached only {seen:?} in 24 connections"
    );

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let (answer, from) =
            udp_from_client(t, NP_UDP).unwrap_or_else(|e| panic!("{mode:?} UDP: {e}"));
        assert_eq!(
            from,
            SocketAddrV4::new(NODE_IP, NP_UDP).into(),
            "{mode:?}: reply source"
        );
        let (pod, peer) = answer.split_once(' ').unwrap();
        let peer: SocketAddrV4 = peer.parse().unwrap();
        let i: u8 = pod.trim_start_matches("pod").parse().unwrap();
        assert_eq!(
            *peer.ip(),
            Ipv4Addr::new(10, 244, i, 1),
            "{mode:?}: UDP {pod} saw {peer}"
        );
        seen.insert(pod.to_owned());
    }
    assert_eq!(
        seen.len(),
        2,
        "{mode:?}: UDP reached only {seen:?} in 24 datagrams"
    );

    let err = tcp_from_client(t, NP_EMPTY).expect_err("a service without endpoints answered");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{mode:?}: {err}");
}

#[test]
fn kube_proxy_rules_carry_real_traffic_and_remove_cleanly() {
    let t = Topology::up('a');
    start_pod_servers(&t, 1);
    start_pod_servers(&t, 2);
    start_node_listener(&t, NP_EMPTY);
    add_foreign_rules(&t);
    let node = t.ns("node");
    assert_eq!(
        tcp_from_client(&t, NP_EMPTY).unwrap(),
        "node",
        "setup: node listener"
    );

    let (services, slices) = objects();
    for mode in [Mode::Iptables, Mode::Nftables] {
        let rules = render(mode, &input(&services, &slices)).unwrap();
        install(mode, &node, &rules).unwrap();
        // Installing again replaces: no second copy of the jumps from the built-in chains.
        install(mode, &node, &rules).unwrap();
        match mode {
            Mode::Iptables => {
                let nat = node_cmd(&t, &["iptables-save", "-t", "nat"]);
                let jumps = nat
                    .lines()
                    .filter(|l| l.starts_with("-A PREROUTING") && l.ends_with("-j KUBE-SERVICES"))
                    .count();
                assert_eq!(jumps, 1, "{nat}");
            }
            Mode::Nftables => {
                let rules = node_cmd(
                    &t,
                    &["nft", "list", "chain", "ip", "kube-proxy", "nat-prerouting"],
                );
                assert_eq!(rules.matches("jump services").count(), 1, "{rules}");
            }
        }
        let established = node_cmd(
            &t,
            &[
                "sysctl",
                "-n",
                "net.netfilter.nf_conntrack_tcp_timeout_established",
            ],
        );
        assert_eq!(established.trim(), "86400");
        check_traffic(&t, mode);

        remove(mode, &node).unwrap();
        assert_no_kube_proxy_rules(&t, mode);
        assert_foreign_rules_kept(&t);
        // Without the rules the node's own listener answers: the refusal came from them.
        assert_eq!(
            tcp_from_client(&t, NP_EMPTY).unwrap(),
            "node",
            "{mode:?} after remove"
        );
    }
}

/// 1,000 NodePort services (2 endpoints each, both the real pods) installed with
/// iptables-restore (both backends: nf_tables and x_tables) and with nft; prints how long each
/// install takes, then reaches the pods through the last nodePort (the end of KUBE-NODEPORTS'
/// linear scan in iptables mode).
#[test]
fn thousand_services_install_with_iptables_restore_and_nft() {
    let t = Topology::up('b');
    start_pod_servers(&t, 1);
    start_pod_servers(&t, 2);
    let node = t.ns("node");
    let n = 1000u16;
    let pods = ["10.244.1.2", "10.244.2.2"];
    let services: Vec<Service> = (0..n)
        .map(|i| {
            service(
                &format!("svc-{i}"),
                &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                "TCP",
                80,
                20000 + i,
            )
        })
        .collect();
    let slices: Vec<EndpointSlice> = (0..n)
        .map(|i| slice(&format!("svc-{i}"), "TCP", POD_PORT_TCP, &pods))
        .collect();
    let proxy_input = input(&services, &slices);
    for (mode, backend, save) in [
        (Mode::Iptables, IptablesBackend::Nft, "iptables-nft-save"),
        (
            Mode::Iptables,
            IptablesBackend::Legacy,
            "iptables-legacy-save",
        ),
        (Mode::Nftables, IptablesBackend::System, ""),
    ] {
        let what = match mode {
            Mode::Iptables => format!("iptables ({backend:?})"),
            Mode::Nftables => "nftables".to_owned(),
        };
        let rules = render(mode, &proxy_input).unwrap();
        let start = Instant::now();
        install_with(mode, &node, &rules, backend).unwrap();
        let took = start.elapsed();
        println!(
            "kube-proxy {what} rules for {n} services x 2 endpoints: {} lines, installed in {took:?}",
            rules.lines().count()
        );
        match mode {
            Mode::Iptables => {
                let nat = node_cmd(&t, &[save, "-t", "nat"]);
                assert_eq!(
                    nat.lines().filter(|l| l.starts_with(":KUBE-SEP-")).count(),
                    2 * n as usize
                );
                assert_eq!(
                    nat.lines()
                        .filter(|l| l.starts_with("-A KUBE-NODEPORTS "))
                        .count(),
                    n as usize
                );
            }
            Mode::Nftables => {
                let map = node_cmd(
                    &t,
                    &[
                        "nft",
                        "list",
                        "map",
                        "ip",
                        "kube-proxy",
                        "service-nodeports",
                    ],
                );
                assert_eq!(map.matches("goto external-").count(), n as usize, "{map}");
            }
        }
        let last = 20000 + n - 1;
        let answer =
            tcp_from_client(&t, last).unwrap_or_else(|e| panic!("{what} nodePort {last}: {e}"));
        assert!(answer.starts_with("pod"), "{answer}");
        let start = Instant::now();
        remove(mode, &node).unwrap();
        println!(
            "kube-proxy {what} rules for {n} services removed in {:?}",
            start.elapsed()
        );
        assert_no_kube_proxy_rules(&t, mode);
    }
    // Every iptables-restore and nft run has exited: nothing is left in the node namespace.
    assert!(netns_pids(&node).is_empty());
}

/// Without `--nodeport-addresses` kube-proxy serves nodePorts on every local address
/// (`-m addrtype --dst-type LOCAL`, `fib daddr type local`); in iptables mode it then also opens
/// 127.0.0.0/8 to them and sets `route_localnet`, in nftables mode it does neither.
#[test]
fn nodeports_on_every_local_address_without_nodeport_addresses() {
    let t = Topology::up('c');
    start_pod_servers(&t, 1);
    start_pod_servers(&t, 2);
    start_node_listener(&t, NP_EMPTY);
    let node = t.ns("node");
    let (services, slices) = objects();
    let match_all = ProxyInput {
        node_ips: &[],
        ..input(&services, &slices)
    };
    for mode in [Mode::Iptables, Mode::Nftables] {
        node_cmd(&t, &["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=0"]);
        let rules = render(mode, &match_all).unwrap();
        install(mode, &node, &rules).unwrap();
        let localnet = node_cmd(&t, &["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]);
        let want = if mode == Mode::Iptables { "1" } else { "0" };
        assert_eq!(localnet.trim(), want, "{mode:?}: route_localnet");
        check_traffic(&t, mode);
        remove(mode, &node).unwrap();
        assert_no_kube_proxy_rules(&t, mode);
    }
}
