//! kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go, `setupNFTables` and
//! `syncProxyRules`): `table ip kube-proxy` as a full sync leaves it, written as an `nft -f`
//! script in the form of kube-proxy's unit tests' dump (`add table`, sets and maps, chains, rules,
//! elements), which is what its knftables transaction creates on an empty table.
//!
//! The layout is kube-proxy 1.33's after kubernetes#132456 (cherry-picked to release-1.33 as
//! #133969, September 2025): filter chains `filter-prerouting-pre-dnat` and
//! `filter-output-pre-dnat` at priority -110, `filter-input/forward/output` at 0, and the
//! service chains' masquerade rule matching the cluster IP without the port, exactly as
//! `TestOverallNFTablesRules` expects. Earlier 1.33 releases ran all filter chains at -110 (plus
//! `filter-output-post-dnat` at -90) and also matched the port; per packet the difference is one
//! comparison.
//!
//! Every service is one element of a verdict map (`service-ips`, `service-nodeports`) looked up
//! by `ip daddr . meta l4proto . th dport`, so the cost does not grow with the service count;
//! each service port then has its own chains.
use std::fmt::Write as _;

use super::{
    Options, ProxyInput,
    model::{Endpoint, ServicePort},
    names, nodeport_ips,
};

const TABLE: &str = "ip kube-proxy";

/// Base chains: (name, type, hook, priority). The filter chains that look at pre-DNAT
/// addresses run before DNAT (dstnat - 10).
const BASE_CHAINS: &[(&str, &str, &str, &str)] = &[
    ("filter-prerouting-pre-dnat", "filter", "prerouting", "-110"),
    ("filter-output-pre-dnat", "filter", "output", "-110"),
    ("filter-forward", "filter", "forward", "0"),
    ("filter-input", "filter", "input", "0"),
    ("filter-output", "filter", "output", "0"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "100"),
    ("nat-prerouting", "nat", "prerouting", "-100"),
];

