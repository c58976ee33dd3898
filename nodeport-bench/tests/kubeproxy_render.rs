//! kube-proxy's rules as rendered by `nodeport_bench::kubeproxy`, checked against what
//! kube-proxy's own unit tests expect (kubernetes/kubernetes pkg/proxy/iptables/proxier_test.go
//! `TestOverallIPTablesRules`, pkg/proxy/nftables/proxier_test.go `TestOverallNFTablesRules`),
//! its chain-name hashes and probabilities, and the size and speed of a 10,000-service render.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use nodeport_bench::kubeproxy::{
    Mode, Options, ProxyInput, iptables,
    model::{Endpoint, Proto, ServicePort},
    names, render, render_with,
};
use serde_json::{Value, json};

fn service(ns: &str, name: &str, spec: Value, status: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
        "status": status,
    }))
    .unwrap()
}

fn slice(ns: &str, svc: &str, endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": format!("{svc}-1"), "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}],
    }))
    .unwrap()
}

const TEST_NODE: &str = "test-node";

/// The input of `TestOverallIPTablesRules` / `TestOverallNFTablesRules` (identical in both).
fn overall_input() -> (Vec<Service>, Vec<EndpointSlice>) {
    let p80 = |node_port: Option<u16>| {
        let mut p = json!({"name": "p80", "port": 80, "protocol": "TCP"});
        if let Some(np) = node_port {
            p["nodePort"] = json!(np);
        }
        json!([p])
    };
    let services = vec![
        service(
            "ns1",
            "svc1",
            json!({"clusterIP": "172.30.0.41", "ports": p80(None)}),
            json!({}),
        ),
        service(
            "ns2",
            "svc2",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "clusterIP": "172.30.0.42",
                   "ports": p80(Some(3001)), "externalIPs": ["192.168.99.22"], "healthCheckNodePort": 30000}),
            json!({"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}),
        ),
        service(
            "ns3",
            "svc3",
            json!({"type": "NodePort", "clusterIP": "172.30.0.43", "ports": p80(Some(3003))}),
            json!({}),
        ),
        service(
            "ns4",
            "svc4",
            json!({"type": "NodePort", "clusterIP": "172.30.0.44", "externalIPs": ["192.168.99.33"],
                   "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 80}]}),
            json!({}),
        ),
        service(
            "ns5",
            "svc5",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Cluster", "clusterIP": "172.30.0.45",
                   "ports": p80(Some(3002)), "healthCheckNodePort": 30000,
                   "loadBalancerSourceRanges": [" 203.0.113.0/25"],
                   "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}}}),
            json!({"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}}),
        ),
        service(
            "ns6",
            "svc6",
            json!({"type": "ClusterIP", "clusterIP": "172.30.0.46",
                   "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 80}]}),
            json!({}),
        ),
    ];
    let slices = vec![
        slice("ns1", "svc1", json!([{"addresses": ["10.180.0.1"]}])),
        // Not local (no nodeName): svc2's Local policy has no endpoint here.
        slice("ns2", "svc2", json!([{"addresses": ["10.180.0.2"]}])),
        slice("ns3", "svc3", json!([{"addresses": ["10.180.0.3"]}])),
        slice(
            "ns4",
            "svc4",
            json!([{"addresses": ["10.180.0.4"]}, {"addresses": ["10.180.0.5"], "nodeName": TEST_NODE}]),
        ),
        slice("ns5", "svc5", json!([{"addresses": ["10.180.0.3"]}])),
    ];
    (services, slices)
}

/// `TestOverallIPTablesRules`' expected restore input, verbatim (its fake proxier: no
/// --nodeport-addresses, localhost nodePorts on, nfacct counters present, mark 0x4000, an
/// iptables without --random-fully, cluster CIDR 10.0.0.0/8).
const IPTABLES_EXPECTED: &str = r#"*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3003 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3002 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
COMMIT
"#;

/// iptables-restore input by table: the chain lines (a set: kube-proxy's test sorts them) and
/// each chain's rules in order. Our `-I` jumps are not in kube-proxy's restore input (it adds
/// them with `iptables -I`), so they are set apart.
#[derive(Debug, Default, PartialEq, Eq)]
struct Restore {
    chains: BTreeMap<String, Vec<String>>,
    rules: BTreeMap<(String, String), Vec<String>>,
    jumps: Vec<String>,
}

fn parse_restore(text: &str) -> Restore {
    let mut r = Restore::default();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_owned();
        } else if line.starts_with(':') {
            r.chains
                .entry(table.clone())
                .or_default()
                .push(line.to_owned());
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split(' ').next().unwrap().to_owned();
            r.rules
                .entry((table.clone(), chain))
                .or_default()
                .push(line.to_owned());
        } else if line.starts_with("-I ") {
            r.jumps.push(format!("{table} {line}"));
        } else {
            assert!(
                line == "COMMIT" || line.is_empty(),
                "unexpected line {line:?}"
            );
        }
    }
    for chains in r.chains.values_mut() {
        chains.sort();
    }
    r
}

fn lab_input<'a>(
    services: &'a [Service],
    slices: &'a [EndpointSlice],
    node_ips: &'a [Ipv4Addr],
) -> ProxyInput<'a> {
    ProxyInput {
        node_name: TEST_NODE,
        node_ips,
        cluster_cidr: "10.0.0.0/8".parse().unwrap(),
        services,
        slices,
    }
}

// kubernetes/kubernetes pkg/proxy/iptables/proxier_test.go, TestOverallIPTablesRules.
#[test]
fn iptables_matches_kube_proxy_test_overall_iptables_rules() {
    let (services, slices) = overall_input();
    let input = lab_input(&services, &slices, &[]);
    let opts = Options {
        masquerade_mark: "0x4000".into(),
        nfacct: true,
        random_fully: false,
        ..Options::default()
    };
    let got = parse_restore(&render_with(Mode::Iptables, &input, &opts).unwrap());
    let want = parse_restore(IPTABLES_EXPECTED);
    assert_eq!(got.chains, want.chains, "chain lines");
    let keys: Vec<_> = got.rules.keys().chain(want.rules.keys()).collect();
    for key in keys {
        assert_eq!(
            got.rules.get(key),
            want.rules.get(key),
            "rules of {} chain {}",
            key.0,
            key.1
        );
    }
    assert_eq!(
        got.jumps,
        [
            "filter -I INPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
            "filter -I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
            "filter -I INPUT 1 -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
            "filter -I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "filter -I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "filter -I FORWARD 1 -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            "filter -I INPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            "filter -I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            "filter -I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            "filter -I INPUT 1 -j KUBE-FIREWALL",
            "filter -I OUTPUT 1 -j KUBE-FIREWALL",
            "nat -I OUTPUT 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "nat -I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "nat -I POSTROUTING 1 -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        ]
    );
}

/// `baseRules` + `TestOverallNFTablesRules`' expected dump, verbatim (its fake proxier:
/// --nodeport-addresses 192.168.0.2, ServiceCIDR 172.30.0.0/16, mark 0x4000).
const NFTABLES_EXPECTED: &str = r#"
add table ip kube-proxy { comment "rules for kube-proxy" ; }

add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }

add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }

add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check

add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports

add element ip kube-proxy nodeport-ips { 192.168.0.2 }
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services

# svc1
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }

