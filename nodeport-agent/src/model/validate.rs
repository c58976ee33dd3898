//! Reading Services and EndpointSlices the way kube-proxy sees them: which objects and ports
//! count, with the apiserver's defaults applied (sources may hand us objects that never went
//! through an apiserver, such as manifests), and a [`Problem`] for each thing the apiserver or
//! kube-proxy would reject or ignore. A bad object, port or endpoint is skipped alone.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use nodeport_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::{
    cluster::{ClusterState, ObjKey},
    desired::{
        DEFAULT_AFFINITY_TIMEOUT_S, FrontendId, LABEL_HEADLESS, LABEL_SERVICE_NAME,
        LABEL_SERVICE_PROXY_NAME, MAX_AFFINITY_TIMEOUT_S, Problem, SemanticsConfig,
    },
};

/// A slice port with the apiserver's defaults applied (name "", protocol TCP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: String,
    pub port: u16,
}

/// A usable endpoint of a slice: its first address, with the conditions read as kube-proxy
/// reads them (`newEndpointSliceInfo`, pkg/proxy/endpointslicecache.go).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: Ipv4Addr,
    /// `nodeName` is this node (kube-proxy's `isLocal`: an endpoint without nodeName is remote).
    pub local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// The usable content of one IPv4 EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceData {
    pub slice: ObjKey,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// The IPv4 EndpointSlices by the service they belong to (same namespace, `kubernetes.io/service-name`
/// label), in slice name order. Mirrors kube-proxy:
///
/// - slices labelled `service.kubernetes.io/service-proxy-name` or `service.kubernetes.io/headless`
///   are skipped silently (kube-proxy's informers exclude them with a label selector,
///   cmd/kube-proxy/app/server.go);
/// - only `addressType: IPv4` slices are read; IPv6 slices belong to the (later) IPv6 maps and
///   FQDN slices are ignored by kube-proxy (metaproxier dispatches by address type); a missing or
///   unknown address type is a Problem (the apiserver rejects it);
/// - a slice without the service-name label is a Problem and ignored (`endpointSliceCacheKeys`);
/// - ports: a missing or 0 port number is a Problem and that port ignored (kube-proxy logs
///   "Ignoring invalid endpoint port"); a nil name or protocol gets the apiserver's default ("",
///   TCP: `SetDefaults_EndpointPort`), which kube-proxy always sees applied;
/// - endpoints: only the first address is used (the API says consumers may use only the first);
///   no address, or one that is not an IPv4 address, is a Problem and that endpoint ignored
///   (kube-proxy ignores empty ones and other-family ones);
/// - conditions: nil ready = true, nil serving = **true**, nil terminating = false. That is what
///   the API documents and what kube-proxy does (`newEndpointSliceInfo`); note nil serving does
///   not take ready's value.
pub fn slices_by_service(
    state: &ClusterState,
    cfg: &SemanticsConfig,
    problems: &mut Vec<Problem>,
) -> BTreeMap<ObjKey, Vec<SliceData>> {
    let mut out: BTreeMap<ObjKey, Vec<SliceData>> = BTreeMap::new();
    for (key, slice) in &state.slices {
        if let Some((service, data)) = slice_data(key, slice, cfg, problems) {
            out.entry(service).or_default().push(data);
        }
    }
    out
}