/// `nftablesJumpChains`: (destination, source, extra match), in kube-proxy's order (which is
/// the order of the rules within each base chain).
const JUMP_CHAINS: &[(&str, &str, &str)] = &[
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    (
        "firewall-check",
        "filter-prerouting-pre-dnat",
        "ct state new",
    ),
    ("firewall-check", "filter-output-pre-dnat", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    ("cluster-ips-check", "filter-output", "ct state new"),
];

/// The script, in sections so that tests can compare them with kube-proxy's dump.
#[derive(Default)]
pub struct Script {
    pub sets: Vec<String>,
    pub chains: Vec<String>,
    pub rules: Vec<String>,
    pub elements: Vec<String>,
}

impl Script {
    /// Chains before the rules that `goto` them, maps before the rules that look them up.
    pub fn to_nft(&self) -> String {
        let mut s = format!("add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}\n");
        for line in self
            .sets
            .iter()
            .chain(&self.chains)
            .chain(&self.rules)
            .chain(&self.elements)
        {
            s.push_str(line);
            s.push('\n');
        }
        s
    }

    fn chain(&mut self, name: &str) {
        self.chains.push(format!("add chain {TABLE} {name}"));
    }

    fn rule(&mut self, chain: &str, rule: impl std::fmt::Display) {
        self.rules.push(format!("add rule {TABLE} {chain} {rule}"));
    }

    fn element(&mut self, map: &str, body: impl std::fmt::Display) {
        self.elements
            .push(format!("add element {TABLE} {map} {{ {body} }}"));
    }
}

pub fn render(input: &ProxyInput, ports: &[ServicePort], opts: &Options) -> String {
    script(input, ports, opts).to_nft()
}

/// `setupNFTables` followed by `syncProxyRules` of a full sync.
pub fn script(input: &ProxyInput, ports: &[ServicePort], opts: &Options) -> Script {
    let mark = &opts.masquerade_mark;
    let nodeport_ips = nodeport_ips(input);
    let mut s = Script::default();

    let addr_proto_port = "ipv4_addr . inet_proto . inet_service";
    s.sets.extend([format!(
        "add set {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    )]);
    if nodeport_ips.is_some() {
        s.sets.push(format!(
            "add set {TABLE} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
        ));
    }
    s.sets.extend([
        format!("add map {TABLE} firewall-ips {{ type {addr_proto_port} : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"),
        format!("add map {TABLE} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"),
        format!("add map {TABLE} no-endpoint-services {{ type {addr_proto_port} : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"),
        format!("add map {TABLE} service-ips {{ type {addr_proto_port} : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"),
        format!("add map {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"),
    ]);

    for &(name, kind, hook, priority) in BASE_CHAINS {
        s.chains.push(format!(
            "add chain {TABLE} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        ));
    }
    for name in [
        "cluster-ips-check",
        "firewall-check",
        "mark-for-masquerade",
        "masquerading",
        "nodeport-endpoints-check",
        "services",
        "service-endpoints-check",
    ] {
        s.chain(name);
    }
    s.chains.push(format!(
        "add chain {TABLE} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    ));

    for &(dst, src, extra) in JUMP_CHAINS {
        let sep = if extra.is_empty() { "" } else { " " };
        s.rule(src, format!("{extra}{sep}jump {dst}"));
    }
    s.rule("mark-for-masquerade", format!("mark set mark or {mark}"));
    s.rule("masquerading", format!("mark and {mark} == 0 return"));
    s.rule("masquerading", format!("mark set mark xor {mark}"));
    s.rule("masquerading", "masquerade fully-random");
    s.rule(
        "cluster-ips-check",
        "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
    );
    if !opts.service_cidrs.is_empty() {
        let cidrs: Vec<String> = opts.service_cidrs.iter().map(|c| c.to_string()).collect();
        s.rule(
            "cluster-ips-check",
            format!(
                "ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
                cidrs.join(",")
            ),
        );
    }
    s.rule("reject-chain", "reject");
    s.rule(
        "service-endpoints-check",
        "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
    );
    s.rule(
        "firewall-check",
        "ip daddr . meta l4proto . th dport vmap @firewall-ips",
    );
    s.rule(
        "services",
        "ip daddr . meta l4proto . th dport vmap @service-ips",
    );
    match &nodeport_ips {
        None => {
            s.rule(
                "nodeport-endpoints-check",
                "ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports",
            );
            s.rule(
                "services",
                "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
            );
        }
        Some(ips) => {
            s.rule(
                "nodeport-endpoints-check",
                "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
            );
            s.rule(
                "services",
                "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
            );
            // kube-proxy skips loopback addresses here ("localhost NodePorts are not supported").
            for ip in ips.iter().filter(|ip| !ip.is_loopback()) {
                s.element("nodeport-ips", ip);
            }
        }
    }

    for sp in ports {
        service(&mut s, input, sp);
    }
    s
}

/// One service port's chains, rules and map elements (the body of `syncProxyRules`' loop).
fn service(s: &mut Script, input: &ProxyInput, sp: &ServicePort) {
    let proto = sp.proto.lower();
    let name = sp.name_string();
    let base = names::nft_service_base(sp);
    let cluster_chain = format!("service-{base}");
    let local_chain = format!("local-{base}");
    let ext_chain = format!("external-{base}");
    let fw_chain = format!("firewall-{base}");
    let cidr = input.cluster_cidr;
    let cat = sp.categorize();
    // Each endpoint's name hashed once: cluster and local are subsets of reachable.
    let bases: Vec<(&Endpoint, String)> = cat
        .reachable
        .iter()
        .map(|ep| (*ep, names::nft_endpoint_base(sp, ep)))
        .collect();
    let base_of = |ep: &Endpoint| -> &str {
        bases
            .iter()
            .find(|(e, _)| std::ptr::eq(*e, ep))
            .map(|(_, b)| b.as_str())
            .expect("cluster and local endpoints are reachable")
    };
    let endpoint_chain = |ep| format!("endpoint-{}", base_of(ep));
    let affinity_set = |ep| format!("affinity-{}", base_of(ep));

    for ep in &cat.reachable {
        s.chain(&endpoint_chain(ep));
    }
    let uses_cluster_chain = !cat.cluster.is_empty() && sp.uses_cluster_endpoints();
    if uses_cluster_chain {
        s.chain(&cluster_chain);
    }
    let uses_local_chain = !cat.local.is_empty() && sp.uses_local_endpoints();
    if uses_local_chain {
        s.chain(&local_chain);
    }
    let has_endpoints = cat.has_any;
    let mut internal_chain = &cluster_chain;
    let mut has_internal = has_endpoints;
    if sp.internal_policy_local() {
        internal_chain = &local_chain;
        has_internal &= !cat.local.is_empty();
    }
    let mut external_policy_chain = &cluster_chain;
    let mut has_external = has_endpoints;
    if sp.external_policy_local() {
        external_policy_chain = &local_chain;
        has_external &= !cat.local.is_empty();
    }
    let uses_ext_chain = has_endpoints && sp.externally_accessible();
    if uses_ext_chain {
        s.chain(&ext_chain);
    }
    let (internal_verdict, external_verdict) = if !has_endpoints {
        ("goto reject-chain", "goto reject-chain")
    } else {
        ("drop", "drop")
    };

    s.element("cluster-ips", sp.cluster_ip);
    let key = |ip: &dyn std::fmt::Display| format!("{ip} . {proto} . {}", sp.port);
    if has_internal {
        s.element(
            "service-ips",
            format!("{} : goto {internal_chain}", key(&sp.cluster_ip)),
        );
    } else {
        s.element(
            "no-endpoint-services",
            format!(
                "{} comment \"{name}\" : {internal_verdict}",
                key(&sp.cluster_ip)
            ),
        );
    }
    for ip in &sp.external_ips {
        if has_endpoints {
            s.element("service-ips", format!("{} : goto {ext_chain}", key(ip)));
        }
        if !has_external {
            s.element(
                "no-endpoint-services",
                format!("{} comment \"{name}\" : {external_verdict}", key(ip)),
            );
        }
    }
    let uses_fw_chain = !sp.lb_ips.is_empty() && !sp.source_ranges.is_empty();
    if uses_fw_chain {
        s.chain(&fw_chain);
    }
    for ip in &sp.lb_ips {
        if has_endpoints {
            s.element("service-ips", format!("{} : goto {ext_chain}", key(ip)));
        }
        if uses_fw_chain {
            s.element("firewall-ips", format!("{} : goto {fw_chain}", key(ip)));
        }
    }
    if !has_external {
        for ip in &sp.lb_ips {
            s.element(
                "no-endpoint-services",
                format!("{} comment \"{name}\" : {external_verdict}", key(ip)),
            );
        }
    }
    if sp.node_port != 0 {
        if has_endpoints {
            s.element(
                "service-nodeports",
                format!("{proto} . {} : goto {ext_chain}", sp.node_port),
            );
        }
        if !has_external {
            s.element(
                "no-endpoint-nodeports",
                format!(
                    "{proto} . {} comment \"{name}\" : {external_verdict}",
                    sp.node_port
                ),
            );
        }
    }

    if has_internal {
        s.rule(
            internal_chain,
            format!(
                "ip daddr {} ip saddr != {cidr} jump mark-for-masquerade",
                sp.cluster_ip
            ),
        );
    }
    if uses_ext_chain {
        if !sp.external_policy_local() {
            s.rule(&ext_chain, "jump mark-for-masquerade");
        } else {
            s.rule(
                &ext_chain,
                format!(
                    "ip saddr {cidr} goto {cluster_chain} comment \"short-circuit pod traffic\""
                ),
            );
            s.rule(
                &ext_chain,
                "fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"",
            );
            s.rule(
                &ext_chain,
                format!(
                    "fib saddr type local goto {cluster_chain} comment \"short-circuit local traffic\""
                ),
            );
        }
        if has_external {
            s.rule(&ext_chain, format!("goto {external_policy_chain}"));
        }
    }
    if uses_fw_chain {
        let mut sources: Vec<String> = sp.source_ranges.iter().map(|r| r.to_string()).collect();
        if input
            .node_ips
            .first()
            .is_some_and(|n| sp.source_ranges.iter().any(|r| r.contains(n)))
        {
            sources.extend(sp.lb_ips.iter().map(|ip| ip.to_string()));
        }
        s.rule(
            &fw_chain,
            format!("ip saddr != {{ {} }} drop", sources.join(" , ")),
        );
    }
    if let Some(seconds) = sp.affinity_seconds {
        for ep in &cat.reachable {
            s.sets.push(format!(
                "add set {TABLE} {} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {seconds}s ; }}",
                affinity_set(ep)
            ));
        }
    }
    for (uses, chain, endpoints) in [
        (uses_cluster_chain, &cluster_chain, &cat.cluster),
        (uses_local_chain, &local_chain, &cat.local),
    ] {
        if !uses {
            continue;
        }
        // `writeServiceToEndpointRules`: affinity lookups, then one random pick among n.
        if sp.affinity_seconds.is_some() {
            for ep in endpoints.iter() {
                s.rule(
                    chain,
                    format!("ip saddr @{} goto {}", affinity_set(ep), endpoint_chain(ep)),
                );
            }
        }
        let mut vmap = String::new();
        for (i, ep) in endpoints.iter().enumerate() {
            if i > 0 {
                vmap.push_str(" , ");
            }
            let _ = write!(vmap, "{i} : goto {}", endpoint_chain(ep));
        }
        s.rule(
            chain,
            format!("numgen random mod {} vmap {{ {vmap} }}", endpoints.len()),
        );
    }
    for ep in &cat.reachable {
        let chain = endpoint_chain(ep);
        s.rule(
            &chain,
            format!("ip saddr {} jump mark-for-masquerade", ep.ip),
        );
        if sp.affinity_seconds.is_some() {
            s.rule(
                &chain,
                format!("update @{} {{ ip saddr }}", affinity_set(ep)),
            );
        }
        s.rule(
            &chain,
            format!("meta l4proto {proto} dnat to {}", ep.addr()),
        );
    }
}