add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80

add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }

# svc2
add chain ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80
add rule ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80 ip daddr 172.30.0.42 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 }
add chain ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80
add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit pod traffic"
add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit local traffic"
add chain ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80
add rule ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 ip saddr 10.180.0.2 jump mark-for-masquerade
add rule ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 meta l4proto tcp dnat to 10.180.0.2:80

add element ip kube-proxy cluster-ips { 172.30.0.42 }
add element ip kube-proxy service-ips { 172.30.0.42 . tcp . 80 : goto service-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip kube-proxy service-ips { 192.168.99.22 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }

add element ip kube-proxy no-endpoint-nodeports { tcp . 3001 comment "ns2/svc2:p80" : drop }
add element ip kube-proxy no-endpoint-services { 1.2.3.4 . tcp . 80 comment "ns2/svc2:p80" : drop }
add element ip kube-proxy no-endpoint-services { 192.168.99.22 . tcp . 80 comment "ns2/svc2:p80" : drop }

# svc3
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 }
add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
add chain ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80
add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80

add element ip kube-proxy cluster-ips { 172.30.0.43 }
add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }

# svc4
add chain ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80
add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }
add chain ip kube-proxy external-LAUZTJTB-ns4/svc4/tcp/p80
add rule ip kube-proxy external-LAUZTJTB-ns4/svc4/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-LAUZTJTB-ns4/svc4/tcp/p80 goto service-LAUZTJTB-ns4/svc4/tcp/p80
add chain ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80
add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 ip saddr 10.180.0.5 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 meta l4proto tcp dnat to 10.180.0.5:80
add chain ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80
add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 ip saddr 10.180.0.4 jump mark-for-masquerade
add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 meta l4proto tcp dnat to 10.180.0.4:80