fn slice_data(
    key: &ObjKey,
    slice: &EndpointSlice,
    cfg: &SemanticsConfig,
    problems: &mut Vec<Problem>,
) -> Option<(ObjKey, SliceData)> {
    let labels = slice.metadata.labels.as_ref();
    let label = |name: &str| labels.and_then(|l| l.get(name));
    if label(LABEL_SERVICE_PROXY_NAME).is_some() || label(LABEL_HEADLESS).is_some() {
        return None;
    }
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" | "FQDN" => return None,
        // k8s-openapi decodes a missing required field as its default, so a manifest without
        // addressType arrives here as "" (the apiserver would have rejected it).
        "" => {
            problems.push(Problem::slice(key, "no addressType; ignored"));
            return None;
        }
        other => {
            problems.push(Problem::slice(
                key,
                format!("addressType {other:?} is not IPv4, IPv6 or FQDN; ignored"),
            ));
            return None;
        }
    }
    let service = match label(LABEL_SERVICE_NAME) {
        Some(name) if !name.is_empty() => ObjKey::new(key.namespace.clone(), name.clone()),
        _ => {
            problems.push(Problem::slice(
                key,
                format!("no {LABEL_SERVICE_NAME} label: not attached to any service; ignored"),
            ));
            return None;
        }
    };

    let mut ports = Vec::new();
    for p in slice.ports.as_deref().unwrap_or_default() {
        let name = p.name.clone().unwrap_or_default();
        let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
        match p.port.map(u16::try_from) {
            Some(Ok(port)) if port != 0 => ports.push(SlicePort {
                name,
                protocol,
                port,
            }),
            Some(_) => problems.push(Problem::slice(
                key,
                format!(
                    "port {name:?}/{protocol}: port number {} is not in 1-65535; ignored",
                    p.port.unwrap_or_default()
                ),
            )),
            None => problems.push(Problem::slice(
                key,
                format!("port {name:?}/{protocol}: no port number; ignored"),
            )),
        }
    }

    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().enumerate() {
        let Some(first) = e.addresses.first() else {
            problems.push(Problem::slice(
                key,
                format!("endpoint {i} has no address; ignored"),
            ));
            continue;
        };
        let ip = match first.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ip,
            Ok(IpAddr::V6(_)) => {
                problems.push(Problem::slice(
                    key,
                    format!("endpoint address {first:?} is IPv6 in an IPv4 slice; ignored"),
                ));
                continue;
            }
            Err(_) => {
                problems.push(Problem::slice(
                    key,
                    format!("endpoint address {first:?} is not an IP address; ignored"),
                ));
                continue;
            }
        };
        let c = e.conditions.as_ref();
        endpoints.push(SliceEndpoint {
            ip,
            local: e.node_name.as_deref() == Some(cfg.node_name.as_str())
                && !cfg.node_name.is_empty(),
            ready: c.and_then(|c| c.ready).unwrap_or(true),
            serving: c.and_then(|c| c.serving).unwrap_or(true),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        });
    }

    Some((
        service,
        SliceData {
            slice: key.clone(),
            ports,
            endpoints,
        },
    ))
}

/// One service port that claims a frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub frontend: FrontendId,
    /// Position in `spec.ports`.
    pub index: usize,
    /// The ServicePort's name ("" if unnamed).
    pub name: String,
    /// For messages: `port "http" (80/TCP)`.
    pub describe: String,
}

/// What a served service contributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub etp_local: bool,
    pub affinity_timeout_s: Option<u32>,
    pub health_check_node_port: Option<u16>,
    pub ports: Vec<PortInfo>,
}

