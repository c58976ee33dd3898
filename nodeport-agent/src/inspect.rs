//! Decoded views of the pinned maps for `nodeport-agent list …` and `status`, like
//! `cilium bpf lb list`: rows that serialize to JSON (`-o json`) and render as aligned text.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

use nodeport_common::{
    BACKEND_LOCAL, CT_LOCAL, CT_SNAT, Counter, FRONTEND_AFFINITY, FRONTEND_ETP_LOCAL, IPPROTO_TCP,
    IPPROTO_UDP, TCP_FIN_BACKEND, TCP_FIN_CLIENT, TCP_RST, TCP_SEEN_REPLY, map_names,
};
use serde::Serialize;

use crate::{
    Error,
    stats::Stats,
    tables::{ServiceTables, monotonic_ns},
};

pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        other => other.to_string(),
    }
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub protocol: String,
    pub local: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    pub node_port: u16,
    pub protocol: String,
    pub service_id: u32,
    pub external_traffic_policy_local: bool,
    pub client_ip_affinity_timeout_s: Option<u32>,
    pub backends: Vec<BackendRow>,
    /// externalTrafficPolicy=Local: what the node's own processes and pods are balanced over
    /// (every endpoint of the cluster). Empty otherwise.
    pub own_node_backends: Vec<BackendRow>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct FlowRow {
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// node address:port of a source-NATed flow (remote backend).
    pub snat: Option<String>,
    /// client address:port the backend sees for a DNAT-only flow whose client port was remapped
    /// because another live flow already reached the pod with the client's own tuple.
    pub port_remap: Option<String>,
    pub protocol: String,
    pub state: String,
    pub expires_in_s: i64,
}

fn sock(addr_be: u32, port_be: u16) -> String {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr_be)), u16::from_be(port_be)).to_string()
}

pub fn backends(t: &ServiceTables) -> Result<Vec<BackendRow>, Error> {
    Ok(t.backends()?
        .into_iter()
        .map(|(id, b)| BackendRow {
            id,
            address: b.addr.to_string(),
            protocol: proto_name(b.proto),
            local: b.flags & BACKEND_LOCAL != 0,
        })
        .collect())
}

pub fn services(t: &ServiceTables) -> Result<Vec<ServiceRow>, Error> {
    let all = backends(t)?;
    let rows = |ids: &[u32]| -> Vec<BackendRow> {
        ids.iter()
            .map(|id| {
                all.iter()
                    .find(|b| b.id == *id)
                    .cloned()
                    .unwrap_or(BackendRow {
                        id: *id,
                        address: "(missing)".into(),
                        protocol: String::new(),
                        local: false,
                    })
            })
            .collect()
    };
    let mut out = Vec::new();
    for s in t.services()? {
        let traffic = t.service_traffic(s.svc_id).unwrap_or_default();
        out.push(ServiceRow {
            node_port: s.node_port,
            protocol: proto_name(s.proto),
            service_id: s.svc_id,
            external_traffic_policy_local: s.flags & FRONTEND_ETP_LOCAL != 0,
            client_ip_affinity_timeout_s: (s.flags & FRONTEND_AFFINITY != 0)
                .then_some(s.affinity_timeout_s),
            backends: rows(&s.backends),
            own_node_backends: rows(&s.cluster_backends),
            packets: traffic.packets,
            bytes: traffic.bytes,
        });
    }
    Ok(out)
}

fn tcp_state(proto: u8, st: u8) -> String {
    if proto != IPPROTO_TCP {
        return "-".into();
    }
    if st & TCP_RST != 0 {
        "reset".into()
    } else if st & (TCP_FIN_CLIENT | TCP_FIN_BACKEND) == TCP_FIN_CLIENT | TCP_FIN_BACKEND {
        "closed".into()
    } else if st & (TCP_FIN_CLIENT | TCP_FIN_BACKEND) != 0 {
        "closing".into()
    } else if st & TCP_SEEN_REPLY != 0 {
        "established".into()
    } else {
        "syn-sent".into()
    }
}

pub fn conntrack(t: &ServiceTables) -> Result<Vec<FlowRow>, Error> {
    let now = monotonic_ns() as i128;
    let mut out: Vec<FlowRow> = t
        .conntrack()?
        .into_iter()
        .map(|(k, ct)| FlowRow {
            client: sock(k.saddr, k.sport),
            frontend: sock(k.daddr, k.dport),
            backend: sock(ct.backend_addr, ct.backend_port),
            snat: (ct.flags & CT_SNAT != 0).then(|| sock(ct.nat_addr, ct.nat_port)),
            port_remap: (ct.flags & CT_LOCAL != 0 && ct.nat_port != 0)
                .then(|| sock(ct.nat_addr, ct.nat_port)),
            protocol: proto_name(k.proto),
            state: if ct.flags & CT_LOCAL != 0 || ct.flags & CT_SNAT != 0 {
                tcp_state(k.proto, ct.tcp_state)
            } else {
                "?".into()
            },
            expires_in_s: ((ct.expires_ns as i128 - now) / 1_000_000_000) as i64,
        })
        .collect();
    out.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    Ok(out)
}

#[derive(Serialize, Debug)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Serialize, Debug)]
pub struct Status {
    pub node_addresses: Vec<String>,
    pub snat_ports: String,
    pub maps: Vec<MapFill>,
    pub counters: Vec<(String, u64, u64)>,
}

