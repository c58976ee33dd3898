//! kube-proxy's iptables mode (pkg/proxy/iptables/proxier.go, `syncProxyRules` and
//! `iptablesJumpChains`): the iptables-restore input of a full sync, `*filter` then `*nat`, in the
//! order kube-proxy writes it, preceded in each table by the jumps from the built-in chains that
//! kube-proxy adds with `iptables -I` (`EnsureRule(Prepend)`), so that one `iptables-restore
//! --noflush` installs all of it.
//!
//! Left out: `KUBE-PROXY-CANARY` (the monitor's probe chain in mangle/nat/filter), the
//! partial-sync optimisation and the removal of stale chains (a full sync on a clean namespace
//! writes neither).
use std::fmt::Write as _;

use super::{
    Options, ProxyInput,
    model::{Endpoint, ServicePort},
    names, nodeport_ips,
};

const KUBE_SERVICES: &str = "KUBE-SERVICES";
const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
const KUBE_FORWARD: &str = "KUBE-FORWARD";
const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
const KUBE_FIREWALL: &str = "KUBE-FIREWALL";
/// kube-proxy's `largeClusterEndpointsThreshold`: above it, endpoint rules lose their comments.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;
/// The comment of the rule kube-proxy adds when it enables `route_localnet`.
pub const LOCALNET_FIREWALL_COMMENT: &str = "\"block incoming localnet connections\"";

/// `iptablesJumpChains` then `iptablesKubeletJumpChains`: (table, source, destination, extra
/// matches, comment).
const JUMPS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "filter",
        "INPUT",
        KUBE_EXTERNAL_SERVICES,
        "-m conntrack --ctstate NEW",
        "kubernetes externally-visible service portals",
    ),
    (
        "filter",
        "FORWARD",
        KUBE_EXTERNAL_SERVICES,
        "-m conntrack --ctstate NEW",
        "kubernetes externally-visible service portals",
    ),
    (
        "filter",
        "INPUT",
        KUBE_NODEPORTS,
        "",
        "kubernetes health check service ports",
    ),
    (
        "filter",
        "FORWARD",
        KUBE_SERVICES,
        "-m conntrack --ctstate NEW",
        "kubernetes service portals",
    ),
    (
        "filter",
        "OUTPUT",
        KUBE_SERVICES,
        "-m conntrack --ctstate NEW",
        "kubernetes service portals",
    ),
    (
        "filter",
        "FORWARD",
        KUBE_FORWARD,
        "",
        "kubernetes forwarding rules",
    ),
    (
        "filter",
        "INPUT",
        KUBE_PROXY_FIREWALL,
        "-m conntrack --ctstate NEW",
        "kubernetes load balancer firewall",
    ),
    (
        "filter",
        "OUTPUT",
        KUBE_PROXY_FIREWALL,
        "-m conntrack --ctstate NEW",
        "kubernetes load balancer firewall",
    ),
    (
        "filter",
        "FORWARD",
        KUBE_PROXY_FIREWALL,
        "-m conntrack --ctstate NEW",
        "kubernetes load balancer firewall",
    ),
    (
        "nat",
        "OUTPUT",
        KUBE_SERVICES,
        "",
        "kubernetes service portals",
    ),
    (
        "nat",
        "PREROUTING",
        KUBE_SERVICES,
        "",
        "kubernetes service portals",
    ),
    (
        "nat",
        "POSTROUTING",
        KUBE_POSTROUTING,
        "",
        "kubernetes postrouting rules",
    ),
    ("filter", "INPUT", KUBE_FIREWALL, "", ""),
    ("filter", "OUTPUT", KUBE_FIREWALL, "", ""),
];

/// The rules kube-proxy writes, as separate parts so that tests can compare the restore input
/// alone with kube-proxy's unit tests.
#[derive(Default)]
pub struct Tables {
    /// `-I BUILTIN 1 …` jumps, per table, in kube-proxy's `EnsureRule(Prepend)` order.
    pub filter_jumps: Vec<String>,
    pub nat_jumps: Vec<String>,
    pub filter_chains: Vec<String>,
    pub filter_rules: Vec<String>,
    pub nat_chains: Vec<String>,
    pub nat_rules: Vec<String>,
}

impl Tables {
    /// iptables-restore input: each table's chain lines, the jumps into them, then the rules.
    pub fn to_restore(&self) -> String {
        let mut s = String::new();
        for (name, chains, jumps, rules) in [
            (
                "filter",
                &self.filter_chains,
                &self.filter_jumps,
                &self.filter_rules,
            ),
            ("nat", &self.nat_chains, &self.nat_jumps, &self.nat_rules),
        ] {
            let _ = writeln!(s, "*{name}");
            for line in chains.iter().chain(jumps).chain(rules) {
                s.push_str(line);
                s.push('\n');
            }
            s.push_str("COMMIT\n");
        }
        s
    }
}