/// Whether and how a Service is served on nodePorts; None for a service skipped whole.
///
/// - Skipped silently, like kube-proxy: services labelled `service.kubernetes.io/service-proxy-name`
///   (or `service.kubernetes.io/headless`; kube-proxy's informer label selector), headless ones
///   (`clusterIP: None`, `ShouldSkipService`), and IPv6-only ones (no IPv4 cluster IP,
///   `GetClusterIPByFamily`; served by the later IPv6 maps).
///   Differs from kube-proxy: a service with no `clusterIP` at all is served; kube-proxy skips it,
///   but an apiserver always allocates one, so only manifests lack it.
/// - Only types NodePort and LoadBalancer (the default type is ClusterIP). kube-proxy serves any
///   port with a non-zero nodePort whatever the type, but the apiserver only keeps nodePorts on
///   those two types; a nodePort on another type is a Problem (the apiserver rejects it).
/// - `externalTrafficPolicy: Local` exactly (`apiservice.ExternalPolicyLocal`).
/// - `sessionAffinity: ClientIP` with `sessionAffinityConfig.clientIP.timeoutSeconds`, default
///   10800 s; a timeout outside 1..=86400 is rejected by the apiserver, so here it is a Problem
///   and the service is skipped.
/// - Each port: a port number outside 1-65535 (or missing) is a Problem; protocol default TCP; TCP and UDP are served, SCTP (and anything else) is a
///   Problem naming the port, the other ports still served. No nodePort: skipped silently on a
///   LoadBalancer with `allocateLoadBalancerNodePorts: false`, otherwise a Problem (the apiserver
///   would have allocated one). A nodePort outside `cfg.nodeport_range` is a Problem and not
///   served: the apiserver rejects it, and serving it could steal a host port such as 22 (XDP
///   sees packets before the host stack does).
/// - Health check node port: LoadBalancer with eTP=Local only (`apiservice.NeedsHealthCheck`);
///   missing is a Problem (kube-proxy logs "Service has no healthcheck nodeport").
pub fn service_info(
    key: &ObjKey,
    svc: &Service,
    cfg: &SemanticsConfig,
    problems: &mut Vec<Problem>,
) -> Option<ServiceInfo> {
    let labels = svc.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
    {
        return None;
    }
    let spec = svc.spec.as_ref()?;
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or_default();
    if cluster_ip == "None" || !has_ipv4_cluster_ip(svc) {
        return None;
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let load_balancer = type_ == "LoadBalancer";
    if type_ != "NodePort" && !load_balancer {
        if ports.iter().any(|p| p.node_port.is_some_and(|n| n != 0)) {
            problems.push(Problem::service(
                key,
                format!("type {type_} cannot have nodePorts (only NodePort and LoadBalancer); not served"),
            ));
        }
        return None;
    }

    let affinity_timeout_s = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match timeout {
            None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
            Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S as i32).contains(&t) => Some(t as u32),
            Some(t) => {
                problems.push(Problem::service(
                    key,
                    format!(
                        "sessionAffinityConfig.clientIP.timeoutSeconds {t} is not in 1-{MAX_AFFINITY_TIMEOUT_S}; service not served"
                    ),
                ));
                return None;
            }
        }
    } else {
        None
    };
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");

    let health_check_node_port = if load_balancer && etp_local {
        match spec.health_check_node_port.map(u16::try_from) {
            Some(Ok(p)) if p != 0 => Some(p),
            _ => {
                problems.push(Problem::service(
                    key,
                    "LoadBalancer with externalTrafficPolicy Local has no valid healthCheckNodePort; no health check served",
                ));
                None
            }
        }
    } else {
        None
    };

    let mut out = Vec::new();
    for (index, p) in ports.iter().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        let describe = if name.is_empty() {
            format!("port {}/{protocol}", p.port)
        } else {
            format!("port {name:?} ({}/{protocol})", p.port)
        };
        // A missing port decodes as 0 (k8s-openapi defaults missing required fields); the
        // apiserver rejects anything outside 1-65535.
        if !(1..=65535).contains(&p.port) {
            problems.push(Problem::service(
                key,
                format!(
                    "{describe}: port {} is not in 1-65535 (missing?); not served",
                    p.port
                ),
            ));
            continue;
        }
        let node_port = p.node_port.unwrap_or(0);
        if node_port == 0 {
            if !(load_balancer && spec.allocate_load_balancer_node_ports == Some(false)) {
                problems.push(Problem::service(
                    key,
                    format!("{describe}: no nodePort; not served"),
                ));
            }
            continue;
        }
        let proto = match protocol {
            "TCP" => IPPROTO_TCP,
            "UDP" => IPPROTO_UDP,
            other => {
                problems.push(Problem::service(
                    key,
                    format!(
                        "{describe}: protocol {other} is not supported by the dataplane (TCP and UDP only); nodePort {node_port} not served"
                    ),
                ));
                continue;
            }
        };
        let node_port = match u16::try_from(node_port) {
            Ok(n) if cfg.nodeport_range.contains(&n) => n,
            _ => {
                problems.push(Problem::service(
                    key,
                    format!(
                        "{describe}: nodePort {node_port} is outside the nodePort range {}-{}; not served",
                        cfg.nodeport_range.start(),
                        cfg.nodeport_range.end()
                    ),
                ));
                continue;
            }
        };
        out.push(PortInfo {
            frontend: FrontendId { node_port, proto },
            index,
            name,
            describe,
        });
    }

    Some(ServiceInfo {
        etp_local,
        affinity_timeout_s,
        health_check_node_port,
        ports: out,
    })
}

/// kube-proxy's `GetClusterIPByFamily(IPv4)` is non-empty, except that a service with no cluster
/// IP at all counts as IPv4 (see [`service_info`]).
fn has_ipv4_cluster_ip(svc: &Service) -> bool {
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or_default();
    let cluster_ips = spec.cluster_ips.as_deref().unwrap_or_default();
    let families = spec.ip_families.as_deref().unwrap_or_default();
    if cluster_ip.is_empty() && cluster_ips.is_empty() {
        // Never allocated (manifests): IPv4 unless it says otherwise.
        return families.is_empty() || families.iter().any(|f| f == "IPv4");
    }
    if families.is_empty() {
        return !cluster_ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6());
    }
    families
        .iter()
        .position(|f| f == "IPv4")
        .is_some_and(|i| i < cluster_ips.len() || (i == 0 && !cluster_ip.is_empty()))
}

/// The API's protocol name for an IP protocol number.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

/// `30080/TCP`.
pub fn frontend_str(f: FrontendId) -> String {
    format!("{}/{}", f.node_port, proto_name(f.proto))
}
