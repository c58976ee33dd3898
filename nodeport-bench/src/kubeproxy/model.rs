//! Services and EndpointSlices read the way kube-proxy (1.33) reads them before it writes rules:
//! its `ServicePortMap` (pkg/proxy/serviceport.go, `newBaseServiceInfo`) and `EndpointsMap`
//! (pkg/proxy/endpointslicecache.go), then `CategorizeEndpoints` (pkg/proxy/topology.go).
//!
//! Left out: topology hints (kube-proxy narrows cluster endpoints to the node's zone when every
//! endpoint carries hints; the benchmark's slices carry none), SCTP (an error), IPv6 (skipped, as
//! the IPv4 proxier skips it).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// kube-proxy's informers skip objects carrying these labels (cmd/kube-proxy/app/server.go).
const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default (v1.DefaultClientIPServiceAffinitySeconds).
const DEFAULT_AFFINITY_SECONDS: u32 = 10800;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The lower-case name kube-proxy uses in rules and hashes.
    pub fn lower(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    fn parse(p: Option<&str>) -> Option<Proto> {
        match p.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// One endpoint of one service port (kube-proxy's `BaseEndpointInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    /// `ip:port`, kube-proxy's `Endpoint.String()`: the sort key and part of the chain hash.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// One port of one Service (kube-proxy's `BaseServicePortInfo`) with its endpoints.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub proto: Proto,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// 0: none.
    pub node_port: u16,
    pub external_ips: Vec<Ipv4Addr>,
    pub lb_ips: Vec<Ipv4Addr>,
    pub source_ranges: Vec<Ipv4Net>,
    pub etp_local: bool,
    pub itp_local: bool,
    pub affinity_seconds: Option<u32>,
    /// 0: none.
    pub health_check_node_port: u16,
    /// Sorted by `ip:port` string, as kube-proxy sorts them (`byEndpoint`).
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// `ServicePortName.String()`: `ns/name:port`, or `ns/name` for an unnamed port.
    pub fn name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    pub fn externally_accessible(&self) -> bool {
        self.node_port != 0 || !self.lb_ips.is_empty() || !self.external_ips.is_empty()
    }

    pub fn external_policy_local(&self) -> bool {
        self.externally_accessible() && self.etp_local
    }

    pub fn internal_policy_local(&self) -> bool {
        self.itp_local
    }

    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local()
            || (self.externally_accessible() && !self.external_policy_local())
    }

    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local() || self.external_policy_local()
    }

    /// kube-proxy's `CategorizeEndpoints` without topology: cluster endpoints are the ready ones,
    /// or if none is ready anywhere the serving-and-terminating ones; local endpoints likewise
    /// among this node's, decided on their own.
    pub fn categorize(&self) -> Categorized<'_> {
        let eps = &self.endpoints;
        let mut out = Categorized::default();
        if self.uses_cluster_endpoints() {
            out.cluster = eps.iter().filter(|e| e.ready).collect();
            if out.cluster.is_empty() {
                out.cluster = eps.iter().filter(|e| e.serving && e.terminating).collect();
            }
            out.has_any = !out.cluster.is_empty();
        }
        if !self.uses_local_endpoints() {
            out.reachable = out.cluster.clone();
            return out;
        }
        let usable = |e: &&Endpoint| e.ready || (e.serving && e.terminating);
        out.has_any |= eps.iter().any(|e| usable(&e));
        let local_ready = eps.iter().any(|e| e.local && e.ready);
        out.local = eps
            .iter()
            .filter(|e| {
                e.local
                    && if local_ready {
                        e.ready
                    } else {
                        e.serving && e.terminating
                    }
            })
            .collect();
        if !self.uses_cluster_endpoints() {
            out.reachable = out.local.clone();
            return out;
        }
        // The union; kube-proxy builds it from a Go map (random order), we keep the sorted order.
        out.reachable = eps
            .iter()
            .filter(|e| out.cluster.contains(e) || out.local.contains(e))
            .collect();
        out
    }
}

#[derive(Debug, Default)]
pub struct Categorized<'a> {
    pub cluster: Vec<&'a Endpoint>,
    pub local: Vec<&'a Endpoint>,
    /// Every endpoint some rule of this node can reach: one endpoint chain each.
    pub reachable: Vec<&'a Endpoint>,
    /// Whether the service has a usable endpoint anywhere in the cluster.
    pub has_any: bool,
}

