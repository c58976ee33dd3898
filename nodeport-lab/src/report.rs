//! The lab's report: every node address on every nodePort (from the client, and from a process
//! on that node itself), how N requests spread over the backends, the client address the pods
//! saw, and the agents' decoded maps.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use k8s_openapi::api::core::v1::Service;

use crate::{
    lab::{Answer, CLIENT_ADDR, Lab},
    probe::Proto,
    sys,
};

const TIMEOUT: Duration = Duration::from_millis(700);

/// A service's nodePort frontends: (name, nodePort, protocol, eTP Local).
fn frontends(svc: &Service) -> Vec<(String, u16, String, bool)> {
    let name = format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or_default()
    );
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    spec.ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some((
                name.clone(),
                u16::try_from(p.node_port?).ok()?,
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                local,
            ))
        })
        .collect()
}

/// One request (TCP: an HTTP GET on a new connection; UDP: one datagram from a new socket).
pub fn ask(lab: &Lab, addr: Ipv4Addr, port: u16, proto: &str) -> anyhow::Result<Answer> {
    if proto == "UDP" {
        lab.udp(addr, port, TIMEOUT)
    } else {
        lab.get(addr, port, TIMEOUT)
    }
}

/// Pearson's chi-squared statistic of `counts` against a uniform spread.
pub fn chi_squared(counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    if counts.is_empty() || total == 0 {
        return 0.0;
    }
    let expected = total as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

/// The chi-squared value that a uniform spread exceeds with probability 0.001, for `df` degrees
/// of freedom (Wilson–Hilferty approximation: within 4% of the tables, slightly above them for small df).
pub fn chi_squared_bound(df: usize) -> f64 {
    let k = df.max(1) as f64;
    let z = 3.090_232; // the standard normal's 0.999 quantile
    let h = 2.0 / (9.0 * k);
    k * (1.0 - h + z * h.sqrt()).powi(3)
}

/// The report: `requests` requests per frontend for the spread.
pub fn report(lab: &Lab, requests: usize) -> anyhow::Result<String> {
    let c = lab.config();
    let nodes = lab.nodes();
    let services = lab.services()?;
    let mut out = String::new();
    let w = &mut out;
    writeln!(
        w,
        "nodeport lab {:?}: {} nodes, {} pods, client {} in netns {}",
        c.prefix,
        nodes.len(),
        lab.pods().len(),
        CLIENT_ADDR,
        c.client_ns()
    )?;
    writeln!(w)?;
    writeln!(
        w,
        "nodes (netns = node name; \"docker network\" 198.18.0.0/24 on a bridge in {})",
        c.net_ns()
    )?;
    for n in &nodes {
        let pods = lab.pods().iter().filter(|p| p.node == n.name).count();
        writeln!(
            w,
            "  {:<24} {:<12} pod CIDR {:<15} {pods:>2} pods{}",
            n.name,
            n.addr,
            n.pod_cidr(),
            if n.control_plane {
                "  (control-plane, tainted NoSchedule)"
            } else {
                ""
            },
        )?;
    }

    for svc in &services {
        for (name, port, proto, local) in frontends(svc) {
            writeln!(w)?;
            writeln!(
                w,
                "{name}  nodePort {port}/{proto}  externalTrafficPolicy {}",
                if local { "Local" } else { "Cluster" }
            )?;
            // Every node address, one request each.
            for n in &nodes {
                match ask(lab, n.addr, port, &proto) {
                    Ok(a) => {
                        let local_backend = a.node == n.name;
                        let expect = if local_backend {
                            CLIENT_ADDR.to_string()
                        } else {
                            n.addr.to_string()
                        };
                        writeln!(
                            w,
                            "  {:>12}:{port:<5} -> {} ({}:{} on {}); pod saw client {} ({}{})",
                            n.addr,
                            a.pod,
                            a.pod_ip,
                            a.port,
                            a.node,
                            a.client,
                            if local_backend {
                                "local backend: the real client"
                            } else {
                                "remote backend: SNAT to the node"
                            },
                            if a.client == expect {
                                ""
                            } else {
                                ", UNEXPECTED"
                            }
                        )?;
                    }
                    Err(e) => writeln!(
                        w,
                        "  {:>12}:{port:<5} -> no answer{} ({})",
                        n.addr,
                        if local {
                            ", as eTP Local wants on a node without a local pod"
                        } else {
                            ""
                        },
                        e.root_cause()
                    )?,
                }
            }
            // Each node's own processes to its own address: no packet crosses eth0's ingress,
            // the socket programs on the node's cgroup pick the backend at connect()/sendto().
            let how = if proto == "UDP" {
                Proto::Udp
            } else {
                Proto::Tcp
            };
            for n in &nodes {
                let target = SocketAddrV4::new(n.addr, port);
                match lab.exec_on_node(&n.name, target, how, TIMEOUT) {
                    Ok(x) => writeln!(
                        w,
                        "  {:>12}:{port:<5} from a process on {} itself -> {} on {}; pod saw {} \
                         (socket load balancing, no NAT)",
                        n.addr, n.name, x.answer.pod, x.answer.node, x.answer.client
                    )?,
                    Err(e) => writeln!(
                        w,
                        "  {:>12}:{port:<5} from a process on {} itself -> {}",
                        n.addr, n.name, e.failure
                    )?,
                }
            }
            // The spread of `requests` requests, over the node addresses in turn.
            let mut counts: BTreeMap<String, (String, String, usize)> = BTreeMap::new();
            let (mut real, mut snat, mut wrong, mut failed) = (0, 0, 0, 0);
            for i in 0..requests {
                let n = &nodes[i % nodes.len()];
                match ask(lab, n.addr, port, &proto) {
                    Ok(a) => {
                        let e = counts.entry(a.pod.clone()).or_insert((
                            a.pod_ip.clone(),
                            a.node.clone(),
                            0,
                        ));
                        e.2 += 1;
                        if a.node == n.name && a.client == CLIENT_ADDR.to_string() {
                            real += 1;
                        } else if a.node != n.name && a.client == n.addr.to_string() {
                            snat += 1;
                        } else {
                            wrong += 1;
                        }
                    }
                    Err(_) => failed += 1,
                }
            }
            let answered: usize = counts.values().map(|v| v.2).sum();
            writeln!(
                w,
                "  {requests} requests over the node addresses in turn: {answered} answered{}",
                if failed > 0 {
                    format!(", {failed} without answer")
                } else {
                    String::new()
                }
            )?;
            for (pod, (ip, node, count)) in &counts {
                writeln!(
                    w,
                    "    {pod:<34} {ip:<12} {node:<24} {count:>5}  {:5.1}%  {}",
                    100.0 * *count as f64 / answered.max(1) as f64,
                    "#".repeat((40 * count).div_ceil(answered.max(1)))
                )?;
            }
            if counts.len() > 1 {
                let v: Vec<usize> = counts.values().map(|v| v.2).collect();
                let chi = chi_squared(&v);
                let bound = chi_squared_bound(v.len() - 1);
                writeln!(
                    w,
                    "    uniform? chi-squared {chi:.1} with {} degrees of freedom ({} the p=0.001 bound {bound:.1})",
                    v.len() - 1,
                    if chi <= bound { "within" } else { "ABOVE" }
                )?;
            }
            writeln!(
                w,
                "  client address seen: {real} local-backend answers saw the client {CLIENT_ADDR}, {snat} remote-backend answers saw the node's address (SNAT){}",
                if wrong > 0 {
                    format!(", {wrong} UNEXPECTED")
                } else {
                    String::new()
                }
            )?;
        }
    }

    writeln!(w)?;
    writeln!(
        w,
        "decoded map state (nodeport-agent list services --pin-root /sys/fs/bpf/<node>)"
    )?;
    for n in &nodes {
        writeln!(w, "  {} ({}):", n.name, n.addr)?;
        match lab.agent_list(&n.name, "services", false) {
            Ok(text) => {
                for line in text.lines() {
                    writeln!(w, "    {line}")?;
                }
            }
            Err(e) => writeln!(w, "    cannot list: {e:#}")?,
        }
    }
    Ok(out)
}

/// How to use the running lab.
pub fn usage(lab: &Lab) -> String {
    let c = lab.config();
    let services = lab.services().unwrap_or_default();
    let mut out = String::new();
    let node = lab
        .nodes()
        .get(1)
        .map(|n| n.addr)
        .unwrap_or(Ipv4Addr::new(198, 18, 0, 3));
    let tcp = services.iter().flat_map(frontends).find(|f| f.2 == "TCP");
    let udp = services.iter().flat_map(frontends).find(|f| f.2 == "UDP");
    let _ = writeln!(out, "The lab {:?} is running.", c.prefix);
    if let Some((_, port, _, _)) = tcp {
        let _ = writeln!(
            out,
            "  curl it:    ip netns exec {} curl -s http://{node}:{port}/",
            c.client_ns()
        );
    }
    if let Some((_, port, _, _)) = udp {
        let _ = writeln!(
            out,
            "  UDP:        echo hi | ip netns exec {} socat -t1 - UDP:{node}:{port}",
            c.client_ns()
        );
    }
    let _ = writeln!(
        out,
        "  maps:       {} list services --pin-root {}",
        c.agent.display(),
        c.pin_root(&lab.nodes()[1].name).display()
    );
    let _ = writeln!(
        out,
        "  change:     edit {}/*.yaml, then cargo xtask lab apply",
        c.workloads.display()
    );
    let _ = writeln!(
        out,
        "  state:      cargo xtask lab status (agent logs in {}/agents/)",
        c.state_dir().display()
    );
    let _ = write!(out, "  tear down:  cargo xtask lab down");
    out
}

/// Nodes, agents, pods and services of a running lab.
pub fn status(lab: &Lab) -> String {
    let c = lab.config();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lab {:?} (state {})",
        c.prefix,
        c.state_dir().display()
    );
    for n in lab.nodes() {
        let pid = sys::read_pid(&c.state_dir().join("agents").join(format!("{}.pid", n.name)));
        let running = pid.is_some_and(|p| sys::alive(p) && sys::runs(p, "nodeport-agent"));
        let _ = writeln!(
            out,
            "  node {:<24} {:<12} agent {}",
            n.name,
            n.addr,
            match (pid, running) {
                (Some(p), true) => format!("running (pid {p})"),
                _ => "NOT RUNNING".to_owned(),
            }
        );
    }
    for p in lab.pods() {
        let _ = writeln!(
            out,
            "  pod  {:<34} {:<12} on {:<24} labels {:?}{}",
            p.name,
            p.ip,
            p.node,
            p.labels,
            if p.terminating { " terminating" } else { "" }
        );
    }
    for s in lab.services().unwrap_or_default() {
        for (name, port, proto, local) in frontends(&s) {
            let _ = writeln!(
                out,
                "  svc  {name:<34} nodePort {port}/{proto}{}",
                if local { " eTP Local" } else { "" }
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_squared_bounds_match_the_tables() {
        // p = 0.001 critical values: df 1: 10.83, df 2: 13.82, df 5: 20.52.
        for (df, table) in [(1, 10.83), (2, 13.82), (5, 20.52)] {
            let b = chi_squared_bound(df);
            assert!((b - table).abs() / table < 0.04, "df {df}: {b} vs {table}");
        }
        assert_eq!(chi_squared(&[10, 10, 10]), 0.0);
        assert!(chi_squared(&[30, 0, 0]) > chi_squared_bound(2));
    }
}