add element ip kube-proxy cluster-ips { 172.30.0.44 }
add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }
add element ip kube-proxy service-ips { 192.168.99.33 . tcp . 80 : goto external-LAUZTJTB-ns4/svc4/tcp/p80 }

# svc5
add set ip kube-proxy affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 { type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }
add chain ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80
add rule ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80 ip daddr 172.30.0.45 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80 ip saddr @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 goto endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80
add rule ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 }
add chain ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80
add rule ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80 goto service-HVFWP5L3-ns5/svc5/tcp/p80

add chain ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80
add rule ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
add rule ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 update @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 { ip saddr }
add rule ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80

add chain ip kube-proxy firewall-HVFWP5L3-ns5/svc5/tcp/p80
add rule ip kube-proxy firewall-HVFWP5L3-ns5/svc5/tcp/p80 ip saddr != { 203.0.113.0/25 } drop

add element ip kube-proxy cluster-ips { 172.30.0.45 }
add element ip kube-proxy service-ips { 172.30.0.45 . tcp . 80 : goto service-HVFWP5L3-ns5/svc5/tcp/p80 }
add element ip kube-proxy service-ips { 5.6.7.8 . tcp . 80 : goto external-HVFWP5L3-ns5/svc5/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3002 : goto external-HVFWP5L3-ns5/svc5/tcp/p80 }
add element ip kube-proxy firewall-ips { 5.6.7.8 . tcp . 80 : goto firewall-HVFWP5L3-ns5/svc5/tcp/p80 }

# svc6
add element ip kube-proxy cluster-ips { 172.30.0.46 }
add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
"#;

/// An nft script as kube-proxy's test compares it: the set of its statements (knftables' fake
/// dumps objects sorted), plus each chain's rules in order.
fn parse_nft(text: &str) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
    let mut lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let mut by_chain: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in &lines {
        if let Some(rest) = l.strip_prefix("add rule ip kube-proxy ") {
            let chain = rest.split(' ').next().unwrap().to_owned();
            by_chain.entry(chain).or_default().push(l.clone());
        }
    }
    lines.sort();
    (lines, by_chain)
}

// kubernetes/kubernetes pkg/proxy/nftables/proxier_test.go, TestOverallNFTablesRules.
#[test]
fn nftables_matches_kube_proxy_test_overall_nftables_rules() {
    let (services, slices) = overall_input();
    let node_ips = [Ipv4Addr::new(192, 168, 0, 2)];
    let input = lab_input(&services, &slices, &node_ips);
    let opts = Options {
        masquerade_mark: "0x4000".into(),
        service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
        ..Options::default()
    };
    let got = render_with(Mode::Nftables, &input, &opts).unwrap();
    let (got_lines, got_chains) = parse_nft(&got);
    let (want_lines, want_chains) = parse_nft(NFTABLES_EXPECTED);
    let missing: Vec<_> = want_lines
        .iter()
        .filter(|l| !got_lines.contains(l))
        .collect();
    let extra: Vec<_> = got_lines
        .iter()
        .filter(|l| !want_lines.contains(l))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing:\n{missing:#?}\nextra:\n{extra:#?}"
    );
    assert_eq!(got_lines, want_lines);
    assert_eq!(got_chains, want_chains, "rule order within chains");
}

fn port(ns: &str, name: &str, port_name: &str, proto: Proto) -> ServicePort {
    ServicePort {
        namespace: ns.into(),
        name: name.into(),
        port_name: port_name.into(),
        proto,
        cluster_ip: Ipv4Addr::new(172, 30, 0, 41),
        port: 80,
        node_port: 0,
        external_ips: vec![],
        lb_ips: vec![],
        source_ranges: vec![],
        etp_local: false,
        itp_local: false,
        affinity_seconds: None,
        health_check_node_port: 0,
        endpoints: vec![],
    }
}