/// `dir` is the pin directory the tables were opened from: the capacities shown are the pinned
/// maps' own `max_entries` (`--conntrack-entries` and `--rev-nat-entries` change them).
pub fn status(t: &ServiceTables, stats: &Stats, dir: &std::path::Path) -> Result<Status, Error> {
    let cfg = t.config()?;
    let capacity = |name: &str| crate::loader::pinned_max_entries(dir, name);
    Ok(Status {
        node_addresses: t.node_addrs()?.iter().map(ToString::to_string).collect(),
        snat_ports: format!("{}-{}", cfg.snat_port_min, cfg.snat_port_max),
        maps: vec![
            MapFill {
                map: map_names::FRONTENDS,
                entries: t.services()?.len(),
                capacity: capacity(map_names::FRONTENDS)?,
            },
            MapFill {
                map: map_names::BACKENDS,
                entries: t.backends()?.len(),
                capacity: capacity(map_names::BACKENDS)?,
            },
            MapFill {
                map: map_names::CONNTRACK,
                entries: t.conntrack()?.len(),
                capacity: capacity(map_names::CONNTRACK)?,
            },
            MapFill {
                map: map_names::REV_NAT,
                entries: t.rev_nat()?.len(),
                capacity: capacity(map_names::REV_NAT)?,
            },
        ],
        counters: Counter::ALL
            .iter()
            .map(|c| {
                let v = stats.get(*c);
                (c.name().to_owned(), v.packets, v.bytes)
            })
            .collect(),
    })
}

/// Renders rows as an aligned text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let cols: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", cols.join("  ").trim_end());
    };
    line(
        &mut out,
        &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    for r in rows {
        line(&mut out, r);
    }
    out
}

pub fn render_services(rows: &[ServiceRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|s| {
            let mut flags = Vec::new();
            if s.external_traffic_policy_local {
                flags.push(format!(
                    "eTP=Local (own node: {} backends)",
                    s.own_node_backends.len()
                ));
            }
            if let Some(t) = s.client_ip_affinity_timeout_s {
                flags.push(format!("affinity={t}s"));
            }
            let backends: Vec<String> = s
                .backends
                .iter()
                .map(|b| format!("{}{}", b.address, if b.local { " (local)" } else { "" }))
                .collect();
            vec![
                format!("{}/{}", s.node_port, s.protocol),
                s.service_id.to_string(),
                if flags.is_empty() {
                    "-".into()
                } else {
                    flags.join(",")
                },
                s.packets.to_string(),
                if backends.is_empty() {
                    "(none)".into()
                } else {
                    backends.join(", ")
                },
            ]
        })
        .collect();
    table(&["NODEPORT", "ID", "FLAGS", "PACKETS", "BACKENDS"], &rows)
}

pub fn render_backends(rows: &[BackendRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                b.address.clone(),
                b.protocol.clone(),
                if b.local {
                    "local".into()
                } else {
                    "remote".into()
                },
            ]
        })
        .collect();
    table(&["ID", "BACKEND", "PROTO", "WHERE"], &rows)
}

pub fn render_conntrack(rows: &[FlowRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|f| {
            vec![
                f.protocol.clone(),
                f.client.clone(),
                f.frontend.clone(),
                f.backend.clone(),
                match (&f.snat, &f.port_remap) {
                    (Some(snat), _) => snat.clone(),
                    (None, Some(remap)) => format!("{remap} (port remap)"),
                    (None, None) => "-".into(),
                },
                f.state.clone(),
                f.expires_in_s.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "PROTO",
            "CLIENT",
            "FRONTEND",
            "BACKEND",
            "SNAT",
            "STATE",
            "EXPIRES(s)",
        ],
        &rows,
    )
}

pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node addresses: {}", s.node_addresses.join(", "));
    let _ = writeln!(out, "SNAT ports:     {}\n", s.snat_ports);
    let rows: Vec<Vec<String>> = s
        .maps
        .iter()
        .map(|m| {
            vec![
                m.map.to_string(),
                m.entries.to_string(),
                m.capacity.to_string(),
                format!("{:.2}%", 100.0 * m.entries as f64 / f64::from(m.capacity)),
            ]
        })
        .collect();
    out.push_str(&table(&["MAP", "ENTRIES", "CAPACITY", "FILL"], &rows));
    out.push('\n');
    let rows: Vec<Vec<String>> = s
        .counters
        .iter()
        .map(|(n, p, b)| vec![n.clone(), p.to_string(), b.to_string()])
        .collect();
    out.push_str(&table(&["COUNTER", "PACKETS", "BYTES"], &rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_states_decode() {
        let t = table(&["A", "LONGER"], &[vec!["xx".into(), "y".into()]]);
        assert_eq!(t, "A   LONGER\nxx  y\n");
        assert_eq!(tcp_state(IPPROTO_TCP, TCP_SEEN_REPLY), "established");
        assert_eq!(
            tcp_state(IPPROTO_TCP, TCP_FIN_CLIENT | TCP_FIN_BACKEND),
            "closed"
        );
        assert_eq!(tcp_state(IPPROTO_UDP, 0), "-");
        assert_eq!(
            sock(u32::from(Ipv4Addr::new(10, 0, 0, 1)).to_be(), 80u16.to_be()),
            "10.0.0.1:80"
        );
    }
}