/// The service ports kube-proxy's IPv4 proxier programs, sorted by namespace, name, port name
/// and protocol (kube-proxy walks a Go map; any order gives the same packet behaviour except
/// across services, where only the nodePorts jump being last matters, and it is).
pub fn service_ports(
    node_name: &str,
    services: &[Service],
    slices: &[EndpointSlice],
) -> anyhow::Result<Vec<ServicePort>> {
    let endpoints = endpoints_by_port(node_name, slices);
    let mut out = Vec::new();
    for svc in services {
        let namespace = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let what = || format!("Service {namespace}/{name}");
        let labels = svc.metadata.labels.as_ref();
        if labels.is_some_and(|l| {
            l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS)
        }) {
            continue;
        }
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        // `ShouldSkipService`: headless, no cluster IP, ExternalName.
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let Some(cluster_ip) = ipv4_cluster_ip(svc).with_context(what)? else {
            continue;
        };
        let v4 = |ips: &[String]| -> Vec<Ipv4Addr> {
            ips.iter().filter_map(|s| s.trim().parse().ok()).collect()
        };
        let external_ips = v4(spec.external_ips.as_deref().unwrap_or_default());
        // Ingress IPs with ipMode Proxy are not captured (KEP-1860, `IsVIPMode`).
        let lb_ips: Vec<Ipv4Addr> = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .map(|ing| {
                ing.iter()
                    .filter(|i| i.ip_mode.as_deref().is_none_or(|m| m == "VIP"))
                    .filter_map(|i| i.ip.as_deref()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // kube-proxy trims and drops unparsable ranges (backward compatibility).
        let source_ranges: Vec<Ipv4Net> = spec
            .load_balancer_source_ranges
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let affinity_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_SECONDS)
        });
        // `apiservice.NeedsHealthCheck`: LoadBalancer with externalTrafficPolicy Local.
        let health_check_node_port = if spec.type_.as_deref() == Some("LoadBalancer") && etp_local {
            port_number(spec.health_check_node_port.unwrap_or(0))
                .with_context(|| format!("{}: healthCheckNodePort", what()))?
        } else {
            0
        };
        for p in spec.ports.as_deref().unwrap_or_default() {
            let port_name = p.name.clone().unwrap_or_default();
            let Some(proto) = Proto::parse(p.protocol.as_deref()) else {
                bail!(
                    "{}: port {port_name:?} has protocol {}: only TCP and UDP are rendered",
                    what(),
                    p.protocol.as_deref().unwrap_or_default()
                );
            };
            let port = port_number(p.port).with_context(|| format!("{}: port", what()))?;
            let node_port = port_number(p.node_port.unwrap_or(0))
                .with_context(|| format!("{}: nodePort", what()))?;
            let endpoints = endpoints
                .get(&(namespace.clone(), name.clone(), port_name.clone(), proto))
                .cloned()
                .unwrap_or_default();
            out.push(ServicePort {
                namespace: namespace.clone(),
                name: name.clone(),
                port_name,
                proto,
                cluster_ip,
                port,
                node_port,
                external_ips: external_ips.clone(),
                lb_ips: lb_ips.clone(),
                source_ranges: source_ranges.clone(),
                etp_local,
                itp_local,
                affinity_seconds,
                health_check_node_port,
                endpoints,
            });
        }
    }
    out.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.port_name, a.proto).cmp(&(
            &b.namespace,
            &b.name,
            &b.port_name,
            b.proto,
        ))
    });
    Ok(out)
}

fn port_number(p: i32) -> anyhow::Result<u16> {
    u16::try_from(p).map_err(|_| anyhow::anyhow!("{p} is not a port number"))
}

/// The Service's IPv4 cluster IP (`GetClusterIPByFamily`); None for a headless or IPv6-only one.
fn ipv4_cluster_ip(svc: &Service) -> anyhow::Result<Option<Ipv4Addr>> {
    let spec = svc.spec.as_ref();
    let single = spec
        .and_then(|s| s.cluster_ip.as_deref())
        .unwrap_or_default();
    if single.is_empty() || single == "None" {
        return Ok(None);
    }
    let mut all: Vec<&str> = vec![single];
    all.extend(
        spec.and_then(|s| s.cluster_ips.as_deref())
            .unwrap_or_default()
            .iter()
            .map(String::as_str),
    );
    for ip in all {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => return Ok(Some(v4)),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => bail!("clusterIP {ip:?} is not an IP address"),
        }
    }
    Ok(None)
}

type PortKey = (String, String, String, Proto);

/// Endpoints by (namespace, service, port name, protocol), as kube-proxy's `EndpointSliceCache`
/// merges them: IPv4 slices only, the first address of each endpoint, nil ready/serving read as
/// true and nil terminating as false, a port without a number ignored, one entry per `ip:port`
/// (a later copy replaces an earlier one unless it is terminating), sorted by `ip:port` string.
fn endpoints_by_port(
    node_name: &str,
    slices: &[EndpointSlice],
) -> BTreeMap<PortKey, Vec<Endpoint>> {
    let mut merged: BTreeMap<PortKey, BTreeMap<String, Endpoint>> = BTreeMap::new();
    let mut sorted: Vec<&EndpointSlice> = slices.iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for slice in sorted {
        let labels = slice.metadata.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k));
        if slice.address_type != "IPv4"
            || label(LABEL_SERVICE_PROXY_NAME).is_some()
            || label(LABEL_HEADLESS).is_some()
        {
            continue;
        }
        let Some(service) = label(LABEL_SERVICE_NAME) else {
            continue;
        };
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        for port in slice.ports.as_deref().unwrap_or_default() {
            let Some(number) = port
                .port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
            else {
                continue;
            };
            let Some(proto) = Proto::parse(port.protocol.as_deref()) else {
                continue;
            };
            let key = (
                namespace.clone(),
                service.clone(),
                port.name.clone().unwrap_or_default(),
                proto,
            );
            let set = merged.entry(key).or_default();
            for e in &slice.endpoints {
                let Some(Ok(ip)) = e.addresses.first().map(|a| a.parse::<Ipv4Addr>()) else {
                    continue;
                };
                let c = e.conditions.as_ref();
                let ep = Endpoint {
                    ip,
                    port: number,
                    local: !node_name.is_empty() && e.node_name.as_deref() == Some(node_name),
                    ready: c.and_then(|c| c.ready).unwrap_or(true),
                    serving: c.and_then(|c| c.serving).unwrap_or(true),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                };
                let addr = ep.addr();
                if !ep.terminating || !set.contains_key(&addr) {
                    set.insert(addr, ep);
                }
            }
        }
    }
    // BTreeMap<String, _> iterates in `ip:port` string order: kube-proxy's `byEndpoint` sort.
    merged
        .into_iter()
        .map(|(k, set)| (k, set.into_values().collect()))
        .collect()
}