fn endpoint(ip: [u8; 4], port: u16) -> Endpoint {
    Endpoint {
        ip: ip.into(),
        port,
        local: false,
        ready: true,
        serving: true,
        terminating: false,
    }
}

// Values from kube-proxy's tests: TestOverallIPTablesRules (KUBE-SVC-XPGD46QRK7WJZT7O,
// KUBE-SEP-SXIVWICOYRO3J4NJ for ns1/svc1:p80 -> 10.180.0.1:80), TestOverallNFTablesRules
// (ULMVA6XW, 5OJB2KTY), and pkg/proxy/nftables/proxier_test.go's TestClusterIPGeneral-era
// `servicePortChainNameBase` comment ("ULMVA6XW-ns1/svc1/tcp/p80").
#[test]
fn chain_names_hash_like_kube_proxy() {
    let sp = port("ns1", "svc1", "p80", Proto::Tcp);
    let ep = endpoint([10, 180, 0, 1], 80);
    assert_eq!(names::port_proto_hash(&sp), "XPGD46QRK7WJZT7O");
    assert_eq!(
        names::iptables_endpoint_chain(&sp, &ep),
        "KUBE-SEP-SXIVWICOYRO3J4NJ"
    );
    assert_eq!(names::nft_service_base(&sp), "ULMVA6XW-ns1/svc1/tcp/p80");
    assert_eq!(
        names::nft_endpoint_base(&sp, &ep),
        "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    );
    let svc5 = port("ns5", "svc5", "p80", Proto::Tcp);
    assert_eq!(names::port_proto_hash(&svc5), "NUKIZ6OKUXPJNT4C");
    // The protocol is part of the hash: the same port over UDP is another chain.
    assert_ne!(
        names::port_proto_hash(&port("ns1", "svc1", "p80", Proto::Udp)),
        "XPGD46QRK7WJZT7O"
    );
    // An unnamed port: `ns/svc` (no colon) in iptables, a trailing slash in nftables.
    let unnamed = port("ns1", "svc1", "", Proto::Tcp);
    assert_eq!(unnamed.name_string(), "ns1/svc1");
    assert!(names::nft_service_base(&unnamed).ends_with("-ns1/svc1/tcp/"));
}

#[test]
fn probabilities_are_one_over_remaining_endpoints() {
    assert_eq!(iptables::probability(2), "0.5000000000");
    assert_eq!(iptables::probability(3), "0.3333333333");
    assert_eq!(iptables::probability(4), "0.2500000000");
    assert_eq!(iptables::probability(7), "0.1428571429");

    let services = vec![service(
        "default",
        "web",
        json!({"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [{"name": "p80", "port": 80, "nodePort": 30080}]}),
        json!({}),
    )];
    let eps: Vec<Value> = (1..=4)
        .map(|i| json!({"addresses": [format!("10.244.1.{i}")]}))
        .collect();
    let slices = vec![slice("default", "web", json!(eps))];
    let node_ips = [Ipv4Addr::new(192, 168, 0, 2)];
    let input = lab_input(&services, &slices, &node_ips);
    let text = render(Mode::Iptables, &input).unwrap();
    let svc_chain = format!(
        "KUBE-SVC-{}",
        names::port_proto_hash(&port("default", "web", "p80", Proto::Tcp))
    );
    let picks: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("-A {svc_chain} ")) && l.contains("KUBE-SEP-"))
        .collect();
    assert_eq!(picks.len(), 4, "{text}");
    for (rule, p) in picks
        .iter()
        .zip(["0.2500000000", "0.3333333333", "0.5000000000"])
    {
        assert!(rule.contains(&format!("--probability {p} ")), "{rule}");
    }
    assert!(!picks[3].contains("--probability"), "{}", picks[3]);

    let nft = render(Mode::Nftables, &input).unwrap();
    assert!(
        nft.contains("numgen random mod 4 vmap { 0 : goto endpoint-"),
        "{nft}"
    );
}

/// N NodePort services in namespace `bench` (nodePorts 20000 + i: outside the default range, to
/// stay distinct), each with one slice of `endpoints` ready endpoints (the benchmark's shape).
fn many(n: usize, endpoints: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("svc-{i}");
        services.push(service(
            "bench",
            &name,
            json!({"type": "NodePort", "clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                   "ports": [{"name": "p80", "port": 80, "protocol": if i % 2 == 0 { "TCP" } else { "UDP" },
                              "nodePort": 20000 + i}]}),
            json!({}),
        ));
        let eps: Vec<Value> = (0..endpoints)
            .map(|e| json!({"addresses": [format!("10.{}.{}.{}", 100 + e, i / 250, i % 250 + 1)], "nodeName": "other"}))
            .collect();
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "bench", "name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": "p80", "port": 8080, "protocol": if i % 2 == 0 { "TCP" } else { "UDP" }}],
        }))
        .unwrap();
        slices.push(s);
    }
    (services, slices)
}