pub fn render(input: &ProxyInput, ports: &[ServicePort], opts: &Options) -> String {
    tables(input, ports, opts).to_restore()
}

fn chain_line(chain: &str) -> String {
    format!(":{chain} - [0:0]")
}

/// kube-proxy's `computeProbability`: `%0.10f` of 1/n.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// `syncProxyRules` of a full sync.
pub fn tables(input: &ProxyInput, ports: &[ServicePort], opts: &Options) -> Tables {
    let mark = &opts.masquerade_mark;
    let cidr = input.cluster_cidr.to_string();
    let nodeport_ips = nodeport_ips(input);
    // `--iptables-localhost-nodeports` (default true) stays on only if the nodePort addresses
    // include 127.0.0.1, i.e. match all.
    let localhost_nodeports = nodeport_ips.is_none();
    let mut t = Tables::default();

    for &(table, src, dst, extra, comment) in JUMPS {
        let mut rule = format!("-I {src} 1");
        if !extra.is_empty() {
            let _ = write!(rule, " {extra}");
        }
        if !comment.is_empty() {
            let _ = write!(rule, " -m comment --comment \"{comment}\"");
        }
        let _ = write!(rule, " -j {dst}");
        match table {
            "filter" => t.filter_jumps.push(rule),
            _ => t.nat_jumps.push(rule),
        }
    }

    for chain in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ] {
        t.filter_chains.push(chain_line(chain));
    }
    for chain in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ] {
        t.nat_chains.push(chain_line(chain));
    }
    t.nat_rules.extend([
        format!("-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"),
        format!("-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}"),
        format!(
            "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{}",
            if opts.random_fully { " --random-fully" } else { "" }
        ),
        format!("-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}"),
    ]);
    // kubelet's KUBE-FIREWALL chain always exists (kube-proxy ensures it); its rule only where
    // route_localnet opens 127.0.0.0/8 to nodePorts (https://issues.k8s.io/90259).
    t.filter_chains.push(chain_line(KUBE_FIREWALL));
    if localhost_nodeports {
        t.filter_rules.push(format!(
            "-A {KUBE_FIREWALL} -m comment --comment {LOCALNET_FIREWALL_COMMENT} -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        ));
    }

    let total_endpoints: usize = ports.iter().map(|p| p.endpoints.len()).sum();
    let large_cluster = total_endpoints > LARGE_CLUSTER_ENDPOINTS;
    let with_comment = |rule: String, comment: &str| -> String {
        if large_cluster {
            rule
        } else {
            format!("{rule} -m comment --comment {comment}")
        }
    };

    for sp in ports {
        let proto = sp.proto.lower();
        let name = sp.name_string();
        let hash = names::port_proto_hash(sp);
        let cluster_chain = format!("KUBE-SVC-{hash}");
        let local_chain = format!("KUBE-SVL-{hash}");
        let fw_chain = format!("KUBE-FW-{hash}");
        let ext_chain = format!("KUBE-EXT-{hash}");
        let cat = sp.categorize();
        let uses_cluster_chain = !cat.cluster.is_empty() && sp.uses_cluster_endpoints();
        let uses_local_chain = !cat.local.is_empty() && sp.uses_local_endpoints();
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
        let uses_fw_chain = has_endpoints && !sp.lb_ips.is_empty() && !sp.source_ranges.is_empty();
        let lb_chain = if uses_fw_chain { &fw_chain } else { &ext_chain };

        let (internal_target, internal_comment, external_target, external_comment) =
            if !has_endpoints {
                let c = format!("\"{name} has no endpoints\"");
                ("REJECT", c.clone(), "REJECT", c)
            } else {
                let c = format!("\"{name} has no local endpoints\"");
                ("DROP", c.clone(), "DROP", c)
            };
        let dst = |ip: &dyn std::fmt::Display, port: u16| {
            format!("-m {proto} -p {proto} -d {ip} --dport {port}")
        };

        if has_internal {
            t.nat_rules.push(format!(
                "-A {KUBE_SERVICES} -m comment --comment \"{name} cluster IP\" {} -j {internal_chain}",
                dst(&sp.cluster_ip, sp.port)
            ));
        } else {
            t.filter_rules.push(format!(
                "-A {KUBE_SERVICES} -m comment --comment {internal_comment} {} -j {internal_target}",
                dst(&sp.cluster_ip, sp.port)
            ));
        }
        for ip in &sp.external_ips {
            if has_endpoints {
                t.nat_rules.push(format!(
                    "-A {KUBE_SERVICES} -m comment --comment \"{name} external IP\" {} -j {ext_chain}",
                    dst(ip, sp.port)
                ));
            }
            if !has_external {
                t.filter_rules.push(format!(
                    "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} {} -j {external_target}",
                    dst(ip, sp.port)
                ));
            }
        }
        for ip in &sp.lb_ips {
            if has_endpoints {
                t.nat_rules.push(format!(
                    "-A {KUBE_SERVICES} -m comment --comment \"{name} loadbalancer IP\" {} -j {lb_chain}",
                    dst(ip, sp.port)
                ));
            }
            if uses_fw_chain {
                t.filter_rules.push(format!(
                    "-A {KUBE_PROXY_FIREWALL} -m comment --comment \"{name} traffic not accepted by {fw_chain}\" {} -j DROP",
                    dst(ip, sp.port)
                ));
            }
        }
        if !has_external {
            for ip in &sp.lb_ips {
                t.filter_rules.push(format!(
                    "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} {} -j {external_target}",
                    dst(ip, sp.port)
                ));
            }
        }
        if sp.node_port != 0 {
            let np = sp.node_port;
            if has_endpoints {
                if localhost_nodeports && opts.nfacct {
                    t.nat_rules.push(format!(
                        "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} -d 127.0.0.0/8 --dport {np} -m nfacct --nfacct-name localhost_nps_accepted_pkts -j {ext_chain}"
                    ));
                }
                t.nat_rules.push(format!(
                    "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} --dport {np} -j {ext_chain}"
                ));
            }
            if !has_external {
                t.filter_rules.push(format!(
                    "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j {external_target}"
                ));
            }
        }
        if sp.health_check_node_port != 0 {
            t.filter_rules.push(format!(
                "-A {KUBE_NODEPORTS} -m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {} -j ACCEPT",
                sp.health_check_node_port
            ));
        }

        if has_internal {
            t.nat_rules.push(format!(
                "-A {internal_chain} -m comment --comment \"{name} cluster IP\" {} ! -s {cidr} -j {KUBE_MARK_MASQ}",
                dst(&sp.cluster_ip, sp.port)
            ));
        }
        if uses_ext_chain {
            t.nat_chains.push(chain_line(&ext_chain));
            if !sp.external_policy_local() {
                t.nat_rules.push(format!(
                    "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j {KUBE_MARK_MASQ}"
                ));
            } else {
                t.nat_rules.extend([
                    format!(
                        "-A {ext_chain} -m comment --comment \"pod traffic for {name} external destinations\" -s {cidr} -j {cluster_chain}"
                    ),
                    format!(
                        "-A {ext_chain} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
                    ),
                    format!(
                        "-A {ext_chain} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {cluster_chain}"
                    ),
                ]);
            }
            if has_external {
                t.nat_rules
                    .push(format!("-A {ext_chain} -j {external_policy_chain}"));
            }
        }
        if uses_fw_chain {
            t.nat_chains.push(chain_line(&fw_chain));
            let head = format!("-A {fw_chain} -m comment --comment \"{name} loadbalancer IP\"");
            let mut allow_from_node = false;
            for range in &sp.source_ranges {
                t.nat_rules
                    .push(format!("{head} -s {range} -j {ext_chain}"));
                allow_from_node |= input.node_ips.first().is_some_and(|ip| range.contains(ip));
            }
            if allow_from_node {
                for ip in &sp.lb_ips {
                    t.nat_rules.push(format!("{head} -s {ip} -j {ext_chain}"));
                }
            }
            t.nat_rules.push(format!(
                "-A {fw_chain} -m comment --comment \"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\""
            ));
        }

        // Each endpoint's chain name hashed once: cluster and local are subsets of reachable.
        let seps: Vec<(&Endpoint, String)> = cat
            .reachable
            .iter()
            .map(|ep| (*ep, names::iptables_endpoint_chain(sp, ep)))
            .collect();
        let sep_of = |ep: &Endpoint| -> &str {
            seps.iter()
                .find(|(e, _)| std::ptr::eq(*e, ep))
                .map(|(_, c)| c.as_str())
                .expect("cluster and local endpoints are reachable")
        };
        for (uses, chain, endpoints) in [
            (uses_cluster_chain, &cluster_chain, &cat.cluster),
            (uses_local_chain, &local_chain, &cat.local),
        ] {
            if !uses {
                continue;
            }
            t.nat_chains.push(chain_line(chain));
            // `writeServiceToEndpointRules`: affinity lookups first, then 1/n, 1/(n-1), …, 1.
            if let Some(seconds) = sp.affinity_seconds {
                for ep in endpoints.iter() {
                    let sep = sep_of(ep);
                    let rule = with_comment(
                        format!("-A {chain}"),
                        &format!("\"{name} -> {}\"", ep.addr()),
                    );
                    t.nat_rules.push(format!(
                        "{rule} -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}"
                    ));
                }
            }
            let n = endpoints.len();
            for (i, ep) in endpoints.iter().enumerate() {
                let sep = sep_of(ep);
                let mut rule = with_comment(
                    format!("-A {chain}"),
                    &format!("\"{name} -> {}\"", ep.addr()),
                );
                if i < n - 1 {
                    let _ = write!(
                        rule,
                        " -m statistic --mode random --probability {}",
                        probability(n - i)
                    );
                }
                let _ = write!(rule, " -j {sep}");
                t.nat_rules.push(rule);
            }
        }

        for (ep, sep) in &seps {
            t.nat_chains.push(chain_line(sep));
            let head = with_comment(format!("-A {sep}"), &name);
            t.nat_rules
                .push(format!("{head} -s {} -j {KUBE_MARK_MASQ}", ep.ip));
            let mut dnat = head;
            if sp.affinity_seconds.is_some() {
                let _ = write!(dnat, " -m recent --name {sep} --set");
            }
            let _ = write!(
                dnat,
                " -m {proto} -p {proto} -j DNAT --to-destination {}",
                ep.addr()
            );
            t.nat_rules.push(dnat);
        }
    }

    // The nodePorts jump must be the last rule of KUBE-SERVICES: anything addressed to a local
    // address falls through every service's rules first.
    let nodeports_comment =
        "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    match &nodeport_ips {
        None => {
            let mut rule = format!(
                "-A {KUBE_SERVICES} -m comment --comment {nodeports_comment} -m addrtype --dst-type LOCAL"
            );
            if !localhost_nodeports {
                rule.push_str(" ! -d 127.0.0.0/8");
            }
            let _ = write!(rule, " -j {KUBE_NODEPORTS}");
            t.nat_rules.push(rule);
        }
        Some(ips) => {
            for ip in ips.iter().filter(|ip| !ip.is_loopback()) {
                t.nat_rules.push(format!(
                    "-A {KUBE_SERVICES} -m comment --comment {nodeports_comment} -d {ip} -j {KUBE_NODEPORTS}"
                ));
            }
        }
    }

    if !opts.conntrack_tcp_be_liberal {
        let mut rule = format!("-A {KUBE_FORWARD} -m conntrack --ctstate INVALID");
        if opts.nfacct {
            rule.push_str(" -m nfacct --nfacct-name ct_state_invalid_dropped_pkts");
        }
        rule.push_str(" -j DROP");
        t.filter_rules.push(rule);
    }
    t.filter_rules.extend([
        format!(
            "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
        ),
        format!(
            "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        ),
    ]);
    t
}

/// Removes kube-proxy's chains (every `KUBE-*` chain of filter and nat) and the jumps into them
/// from the built-in chains, in one `iptables-restore --noflush` per table, from both backends
/// (nf_tables, and x_tables where its tables exist); other rules stay.
pub fn remove(netns: &str) -> anyhow::Result<()> {
    remove_from(
        netns,
        "iptables-nft-save",
        "iptables-nft-restore",
        &["filter", "nat"],
    )?;
    // Saving a legacy table creates it: only look at the ones that exist.
    let legacy =
        super::exec_stdin(netns, &["cat", "/proc/net/ip_tables_names"], "").unwrap_or_default();
    let tables: Vec<&str> = ["filter", "nat"]
        .into_iter()
        .filter(|t| legacy.lines().any(|l| l.trim() == *t))
        .collect();
    remove_from(
        netns,
        "iptables-legacy-save",
        "iptables-legacy-restore",
        &tables,
    )
}

fn remove_from(netns: &str, save: &str, restore: &str, tables: &[&str]) -> anyhow::Result<()> {
    for &table in tables {
        let saved = super::exec_stdin(netns, &[save, "-t", table], "")?;
        let mut chains = Vec::new();
        let mut deletes = Vec::new();
        for line in saved.lines() {
            if let Some(rest) = line.strip_prefix(":KUBE-") {
                let name = rest.split_whitespace().next().unwrap_or_default();
                chains.push(format!("KUBE-{name}"));
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or_default();
                if !chain.starts_with("KUBE-") && rule.contains(" -j KUBE-") {
                    deletes.push(format!("-D {rule}"));
                }
            }
        }
        if chains.is_empty() && deletes.is_empty() {
            continue;
        }
        let mut script = format!("*{table}\n");
        for line in deletes {
            script.push_str(&line);
            script.push('\n');
        }
        // A chain line flushes the chain under --noflush; then it can be deleted.
        for c in &chains {
            let _ = writeln!(script, ":{c} - [0:0]");
        }
        for c in &chains {
            let _ = writeln!(script, "-X {c}");
        }
        script.push_str("COMMIT\n");
        super::exec_stdin(netns, &[restore, "-w", "--noflush"], &script)?;
    }
    Ok(())
}