fn count(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| l.starts_with(prefix)).count()
}

#[test]
fn ten_thousand_services_render_fast_with_expected_rule_counts() {
    let n = 10_000;
    let (services, slices) = many(n, 2);
    let node_ips = [Ipv4Addr::new(172, 18, 0, 2)];
    let input = lab_input(&services, &slices, &node_ips);

    let start = Instant::now();
    let ipt = render(Mode::Iptables, &input).unwrap();
    let ipt_time = start.elapsed();
    let start = Instant::now();
    let nft = render(Mode::Nftables, &input).unwrap();
    let nft_time = start.elapsed();
    println!(
        "10,000 services x 2 endpoints: iptables render {ipt_time:?} ({} bytes), nftables render {nft_time:?} ({} bytes)",
        ipt.len(),
        nft.len()
    );
    // Optimised (`cargo test --release`, how the benchmark runs) each takes about 0.2 s here;
    // the unoptimised test build about 0.65 s, so it gets room for a busy machine.
    let bound = if cfg!(debug_assertions) {
        Duration::from_secs(3)
    } else {
        Duration::from_millis(600)
    };
    assert!(ipt_time < bound, "iptables render took {ipt_time:?}");
    assert!(nft_time < bound, "nftables render took {nft_time:?}");

    // iptables, per service: KUBE-SERVICES 1, KUBE-NODEPORTS 1, KUBE-EXT 2, KUBE-SVC 1 + 2,
    // 2 KUBE-SEP x 2 = 11 nat rules in 4 chains; fixed: 3 KUBE-POSTROUTING, 1 KUBE-MARK-MASQ,
    // 1 nodePorts jump.
    assert_eq!(
        count(&ipt, "-A "),
        11 * n + 5 + 3,
        "3 KUBE-FORWARD filter rules"
    );
    assert_eq!(count(&ipt, ":KUBE-SVC-"), n);
    assert_eq!(count(&ipt, ":KUBE-EXT-"), n);
    assert_eq!(count(&ipt, ":KUBE-SEP-"), 2 * n);
    assert_eq!(count(&ipt, "-A KUBE-SERVICES "), n + 1);
    assert_eq!(count(&ipt, "-A KUBE-NODEPORTS "), n);
    // 20,000 endpoints > kube-proxy's large-cluster threshold: no per-endpoint comments.
    assert!(
        !ipt.lines()
            .any(|l| l.starts_with("-A KUBE-SEP-") && l.contains("--comment"))
    );
    let last_services_rule = ipt
        .lines()
        .rfind(|l| l.starts_with("-A KUBE-SERVICES "))
        .unwrap();
    assert!(
        last_services_rule.ends_with("-d 172.18.0.2 -j KUBE-NODEPORTS"),
        "{last_services_rule}"
    );
    let lines: Vec<&str> = ipt.lines().collect();
    let nodeports_jump = lines.iter().position(|l| *l == last_services_rule).unwrap();
    let last_cluster_ip = lines
        .iter()
        .rposition(|l| l.starts_with("-A KUBE-SERVICES ") && l.contains("cluster IP"))
        .unwrap();
    assert!(last_cluster_ip < nodeports_jump);

    // nftables, per service: 4 chains (service, external, 2 endpoints), 8 rules, 3 elements.
    // (and the fixed service-endpoints-check chain)
    assert_eq!(count(&nft, "add chain ip kube-proxy service-"), n + 1);
    assert_eq!(count(&nft, "add chain ip kube-proxy external-"), n);
    assert_eq!(count(&nft, "add chain ip kube-proxy endpoint-"), 2 * n);
    assert_eq!(count(&nft, "add element ip kube-proxy service-ips "), n);
    assert_eq!(
        count(&nft, "add element ip kube-proxy service-nodeports "),
        n
    );
    assert_eq!(count(&nft, "add element ip kube-proxy cluster-ips "), n);
    let fixed_rules = count(
        &render(Mode::Nftables, &lab_input(&[], &[], &node_ips)).unwrap(),
        "add rule ",
    );
    assert_eq!(count(&nft, "add rule "), fixed_rules + 8 * n);
}

#[test]
fn endpoints_categorized_like_kube_proxy() {
    let ep = |ip: &str, node: Option<&str>, ready: bool, serving: bool, terminating: bool| {
        let mut e = json!({"addresses": [ip], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}});
        if let Some(n) = node {
            e["nodeName"] = json!(n);
        }
        e
    };
    let local_svc = |name: &str| {
        service(
            "ns",
            name,
            json!({"type": "NodePort", "externalTrafficPolicy": "Local", "clusterIP": "10.96.0.1",
                   "ports": [{"name": "p80", "port": 80, "nodePort": 30001}]}),
            json!({}),
        )
    };
    let services = vec![local_svc("a"), local_svc("b"), local_svc("c")];
    let slices = vec![
        // a: a remote ready endpoint and a local terminating-but-serving one: Local policy
        // falls back to the local serving-terminating endpoint; Cluster uses the ready one.
        slice(
            "ns",
            "a",
            json!([
                ep("10.1.0.1", Some("other"), true, true, false),
                ep("10.1.0.2", Some(TEST_NODE), false, true, true)
            ]),
        ),
        // b: not ready and not serving: nothing usable, so REJECT.
        slice(
            "ns",
            "b",
            json!([ep("10.1.0.3", Some(TEST_NODE), false, false, true)]),
        ),
        // c: a local ready endpoint; the not-ready local one is skipped.
        slice(
            "ns",
            "c",
            json!([
                ep("10.1.0.5", Some(TEST_NODE), true, true, false),
                ep("10.1.0.4", Some(TEST_NODE), false, false, false)
            ]),
        ),
    ];
    let node_ips = [Ipv4Addr::new(192, 168, 0, 2)];
    let input = lab_input(&services, &slices, &node_ips);
    let ipt = render(Mode::Iptables, &input).unwrap();
    let a = port("ns", "a", "p80", Proto::Tcp);
    let svl_a = format!("-A KUBE-SVL-{} ", names::port_proto_hash(&a));
    let svc_a = format!("-A KUBE-SVC-{} ", names::port_proto_hash(&a));
    let rules = |prefix: &str| -> Vec<String> {
        ipt.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        rules(&svl_a).iter().any(|r| r.contains("10.1.0.2:80")),
        "{ipt}"
    );
    assert!(
        rules(&svc_a).iter().any(|r| r.contains("10.1.0.1:80")),
        "{ipt}"
    );
    assert!(
        !rules(&svc_a).iter().any(|r| r.contains("10.1.0.2:80")),
        "{ipt}"
    );
    assert!(
        ipt.contains("-A KUBE-EXTERNAL-SERVICES -m comment --comment \"ns/b:p80 has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30001 -j REJECT"),
        "{ipt}"
    );
    let c = port("ns", "c", "p80", Proto::Tcp);
    let svl_c = rules(&format!("-A KUBE-SVL-{} ", names::port_proto_hash(&c)));
    assert_eq!(svl_c.len(), 1, "{svl_c:?}");
    assert!(svl_c[0].contains("10.1.0.5:80"));
    // eTP Local with a local endpoint: the EXT chain ends in the SVL chain, without masquerade
    // of outside clients (the client address is kept).
    let ext_c = rules(&format!("-A KUBE-EXT-{} ", names::port_proto_hash(&c)));
    assert_eq!(
        ext_c.last().unwrap(),
        &format!(
            "-A KUBE-EXT-{} -j KUBE-SVL-{}",
            names::port_proto_hash(&c),
            names::port_proto_hash(&c)
        )
    );
}

#[test]
fn sctp_is_refused_naming_the_service() {
    let services = vec![service(
        "ns",
        "sctp-svc",
        json!({"clusterIP": "10.96.0.1", "ports": [{"name": "s", "port": 9, "protocol": "SCTP"}]}),
        json!({}),
    )];
    let input = lab_input(&services, &[], &[]);
    let err = render(Mode::Iptables, &input).unwrap_err().to_string();
    assert!(err.contains("ns/sctp-svc") && err.contains("SCTP"), "{err}");
}
