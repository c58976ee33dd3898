//! What this node's NodePort maps must hold, computed from a [`ClusterState`] as pure functions
//! with kube-proxy's semantics. kube-proxy (kubernetes/kubernetes `pkg/proxy`) is the reference
//! throughout; each rule names the kube-proxy code it mirrors, and every place where we differ is
//! marked "Differs from kube-proxy".
//!
//! The pipeline, for the IPv4 family only (IPv6 is a later issue):
//!
//! 1. Node addresses: this node's `InternalIP`/`ExternalIP`, filtered by `--nodeport-addresses`
//!    ([`node_addresses`]).
//! 2. EndpointSlices are validated and grouped by service ([`validate::slices_by_service`]).
//! 3. Every Service of type NodePort or LoadBalancer claims a frontend `(nodePort, protocol)` per
//!    port; conflicting claims are settled deterministically ([`desired`]).
//! 4. Each frontend's endpoints are merged across the service's slices by service port name and
//!    protocol, deduplicated ([`endpoint_groups`]) and categorised like kube-proxy's
//!    `CategorizeEndpoints` ([`categorize_endpoints`]).
//!
//! Nothing here stops at a bad object: each is reported as a [`Problem`] naming it, and everything
//! else is still computed.
use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    ops::RangeInclusive,
};

use ipnet::Ipv4Net;
use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::Time};
use nodeport_common::{BACKEND_LOCAL, FRONTEND_AFFINITY, FRONTEND_ETP_LOCAL};

use super::{
    cluster::{ClusterState, ObjKey},
    validate::{self, SliceData},
};
use crate::tables::BackendEntry;

/// `--service-node-port-range`'s default.
pub const DEFAULT_NODEPORT_RANGE: RangeInclusive<u16> = 30000..=32767;
/// `sessionAffinityConfig.clientIP.timeoutSeconds`' default (the apiserver's defaulting, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10800;
/// The apiserver's upper bound for `timeoutSeconds` (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86400;

/// The label carrying a slice's service name (`discovery.LabelServiceName`).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services and slices with this label belong to another proxy (`apis.LabelServiceProxyName`).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on a headless service's slices (`v1.IsHeadlessService`).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// How this node's agent reads the cluster (the kube-proxy flags with the same meaning).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SemanticsConfig {
    pub node_name: String,
    /// kube-proxy `--nodeport-addresses`: CIDRs choosing which node addresses serve nodePorts;
    /// empty = all the node's addresses.
    pub nodeport_cidrs: Vec<Ipv4Net>,
    /// `--service-node-port-range`, default 30000..=32767.
    pub nodeport_range: RangeInclusive<u16>,
}

impl SemanticsConfig {
    /// Defaults for everything but the node name.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            nodeport_cidrs: Vec::new(),
            nodeport_range: DEFAULT_NODEPORT_RANGE,
        }
    }
}

/// A frontend: what a packet to any node address is matched on (host byte order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendId {
    pub node_port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: SocketAddrV4,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
}

impl DesiredBackend {
    /// `BACKEND_*` flags.
    pub fn flags(&self) -> u8 {
        if self.local { BACKEND_LOCAL } else { 0 }
    }

    pub fn entry(&self, proto: u8) -> BackendEntry {
        BackendEntry {
            addr: self.addr,
            proto,
            flags: self.flags(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub service: ObjKey,
    /// The ServicePort's name ("" if unnamed).
    pub port_name: String,
    /// `externalTrafficPolicy: Local`: only this node's endpoints, and none means drop.
    pub etp_local: bool,
    /// Some when `sessionAffinity: ClientIP` (default timeout 10800 s).
    pub affinity_timeout_s: Option<u32>,
    /// What this node balances over for this frontend, sorted by address. May be empty: the
    /// frontend still exists (kube-proxy drops eTP=Local traffic without local endpoints and
    /// rejects traffic to services without endpoints; it does not let it through to the host).
    pub backends: Vec<DesiredBackend>,
    /// externalTrafficPolicy=Local only: the cluster set, sorted by address, which the node's own
    /// processes and pods are balanced over (the socket programs): kube-proxy sends traffic from
    /// pods on this node and from the node itself to the cluster policy chain ("short-circuit").
    /// Empty for Cluster, whose `backends` are that set already.
    pub cluster_backends: Vec<DesiredBackend>,
    /// Endpoints still listed for this port but not balanced over (terminating, not ready, or
    /// not chosen by the traffic policy), sorted by address. They get no slot, but their backend
    /// entries stay, so connections already tracked to them keep flowing until the endpoint
    /// leaves the slices, as kube-proxy's conntrack entries outlive its rules.
    pub draining: Vec<DesiredBackend>,
}

impl DesiredService {
    /// `FRONTEND_*` flags.
    pub fn flags(&self) -> u16 {
        let mut flags = 0;
        if self.etp_local {
            flags |= FRONTEND_ETP_LOCAL;
        }
        if self.affinity_timeout_s.is_some() {
            flags |= FRONTEND_AFFINITY;
        }
        flags
    }
}

/// A `healthCheckNodePort` to serve and what it reports (kube-proxy's service health server
/// answers 200 when `local_endpoints > 0`, 503 otherwise).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    pub service: ObjKey,
    pub local_endpoints: usize,
}

/// Something wrong with one object, which was skipped in part or whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Kind and key, e.g. "Service default/web" or "EndpointSlice default/web-abc12".
    pub object: String,
    pub message: String,
}

impl Problem {
    pub fn new(kind: &str, key: &ObjKey, message: impl Into<String>) -> Self {
        Self {
            object: format!("{kind} {key}"),
            message: message.into(),
        }
    }

    pub fn service(key: &ObjKey, message: impl Into<String>) -> Self {
        Self::new("Service", key, message)
    }

    pub fn slice(key: &ObjKey, message: impl Into<String>) -> Self {
        Self::new("EndpointSlice", key, message)
    }

    pub fn node(key: &ObjKey, message: impl Into<String>) -> Self {
        Self::new("Node", key, message)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub node_addrs: BTreeSet<Ipv4Addr>,
    pub services: BTreeMap<FrontendId, DesiredService>,
    /// Sorted by service.
    pub health_checks: Vec<HealthCheck>,
    pub problems: Vec<Problem>,
}

/// One endpoint of one service port, after merging the slices (kube-proxy's `BaseEndpointInfo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addr: SocketAddrV4,
    pub local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go), without topology hints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// What `externalTrafficPolicy: Cluster` balances over.
    pub cluster: Vec<EndpointInfo>,
    /// What `externalTrafficPolicy: Local` balances over.
    pub local: Vec<EndpointInfo>,
}

/// kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go):
///
/// - cluster endpoints are the ready ones; only if there is no ready endpoint anywhere, the
///   serving-and-terminating ones (graceful termination, KEP-1669);
/// - local endpoints likewise among the endpoints on this node, decided on their own: local
///   ready ones if any, else local serving-and-terminating ones, whatever remote endpoints exist.
///
/// An endpoint that is ready counts as ready even if also terminating (possible with
/// `publishNotReadyAddresses`), as in kube-proxy. Topology hints (`trafficDistribution`,
/// `service.kubernetes.io/topology-mode`) are not applied yet; kube-proxy would narrow the
/// cluster endpoints to this node's zone when every endpoint carries hints.
pub fn categorize_endpoints(endpoints: &[EndpointInfo]) -> Categorized {
    let pick = |locality: fn(&EndpointInfo) -> bool| -> Vec<EndpointInfo> {
        let candidates = endpoints.iter().filter(|e| locality(e));
        let ready: Vec<_> = candidates.clone().filter(|e| e.ready).copied().collect();
        if !ready.is_empty() {
            return ready;
        }
        candidates
            .filter(|e| e.serving && e.terminating)
            .copied()
            .collect()
    };
    Categorized {
        cluster: pick(|_| true),
        local: pick(|e| e.local),
    }
}

/// The endpoints of one service, by `(service port name, protocol)`: kube-proxy's
/// `EndpointSliceCache.endpointInfoByServicePort` (pkg/proxy/endpointslicecache.go).
///
/// - A slice's ports carry the resolved target port numbers: the endpoints of a slice get, for
///   the service port named N with protocol P, the number of the slice's port named N with
///   protocol P. Two slices may resolve the same name to different numbers (pods of different
///   revisions); each slice's endpoints get their own slice's number. The Service's
///   `targetPort` is never read (the EndpointSlice controller resolved it).
/// - Endpoints are keyed by `ip:port` (kube-proxy's `endpointInfo.String()`). A later duplicate
///   (same `ip:port`, same or another slice) replaces an earlier one unless it is terminating:
///   kubernetes/kubernetes#135593 (merged December 2025), which prefers the running pod when an
///   IP is reused while the old pod still terminates. Earlier kube-proxy releases kept the first
///   copy unless a later one was local. kube-proxy walks slices in Go map order; we walk them in
///   name order, so the result is deterministic.
pub fn endpoint_groups(slices: &[SliceData]) -> BTreeMap<(String, String), Vec<EndpointInfo>> {
    let mut groups: BTreeMap<(String, String), BTreeMap<SocketAddrV4, EndpointInfo>> =
        BTreeMap::new();
    for slice in slices {
        for port in &slice.ports {
            let set = groups
                .entry((port.name.clone(), port.protocol.clone()))
                .or_default();
            for e in &slice.endpoints {
                let info = EndpointInfo {
                    addr: SocketAddrV4::new(e.ip, port.port),
                    local: e.local,
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                };
                match set.entry(info.addr) {
                    Entry::Vacant(v) => {
                        v.insert(info);
                    }
                    Entry::Occupied(mut o) if !info.terminating => {
                        o.insert(info);
                    }
                    Entry::Occupied(_) => {}
                }
            }
        }
    }
    groups
        .into_iter()
        .map(|(k, set)| (k, set.into_values().collect()))
        .collect()
}

/// This node's nodePort addresses: the `InternalIP` and `ExternalIP` addresses (IPv4) of the
/// Node named `cfg.node_name`, kept if `cfg.nodeport_cidrs` is empty or one of them contains
/// the address (kube-proxy's `NodePortAddresses`, pkg/proxy/util/nodeport_addresses.go: an
/// empty list, or 0.0.0.0/0, matches all).
///
/// Differs from kube-proxy: kube-proxy matches the CIDRs against the addresses of the host's
/// interfaces (and with no CIDRs accepts any local address, `--dst-type LOCAL`); we use the
/// addresses the Node object publishes, since the dataplane matches destination addresses
/// exactly. Loopback nodePorts (`route_localnet`) are not served.
pub fn node_addresses(
    state: &ClusterState,
    cfg: &SemanticsConfig,
    problems: &mut Vec<Problem>,
) -> BTreeSet<Ipv4Addr> {
    let key = ObjKey::new("", cfg.node_name.clone());
    let Some(node) = state.nodes.get(&key) else {
        problems.push(Problem::node(
            &key,
            "not found: this node has no nodePort addresses",
        ));
        return BTreeSet::new();
    };
    let mut out = BTreeSet::new();
    let mut ipv4 = false;
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref());
    for a in addresses.unwrap_or_default() {
        if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => {
                ipv4 = true;
                if cfg.nodeport_cidrs.is_empty()
                    || cfg.nodeport_cidrs.iter().any(|c| c.contains(&ip))
                {
                    out.insert(ip);
                }
            }
            // IPv6 node addresses belong to the (later) IPv6 maps.
            Ok(IpAddr::V6(_)) => {}
            Err(_) => problems.push(Problem::node(
                &key,
                format!("{} {:?} is not an IP address; ignored", a.type_, a.address),
            )),
        }
    }
    // Not an error in a dual-stack cluster, but an IPv6-only (or address-less) Node leaves this
    // IPv4 dataplane nothing to match: say so rather than silently serving nothing.
    if !ipv4 {
        problems.push(Problem::node(
            &key,
            "has no IPv4 InternalIP or ExternalIP address (IPv6 ones are not served): no nodePort is served on this node",
        ));
    }
    out
}

/// One service port's claim on a frontend.
struct Claim {
    service: ObjKey,
    created: Option<Time>,
    index: usize,
    port: String,
    port_name: String,
    etp_local: bool,
    affinity_timeout_s: Option<u32>,
}

/// Computes this node's maps from the cluster state. See the module documentation; the rules:
///
/// - Services: [`validate::service_info`] (which services and ports are served).
/// - Frontend conflicts: two ports claiming the same `(nodePort, protocol)`. The apiserver's
///   nodePort allocator never lets this happen (the later service is rejected), and kube-proxy
///   installs both rules, the first one in its (map-ordered) chain winning. We keep the claim the
///   apiserver would have kept: the service with the older `creationTimestamp` (objects without
///   one, which never went through an apiserver, come after those with one), then by
///   namespace/name, then by port order within a service. Every other claim is a Problem on its
///   service and is not served; the service's other ports still are.
/// - Backends: [`endpoint_groups`] then [`categorize_endpoints`]; `externalTrafficPolicy: Local`
///   takes the local set, `Cluster` the cluster set. `internalTrafficPolicy` does not apply to
///   NodePort traffic (kube-proxy applies it to clusterIP traffic only), so it is not read.
///   kube-proxy sends eTP=Local traffic from pods on this node or from the node itself to the
///   cluster endpoints ("short-circuit"): that set is `cluster_backends`, which the socket
///   programs use for the node's own processes and pods; traffic arriving from outside gets the
///   local set.
/// - Health checks: for each served LoadBalancer service with `externalTrafficPolicy: Local`
///   and a `healthCheckNodePort` (kube-proxy's `NeedsHealthCheck`: LoadBalancer only, which is
///   also the only type the apiserver allocates one for), the number of distinct IPs of local
///   **ready** endpoints over all the service's ports (`EndpointsMap.LocalReadyEndpoints`,
///   pkg/proxy/endpoints.go). Serving-terminating endpoints are not counted, even when the
///   local set falls back to them: kube-proxy deliberately fails the health check then, so load
///   balancers drain the node.
pub fn desired(state: &ClusterState, cfg: &SemanticsConfig) -> Desired {
    let mut problems = Vec::new();
    let node_addrs = node_addresses(state, cfg, &mut problems);
    let slices = validate::slices_by_service(state, cfg, &mut problems);

    let mut claims: BTreeMap<FrontendId, Vec<Claim>> = BTreeMap::new();
    let mut health_checks = Vec::new();
    let mut groups: BTreeMap<&ObjKey, BTreeMap<(String, String), Vec<EndpointInfo>>> =
        BTreeMap::new();
    for (key, svc) in &state.services {
        let Some(info) = validate::service_info(key, svc, cfg, &mut problems) else {
            continue;
        };
        let service_groups = groups
            .entry(key)
            .or_insert_with(|| endpoint_groups(slices.get(key).map_or(&[], Vec::as_slice)));
        if let Some(node_port) = info.health_check_node_port {
            let local_ips: BTreeSet<Ipv4Addr> = service_groups
                .values()
                .flatten()
                .filter(|e| e.local && e.ready)
                .map(|e| *e.addr.ip())
                .collect();
            health_checks.push(HealthCheck {
                node_port,
                service: key.clone(),
                local_endpoints: local_ips.len(),
            });
        }
        for port in info.ports {
            claims.entry(port.frontend).or_default().push(Claim {
                service: key.clone(),
                created: created(svc),
                index: port.index,
                port: port.describe,
                port_name: port.name,
                etp_local: info.etp_local,
                affinity_timeout_s: info.affinity_timeout_s,
            });
        }
    }

    let mut services = BTreeMap::new();
    for (frontend, mut claims) in claims {
        claims.sort_by(|a, b| {
            (a.created.is_none(), &a.created, &a.service, a.index).cmp(&(
                b.created.is_none(),
                &b.created,
                &b.service,
                b.index,
            ))
        });
        let mut claims = claims.into_iter();
        let Some(winner) = claims.next() else {
            continue;
        };
        for loser in claims {
            let message = if loser.service == winner.service {
                format!(
                    "{}: nodePort {} is also used by {} of this service, which comes first; not served",
                    loser.port,
                    validate::frontend_str(frontend),
                    winner.port,
                )
            } else {
                let why = match (&winner.created, &loser.created) {
                    (Some(w), Some(l)) if w != l => "which is older",
                    (Some(_), None) => "which has a creationTimestamp and this one has none",
                    _ => "which comes first by namespace/name",
                };
                format!(
                    "{}: nodePort {} is already claimed by Service {} ({}), {why}; not served",
                    loser.port,
                    validate::frontend_str(frontend),
                    winner.service,
                    winner.port,
                )
            };
            problems.push(Problem::service(&loser.service, message));
        }
        let endpoints = groups
            .get(&winner.service)
            .and_then(|g| {
                g.get(&(
                    winner.port_name.clone(),
                    validate::proto_name(frontend.proto).to_owned(),
                ))
            })
            .map_or(&[][..], Vec::as_slice);
        let categorized = categorize_endpoints(endpoints);
        let sorted = |set: Vec<EndpointInfo>| {
            let mut backends: Vec<DesiredBackend> = set
                .into_iter()
                .map(|e| DesiredBackend {
                    addr: e.addr,
                    local: e.local,
                })
                .collect();
            backends.sort_by_key(|b| b.addr);
            backends
        };
        let (backends, cluster_backends) = if winner.etp_local {
            (sorted(categorized.local), sorted(categorized.cluster))
        } else {
            (sorted(categorized.cluster), Vec::new())
        };
        let mut draining: Vec<DesiredBackend> = endpoints
            .iter()
            .filter(|e| {
                !backends
                    .iter()
                    .chain(&cluster_backends)
                    .any(|b| b.addr == e.addr)
            })
            .map(|e| DesiredBackend {
                addr: e.addr,
                local: e.local,
            })
            .collect();
        draining.sort_by_key(|b| b.addr);
        draining.dedup();
        services.insert(
            frontend,
            DesiredService {
                service: winner.service,
                port_name: winner.port_name,
                etp_local: winner.etp_local,
                affinity_timeout_s: winner.affinity_timeout_s,
                backends,
                cluster_backends,
                draining,
            },
        );
    }

    Desired {
        node_addrs,
        services,
        health_checks,
        problems,
    }
}

fn created(svc: &Service) -> Option<Time> {
    svc.metadata.creation_timestamp.clone()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::{
                ClientIPConfig, Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
                SessionAffinityConfig,
            },
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
        },
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
        jiff::Timestamp,
    };
    use nodeport_common::{IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    const NODE: &str = "node-a";
    const OTHER: &str = "node-b";

    // ---- builders ----

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: (!ns.is_empty()).then(|| ns.to_owned()),
            name: Some(name.to_owned()),
            ..Default::default()
        }
    }

    fn port(name: &str, protocol: &str, node_port: Option<i32>) -> ServicePort {
        ServicePort {
            name: (!name.is_empty()).then(|| name.to_owned()),
            protocol: Some(protocol.to_owned()),
            port: 80,
            node_port,
            ..Default::default()
        }
    }

    /// A NodePort service with an allocated IPv4 cluster IP.
    fn service(ns: &str, name: &str, ports: Vec<ServicePort>) -> Service {
        Service {
            metadata: meta(ns, name),
            spec: Some(ServiceSpec {
                type_: Some("NodePort".into()),
                cluster_ip: Some("10.96.0.10".into()),
                cluster_ips: Some(vec!["10.96.0.10".into()]),
                ip_families: Some(vec!["IPv4".into()]),
                ports: Some(ports),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The common case: a NodePort service with one port "http" TCP on `node_port`.
    fn web(ns: &str, name: &str, node_port: i32) -> Service {
        service(ns, name, vec![port("http", "TCP", Some(node_port))])
    }

    fn spec(svc: &mut Service) -> &mut ServiceSpec {
        svc.spec.as_mut().unwrap()
    }

    fn created(mut svc: Service, secs: i64) -> Service {
        svc.metadata.creation_timestamp = Some(Time(Timestamp::from_second(secs).unwrap()));
        svc
    }

    fn etp_local(mut svc: Service) -> Service {
        spec(&mut svc).external_traffic_policy = Some("Local".into());
        svc
    }

    fn ep(
        addr: &str,
        node: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![addr.to_owned()],
            node_name: (!node.is_empty()).then(|| node.to_owned()),
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..Default::default()
        }
    }

    fn ready(addr: &str, node: &str) -> Endpoint {
        ep(addr, node, Some(true), Some(true), Some(false))
    }

    fn slice_port(name: &str, protocol: &str, port: Option<i32>) -> EndpointPort {
        EndpointPort {
            name: Some(name.to_owned()),
            protocol: Some(protocol.to_owned()),
            port,
            ..Default::default()
        }
    }

    /// An IPv4 slice of `service` (None: no service-name label).
    fn slice(
        ns: &str,
        name: &str,
        service: Option<&str>,
        ports: Vec<EndpointPort>,
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        let mut metadata = meta(ns, name);
        if let Some(s) = service {
            metadata.labels = Some(BTreeMap::from([(
                LABEL_SERVICE_NAME.to_owned(),
                s.to_owned(),
            )]));
        }
        EndpointSlice {
            metadata,
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(ports),
        }
    }

    /// A slice of `service` with one port "http"/TCP → `target`.
    fn http_slice(
        ns: &str,
        name: &str,
        service: &str,
        target: i32,
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        slice(
            ns,
            name,
            Some(service),
            vec![slice_port("http", "TCP", Some(target))],
            endpoints,
        )
    }

    fn node(name: &str, addrs: &[(&str, &str)]) -> Node {
        Node {
            metadata: meta("", name),
            status: Some(NodeStatus {
                addresses: Some(
                    addrs
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: (*t).to_owned(),
                            address: (*a).to_owned(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn state(services: Vec<Service>, slices: Vec<EndpointSlice>) -> ClusterState {
        let mut s = ClusterState::default();
        for o in services {
            s.services.insert(ObjKey::of(&o), o);
        }
        for o in slices {
            s.slices.insert(ObjKey::of(&o), o);
        }
        let n = node(NODE, &[("InternalIP", "192.0.2.10")]);
        s.nodes.insert(ObjKey::of(&n), n);
        s
    }

    fn cfg() -> SemanticsConfig {
        SemanticsConfig::new(NODE)
    }

    fn tcp(node_port: u16) -> FrontendId {
        FrontendId {
            node_port,
            proto: IPPROTO_TCP,
        }
    }

    fn addrs(svc: &DesiredService) -> Vec<String> {
        svc.backends.iter().map(|b| b.addr.to_string()).collect()
    }

    fn problems_of<'a>(d: &'a Desired, object: &str) -> Vec<&'a str> {
        d.problems
            .iter()
            .filter(|p| p.object == object)
            .map(|p| p.message.as_str())
            .collect()
    }

    // ---- categorisation ----

    #[test]
    fn endpoint_categorisation_table() {
        type Cond = (Option<bool>, Option<bool>, Option<bool>);
        const READY: Cond = (Some(true), Some(true), Some(false));
        const NOT_READY: Cond = (Some(false), Some(false), Some(false));
        // Serving but terminating: the fallback.
        const SERV_TERM: Cond = (Some(false), Some(true), Some(true));
        const DEAD_TERM: Cond = (Some(false), Some(false), Some(true));
        // Not ready, serving, not terminating (e.g. a readiness gate): never used.
        const SERV_ONLY: Cond = (Some(false), Some(true), Some(false));
        const NIL: Cond = (None, None, None);
        // Not ready, terminating, serving unset: kube-proxy reads nil serving as true.
        const TERM_NIL_SERVING: Cond = (Some(false), None, Some(true));
        // (name, eTP Local, endpoints (address, local, conditions), expected backends)
        type Case = (
            &'static str,
            bool,
            &'static [(&'static str, bool, Cond)],
            &'static [&'static str],
        );
        let table: &[Case] = &[
            (
                "cluster: all ready, local and remote",
                false,
                &[
                    ("10.0.0.1", true, READY),
                    ("10.0.0.2", false, READY),
                    ("10.0.0.3", false, NOT_READY),
                ],
                &["10.0.0.1:8080", "10.0.0.2:8080"],
            ),
            (
                "cluster: ready remote beats serving-terminating local",
                false,
                &[("10.0.0.1", true, SERV_TERM), ("10.0.0.2", false, READY)],
                &["10.0.0.2:8080"],
            ),
            (
                "cluster: no ready anywhere -> serving-terminating, local and remote",
                false,
                &[
                    ("10.0.0.1", true, SERV_TERM),
                    ("10.0.0.2", false, SERV_TERM),
                    ("10.0.0.3", false, DEAD_TERM),
                    ("10.0.0.4", false, SERV_ONLY),
                ],
                &["10.0.0.1:8080", "10.0.0.2:8080"],
            ),
            (
                "cluster: nothing usable -> empty",
                false,
                &[
                    ("10.0.0.1", true, NOT_READY),
                    ("10.0.0.2", false, DEAD_TERM),
                    ("10.0.0.3", false, SERV_ONLY),
                ],
                &[],
            ),
            (
                "cluster: nil conditions are ready",
                false,
                &[("10.0.0.1", false, NIL)],
                &["10.0.0.1:8080"],
            ),
            (
                "cluster: nil serving reads as true for the fallback",
                false,
                &[("10.0.0.1", false, TERM_NIL_SERVING)],
                &["10.0.0.1:8080"],
            ),
            (
                "local: local ready only",
                true,
                &[
                    ("10.0.0.1", true, READY),
                    ("10.0.0.2", false, READY),
                    ("10.0.0.3", true, SERV_TERM),
                ],
                &["10.0.0.1:8080"],
            ),
            (
                "local: no local ready -> local serving-terminating despite remote ready",
                true,
                &[
                    ("10.0.0.1", true, SERV_TERM),
                    ("10.0.0.2", false, READY),
                    ("10.0.0.3", true, DEAD_TERM),
                ],
                &["10.0.0.1:8080"],
            ),
            (
                "local: only remote endpoints -> empty (drop on this node)",
                true,
                &[("10.0.0.2", false, READY), ("10.0.0.3", false, SERV_TERM)],
                &[],
            ),
            (
                "local: local not ready and not terminating -> empty",
                true,
                &[
                    ("10.0.0.1", true, NOT_READY),
                    ("10.0.0.4", true, SERV_ONLY),
                    ("10.0.0.2", false, READY),
                ],
                &[],
            ),
            (
                "local: nil conditions are ready",
                true,
                &[("10.0.0.1", true, NIL), ("10.0.0.2", true, SERV_TERM)],
                &["10.0.0.1:8080"],
            ),
        ];
        for (name, local_policy, eps, want) in table {
            let endpoints = eps
                .iter()
                .map(|(a, local, (r, s, t))| ep(a, if *local { NODE } else { OTHER }, *r, *s, *t))
                .collect();
            let mut svc = web("default", "web", 30080);
            if *local_policy {
                svc = etp_local(svc);
            }
            let d = desired(
                &state(
                    vec![svc],
                    vec![http_slice("default", "web-1", "web", 8080, endpoints)],
                ),
                &cfg(),
            );
            let got = &d.services[&tcp(30080)];
            assert_eq!(addrs(got), *want, "{name}");
            assert_eq!(got.etp_local, *local_policy, "{name}");
            assert_eq!(
                got.flags() & FRONTEND_ETP_LOCAL != 0,
                *local_policy,
                "{name}"
            );
            for b in &got.backends {
                let want_local = eps
                    .iter()
                    .any(|(a, l, _)| *l && b.addr.ip().to_string() == *a);
                assert_eq!(b.local, want_local, "{name}: {}", b.addr);
                assert_eq!(b.flags() & BACKEND_LOCAL != 0, want_local, "{name}");
            }
            assert!(d.problems.is_empty(), "{name}: {:?}", d.problems);
        }
    }

    #[test]
    fn categorize_endpoints_gives_both_sets() {
        let e = |a: u8, local, ready, serving, terminating| EndpointInfo {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, a), 80),
            local,
            ready,
            serving,
            terminating,
        };
        let eps = [
            e(1, true, false, true, true),
            e(2, false, true, true, false),
        ];
        let c = categorize_endpoints(&eps);
        assert_eq!(c.cluster, [eps[1]]);
        assert_eq!(c.local, [eps[0]]);
    }

    // ---- ports ----

    #[test]
    fn named_target_port_resolves_per_slice() {
        let svc = service(
            "default",
            "web",
            vec![
                port("http", "TCP", Some(30080)),
                port("dns", "UDP", Some(30053)),
            ],
        );
        let slices = vec![
            // Two revisions of the pods: "http" is 8080 in one slice, 9090 in the other.
            http_slice(
                "default",
                "web-a",
                "web",
                8080,
                vec![ready("10.0.0.1", NODE)],
            ),
            slice(
                "default",
                "web-b",
                Some("web"),
                vec![
                    slice_port("http", "TCP", Some(9090)),
                    slice_port("dns", "UDP", Some(5353)),
                    // Same name, other protocol: belongs to no service port here.
                    slice_port("http", "UDP", Some(7070)),
                ],
                vec![ready("10.0.0.2", OTHER)],
            ),
        ];
        let d = desired(&state(vec![svc], slices), &cfg());
        let http = &d.services[&tcp(30080)];
        assert_eq!(http.port_name, "http");
        assert_eq!(addrs(http), ["10.0.0.1:8080", "10.0.0.2:9090"]);
        let dns = &d.services[&FrontendId {
            node_port: 30053,
            proto: IPPROTO_UDP,
        }];
        assert_eq!(dns.port_name, "dns");
        assert_eq!(addrs(dns), ["10.0.0.2:5353"]);
        assert!(d.problems.is_empty(), "{:?}", d.problems);
    }

    #[test]
    fn unnamed_port_matches_unnamed_slice_port() {
        let svc = service("default", "web", vec![port("", "TCP", Some(30080))]);
        let mut s = slice(
            "default",
            "web-a",
            Some("web"),
            vec![slice_port("", "TCP", Some(8080))],
            vec![ready("10.0.0.1", OTHER)],
        );
        // A nil name and protocol get the apiserver's defaults ("" and TCP).
        s.ports.as_mut().unwrap()[0].name = None;
        s.ports.as_mut().unwrap()[0].protocol = None;
        let d = desired(&state(vec![svc], vec![s]), &cfg());
        assert_eq!(d.services[&tcp(30080)].port_name, "");
        assert_eq!(addrs(&d.services[&tcp(30080)]), ["10.0.0.1:8080"]);
    }

    #[test]
    fn duplicate_endpoints_across_slices_are_merged() {
        let slices = vec![
            // A ghost pod still terminating with the IP a new pod now has.
            http_slice(
                "default",
                "web-a",
                "web",
                8080,
                vec![
                    ep("10.0.0.1", OTHER, Some(false), Some(false), Some(true)),
                    ready("10.0.0.2", OTHER),
                ],
            ),
            http_slice(
                "default",
                "web-b",
                "web",
                8080,
                vec![ready("10.0.0.1", NODE), ready("10.0.0.2", OTHER)],
            ),
            // Terminating duplicate after the ready one: the ready one stays.
            http_slice(
                "default",
                "web-c",
                "web",
                8080,
                vec![ep("10.0.0.2", OTHER, Some(false), Some(false), Some(true))],
            ),
            // Same IP, other port number: a different endpoint.
            http_slice(
                "default",
                "web-d",
                "web",
                9090,
                vec![ready("10.0.0.2", OTHER)],
            ),
        ];
        let d = desired(&state(vec![web("default", "web", 30080)], slices), &cfg());
        let got = &d.services[&tcp(30080)];
        assert_eq!(
            addrs(got),
            ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.2:9090"]
        );
        assert!(got.backends[0].local);
    }

    // ---- services ----

    #[test]
    fn client_ip_affinity() {
        let mut default_timeout = web("default", "a", 30001);
        spec(&mut default_timeout).session_affinity = Some("ClientIP".into());
        let mut explicit = web("default", "b", 30002);
        spec(&mut explicit).session_affinity = Some("ClientIP".into());
        spec(&mut explicit).session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
        let mut none = web("default", "c", 30003);
        spec(&mut none).session_affinity = Some("None".into());
        let d = desired(
            &state(vec![default_timeout, explicit, none], vec![]),
            &cfg(),
        );
        assert_eq!(d.services[&tcp(30001)].affinity_timeout_s, Some(10800));
        assert_eq!(
            d.services[&tcp(30001)].flags() & FRONTEND_AFFINITY,
            FRONTEND_AFFINITY
        );
        assert_eq!(d.services[&tcp(30002)].affinity_timeout_s, Some(60));
        assert_eq!(d.services[&tcp(30003)].affinity_timeout_s, None);
        assert_eq!(d.services[&tcp(30003)].flags(), 0);
    }

    #[test]
    fn skipped_services() {
        let mut headless = web("default", "headless", 30001);
        spec(&mut headless).cluster_ip = Some("None".into());
        spec(&mut headless).cluster_ips = Some(vec!["None".into()]);
        let mut other_proxy = web("default", "other-proxy", 30002);
        other_proxy.metadata.labels = Some(BTreeMap::from([(
            LABEL_SERVICE_PROXY_NAME.to_owned(),
            "foo".to_owned(),
        )]));
        let mut cluster_ip = web("default", "cluster-ip", 0);
        spec(&mut cluster_ip).type_ = Some("ClusterIP".into());
        spec(&mut cluster_ip).ports = Some(vec![port("http", "TCP", None)]);
        let mut ipv6_only = web("default", "v6", 30004);
        spec(&mut ipv6_only).cluster_ip = Some("fd00::10".into());
        spec(&mut ipv6_only).cluster_ips = Some(vec!["fd00::10".into()]);
        spec(&mut ipv6_only).ip_families = Some(vec!["IPv6".into()]);
        let mut dual = web("default", "dual", 30005);
        spec(&mut dual).cluster_ip = Some("fd00::11".into());
        spec(&mut dual).cluster_ips = Some(vec!["fd00::11".into(), "10.96.0.11".into()]);
        spec(&mut dual).ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
        // From manifests: never allocated a cluster IP; served (see service_info).
        let mut unallocated = web("default", "manifest", 30006);
        spec(&mut unallocated).cluster_ip = None;
        spec(&mut unallocated).cluster_ips = None;
        spec(&mut unallocated).ip_families = None;
        let d = desired(
            &state(
                vec![
                    headless,
                    other_proxy,
                    cluster_ip,
                    ipv6_only,
                    dual,
                    unallocated,
                ],
                vec![],
            ),
            &cfg(),
        );
        assert_eq!(
            d.services.keys().copied().collect::<Vec<_>>(),
            [tcp(30005), tcp(30006)]
        );
        assert!(d.problems.is_empty(), "{:?}", d.problems);
    }

    #[test]
    fn load_balancer_services() {
        let mut lb = service(
            "default",
            "lb",
            vec![
                port("http", "TCP", Some(30080)),
                port("https", "TCP", Some(30443)),
            ],
        );
        spec(&mut lb).type_ = Some("LoadBalancer".into());
        let mut no_node_ports = service("default", "lb-direct", vec![port("http", "TCP", None)]);
        spec(&mut no_node_ports).type_ = Some("LoadBalancer".into());
        spec(&mut no_node_ports).allocate_load_balancer_node_ports = Some(false);
        let mut lb_local = etp_local(service(
            "default",
            "lb-local",
            vec![
                port("http", "TCP", Some(30081)),
                port("alt", "TCP", Some(30082)),
            ],
        ));
        spec(&mut lb_local).type_ = Some("LoadBalancer".into());
        spec(&mut lb_local).health_check_node_port = Some(32000);
        // NodePort with eTP Local: kube-proxy serves no health check for it.
        let np_local = etp_local(web("default", "np-local", 30083));
        let slices = vec![
            http_slice("default", "lb-1", "lb", 8080, vec![ready("10.0.0.1", NODE)]),
            slice(
                "default",
                "lb-local-1",
                Some("lb-local"),
                vec![
                    slice_port("http", "TCP", Some(8080)),
                    slice_port("alt", "TCP", Some(8081)),
                ],
                vec![
                    ready("10.0.0.5", NODE),
                    ready("10.0.0.6", NODE),
                    ready("10.0.0.7", OTHER),
                    ep("10.0.0.8", NODE, Some(false), Some(true), Some(true)),
                ],
            ),
        ];
        let d = desired(
            &state(vec![lb, no_node_ports, lb_local, np_local], slices),
            &cfg(),
        );
        assert_eq!(
            d.services.keys().copied().collect::<Vec<_>>(),
            [tcp(30080), tcp(30081), tcp(30082), tcp(30083), tcp(30443)]
        );
        assert_eq!(addrs(&d.services[&tcp(30080)]), ["10.0.0.1:8080"]);
        assert_eq!(addrs(&d.services[&tcp(30443)]), Vec::<String>::new());
        assert_eq!(
            addrs(&d.services[&tcp(30082)]),
            ["10.0.0.5:8081", "10.0.0.6:8081"]
        );
        // Two local ready IPs, each on two ports: counted once; the terminating one not at all.
        assert_eq!(
            d.health_checks,
            [HealthCheck {
                node_port: 32000,
                service: ObjKey::new("default", "lb-local"),
                local_endpoints: 2,
            }]
        );
        assert!(d.problems.is_empty(), "{:?}", d.problems);
    }

    #[test]
    fn health_check_counts_zero_with_only_terminating_local_endpoints() {
        let mut svc = etp_local(web("default", "lb", 30080));
        spec(&mut svc).type_ = Some("LoadBalancer".into());
        spec(&mut svc).health_check_node_port = Some(32000);
        let slices = vec![http_slice(
            "default",
            "lb-1",
            "lb",
            8080,
            vec![ep("10.0.0.1", NODE, Some(false), Some(true), Some(true))],
        )];
        let d = desired(&state(vec![svc], slices), &cfg());
        // Traffic still goes to the terminating endpoint, but the health check fails.
        assert_eq!(addrs(&d.services[&tcp(30080)]), ["10.0.0.1:8080"]);
        assert_eq!(d.health_checks[0].local_endpoints, 0);
    }

    #[test]
    fn terminating_endpoints_beside_ready_ones_drain_instead_of_vanishing() {
        let svc = web("default", "web", 30080);
        let slices = vec![http_slice(
            "default",
            "web-1",
            "web",
            8080,
            vec![
                ep("10.0.0.1", NODE, Some(true), Some(true), Some(false)),
                ep("10.0.0.2", "node-b", Some(false), Some(true), Some(true)),
                ep("10.0.0.3", "node-b", Some(false), Some(false), Some(false)),
            ],
        )];
        let d = desired(&state(vec![svc], slices), &cfg());
        let s = &d.services[&tcp(30080)];
        assert_eq!(addrs(s), ["10.0.0.1:8080"]);
        // Not balanced over, but kept for the connections they already have.
        let draining: Vec<String> = s.draining.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(draining, ["10.0.0.2:8080", "10.0.0.3:8080"]);
    }

    #[test]
    fn etp_local_gives_the_nodes_own_clients_the_cluster_set() {
        // kube-proxy: pod and node-local traffic to an eTP=Local nodePort goes to the cluster
        // policy chain (every ready endpoint); outside traffic to the local ones only.
        let slices = |name: &str| {
            vec![http_slice(
                "default",
                &format!("{name}-1"),
                name,
                8080,
                vec![
                    ep("10.0.0.1", NODE, Some(true), Some(true), Some(false)),
                    ep("10.0.0.2", OTHER, Some(true), Some(true), Some(false)),
                    ep("10.0.0.3", OTHER, Some(false), Some(true), Some(true)),
                ],
            )]
        };
        let strings = |v: &[DesiredBackend]| -> Vec<String> {
            v.iter().map(|b| b.addr.to_string()).collect()
        };
        let d = desired(
            &state(vec![etp_local(web("default", "web", 30080))], slices("web")),
            &cfg(),
        );
        let s = &d.services[&tcp(30080)];
        assert_eq!(addrs(s), ["10.0.0.1:8080"]);
        assert_eq!(
            strings(&s.cluster_backends),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );
        assert!(s.cluster_backends[0].local && !s.cluster_backends[1].local);
        assert_eq!(strings(&s.draining), ["10.0.0.3:8080"]);

        let d = desired(
            &state(vec![web("default", "web", 30080)], slices("web")),
            &cfg(),
        );
        let s = &d.services[&tcp(30080)];
        assert_eq!(addrs(s), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert!(
            s.cluster_backends.is_empty(),
            "Cluster: backends are that set"
        );
    }

    // ---- node addresses ----

    #[test]
    fn node_addresses_filtered_by_cidr() {
        let n = node(
            NODE,
            &[
                ("InternalIP", "192.0.2.10"),
                ("ExternalIP", "198.51.100.7"),
                ("InternalIP", "10.1.2.3"),
                ("InternalIP", "fd00::1"),
                ("Hostname", "node-a"),
            ],
        );
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let table: &[(&[&str], &[&str])] = &[
            (&[], &["10.1.2.3", "192.0.2.10", "198.51.100.7"]),
            (&["0.0.0.0/0"], &["10.1.2.3", "192.0.2.10", "198.51.100.7"]),
            (&["192.0.2.0/24"], &["192.0.2.10"]),
            (&["192.0.2.0/24", "10.0.0.0/8"], &["10.1.2.3", "192.0.2.10"]),
            (&["203.0.113.0/24"], &[]),
        ];
        for (cidrs, want) in table {
            let mut s = state(vec![], vec![]);
            s.nodes.insert(ObjKey::of(&n), n.clone());
            let mut c = cfg();
            c.nodeport_cidrs = cidrs.iter().map(|s| net(s)).collect();
            let d = desired(&s, &c);
            let got: Vec<String> = d.node_addrs.iter().map(ToString::to_string).collect();
            assert_eq!(got, *want, "{cidrs:?}");
            assert!(d.problems.is_empty());
        }
    }

    #[test]
    fn other_nodes_addresses_are_not_ours() {
        let mut s = state(vec![web("default", "web", 30080)], vec![]);
        s.nodes.clear();
        let n = node(OTHER, &[("InternalIP", "192.0.2.11")]);
        s.nodes.insert(ObjKey::of(&n), n);
        let d = desired(&s, &cfg());
        assert!(d.node_addrs.is_empty());
        assert_eq!(problems_of(&d, "Node node-a").len(), 1);
        assert!(d.services.contains_key(&tcp(30080)));
    }

    #[test]
    fn problem_node_without_ipv4_addresses() {
        let mut s = state(vec![web("default", "web", 30080)], vec![]);
        s.nodes.clear();
        let n = node(
            NODE,
            &[("InternalIP", "fd00::2"), ("ExternalIP", "2001:db8::2")],
        );
        s.nodes.insert(ObjKey::of(&n), n);
        let d = desired(&s, &cfg());
        assert!(d.node_addrs.is_empty());
        let p = problems_of(&d, "Node node-a");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("no IPv4 InternalIP or ExternalIP"), "{p:?}");
        // Services are still computed: the Node may gain an IPv4 address later.
        assert!(d.services.contains_key(&tcp(30080)));
    }

    // ---- validation: one test per rule ----

    #[test]
    fn problem_sctp_port_others_still_served() {
        let svc = service(
            "default",
            "mixed",
            vec![
                port("sig", "SCTP", Some(30001)),
                port("http", "TCP", Some(30002)),
            ],
        );
        let d = desired(
            &state(vec![svc, web("default", "web", 30080)], vec![]),
            &cfg(),
        );
        let p = problems_of(&d, "Service default/mixed");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("\"sig\"") && p[0].contains("SCTP"), "{p:?}");
        assert_eq!(
            d.services.keys().copied().collect::<Vec<_>>(),
            [tcp(30002), tcp(30080)]
        );
    }

    #[test]
    fn problem_node_port_outside_range() {
        let svc = service(
            "default",
            "ssh",
            vec![
                port("ssh", "TCP", Some(22)),
                port("http", "TCP", Some(30002)),
            ],
        );
        let d = desired(
            &state(vec![svc, web("default", "web", 30080)], vec![]),
            &cfg(),
        );
        let p = problems_of(&d, "Service default/ssh");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("nodePort 22") && p[0].contains("30000-32767"),
            "{p:?}"
        );
        assert_eq!(
            d.services.keys().copied().collect::<Vec<_>>(),
            [tcp(30002), tcp(30080)]
        );
        // A custom range admits it.
        let mut c = cfg();
        c.nodeport_range = 1..=65535;
        let svc = service("default", "ssh", vec![port("ssh", "TCP", Some(22))]);
        assert!(
            desired(&state(vec![svc], vec![]), &c)
                .services
                .contains_key(&tcp(22))
        );
    }

    #[test]
    fn problem_missing_node_port() {
        let svc = service("default", "np", vec![port("http", "TCP", None)]);
        let d = desired(
            &state(vec![svc, web("default", "web", 30080)], vec![]),
            &cfg(),
        );
        assert_eq!(problems_of(&d, "Service default/np").len(), 1);
        assert_eq!(d.services.keys().copied().collect::<Vec<_>>(), [tcp(30080)]);
    }

    #[test]
    fn problem_node_port_conflict_older_service_wins() {
        // "b" is older than "a": it keeps the frontend although "a" sorts first by name.
        let a = created(web("default", "a", 30080), 2_000);
        let b = created(web("default", "b", 30080), 1_000);
        let slices = vec![
            http_slice("default", "a-1", "a", 8080, vec![ready("10.0.0.1", OTHER)]),
            http_slice("default", "b-1", "b", 8080, vec![ready("10.0.0.2", OTHER)]),
        ];
        let d = desired(
            &state(vec![a, b, web("default", "web", 30081)], slices),
            &cfg(),
        );
        assert_eq!(d.services[&tcp(30080)].service, ObjKey::new("default", "b"));
        assert_eq!(addrs(&d.services[&tcp(30080)]), ["10.0.0.2:8080"]);
        let p = problems_of(&d, "Service default/a");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("30080/TCP") && p[0].contains("default/b") && p[0].contains("older"),
            "{p:?}"
        );
        assert!(problems_of(&d, "Service default/b").is_empty());
        assert!(d.services.contains_key(&tcp(30081)));
    }

    #[test]
    fn problem_node_port_conflict_without_timestamps_goes_by_name() {
        let d = desired(
            &state(
                vec![
                    web("z", "a", 30080),
                    web("a", "z", 30080),
                    web("default", "web", 30081),
                ],
                vec![],
            ),
            &cfg(),
        );
        assert_eq!(d.services[&tcp(30080)].service, ObjKey::new("a", "z"));
        let p = problems_of(&d, "Service z/a");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("a/z") && p[0].contains("namespace/name"),
            "{p:?}"
        );
        // A timestamped (apiserver-admitted) service beats one without.
        let d = desired(
            &state(
                vec![web("a", "a", 30080), created(web("b", "b", 30080), 1)],
                vec![],
            ),
            &cfg(),
        );
        assert_eq!(d.services[&tcp(30080)].service, ObjKey::new("b", "b"));
        // The same nodePort on TCP and UDP is two frontends, no conflict.
        let d = desired(
            &state(
                vec![
                    web("a", "a", 30080),
                    service("b", "b", vec![port("d", "UDP", Some(30080))]),
                ],
                vec![],
            ),
            &cfg(),
        );
        assert_eq!(d.services.len(), 2);
        assert!(d.problems.is_empty());
    }

    #[test]
    fn problem_node_port_twice_in_one_service() {
        let svc = service(
            "default",
            "twice",
            vec![
                port("a", "TCP", Some(30080)),
                port("b", "TCP", Some(30080)),
                port("c", "TCP", Some(30081)),
            ],
        );
        let d = desired(&state(vec![svc], vec![]), &cfg());
        assert_eq!(d.services[&tcp(30080)].port_name, "a");
        assert!(d.services.contains_key(&tcp(30081)));
        let p = problems_of(&d, "Service default/twice");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("\"b\"") && p[0].contains("this service"),
            "{p:?}"
        );
    }

    #[test]
    fn problem_slice_without_service_label() {
        let slices = vec![
            slice(
                "default",
                "orphan",
                None,
                vec![slice_port("http", "TCP", Some(8080))],
                vec![ready("10.0.0.9", OTHER)],
            ),
            http_slice(
                "default",
                "web-1",
                "web",
                8080,
                vec![ready("10.0.0.1", OTHER)],
            ),
        ];
        let d = desired(&state(vec![web("default", "web", 30080)], slices), &cfg());
        let p = problems_of(&d, "EndpointSlice default/orphan");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains(LABEL_SERVICE_NAME));
        assert_eq!(addrs(&d.services[&tcp(30080)]), ["10.0.0.1:8080"]);
    }

    #[test]
    fn problem_invalid_endpoint_addresses() {
        let mut empty = ready("10.0.0.9", OTHER);
        empty.addresses.clear();
        let slices = vec![http_slice(
            "default",
            "web-1",
            "web",
            8080,
            vec![
                ready("not-an-ip", OTHER),
                ready("fd00::5", OTHER),
                empty,
                ready("10.0.0.1", OTHER),
            ],
        )];
        let d = desired(&state(vec![web("default", "web", 30080)], slices), &cfg());
        let p = problems_of(&d, "EndpointSlice default/web-1");
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].contains("not-an-ip") && p[1].contains("fd00::5") && p[2].contains("no address"),
            "{p:?}"
        );
        assert_eq!(addrs(&d.services[&tcp(30080)]), ["10.0.0.1:8080"]);
    }

    #[test]
    fn problem_invalid_slice_ports() {
        let slices = vec![
            slice(
                "default",
                "web-1",
                Some("web"),
                vec![
                    slice_port("http", "TCP", Some(0)),
                    slice_port("http", "TCP", None),
                    slice_port("http", "TCP", Some(70000)),
                ],
                vec![ready("10.0.0.1", OTHER)],
            ),
            http_slice(
                "default",
                "web-2",
                "web",
                8080,
                vec![ready("10.0.0.2", OTHER)],
            ),
        ];
        let d = desired(&state(vec![web("default", "web", 30080)], slices), &cfg());
        let p = problems_of(&d, "EndpointSlice default/web-1");
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(addrs(&d.services[&tcp(30080)]), ["10.0.0.2:8080"]);
    }

    #[test]
    fn problem_slice_without_or_with_unknown_address_type() {
        let mut missing = http_slice(
            "default",
            "web-1",
            "web",
            8080,
            vec![ready("10.0.0.1", OTHER)],
        );
        missing.address_type = String::new();
        let mut unknown = http_slice(
            "default",
            "web-2",
            "web",
            8080,
            vec![ready("10.0.0.2", OTHER)],
        );
        unknown.address_type = "IPv5".into();
        let mut v6 = http_slice(
            "default",
            "web-3",
            "web",
            8080,
            vec![ready("fd00::1", OTHER)],
        );
        v6.address_type = "IPv6".into();
        let good = http_slice(
            "default",
            "web-4",
            "web",
            8080,
            vec![ready("10.0.0.4", OTHER)],
        );
        let d = desired(
            &state(
                vec![web("default", "web", 30080)],
                vec![missing, unknown, v6, good],
            ),
            &cfg(),
        );
        assert_eq!(
            problems_of(&d, "EndpointSlice default/web-1"),
            ["no addressType; ignored"]
        );
        let p = problems_of(&d, "EndpointSlice default/web-2");
        assert!(p.len() == 1 && p[0].contains("\"IPv5\""), "{p:?}");
        // An IPv6 slice is not a problem: it belongs to the IPv6 dataplane.
        assert!(problems_of(&d, "EndpointSlice default/web-3").is_empty());
        assert_eq!(addrs(&d.services[&tcp(30080)]), ["10.0.0.4:8080"]);
    }

    #[test]
    fn problem_service_port_number_missing_or_out_of_range() {
        let mut missing = port("a", "TCP", Some(30001));
        missing.port = 0;
        let mut too_big = port("b", "TCP", Some(30002));
        too_big.port = 70000;
        let svc = service(
            "default",
            "bad-ports",
            vec![missing, too_big, port("c", "TCP", Some(30003))],
        );
        let d = desired(&state(vec![svc], vec![]), &cfg());
        let p = problems_of(&d, "Service default/bad-ports");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("port 0 is not in 1-65535"), "{p:?}");
        assert!(p[1].contains("port 70000 is not in 1-65535"), "{p:?}");
        assert_eq!(d.services.keys().copied().collect::<Vec<_>>(), [tcp(30003)]);
    }

    #[test]
    fn problem_affinity_timeout_out_of_range() {
        let mut svc = web("default", "sticky", 30001);
        spec(&mut svc).session_affinity = Some("ClientIP".into());
        spec(&mut svc).session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(0),
            }),
        });
        let d = desired(
            &state(vec![svc, web("default", "web", 30080)], vec![]),
            &cfg(),
        );
        assert_eq!(problems_of(&d, "Service default/sticky").len(), 1);
        assert_eq!(d.services.keys().copied().collect::<Vec<_>>(), [tcp(30080)]);
    }

    #[test]
    fn problem_node_port_on_cluster_ip_service() {
        let mut svc = web("default", "cip", 30001);
        spec(&mut svc).type_ = Some("ClusterIP".into());
        let d = desired(
            &state(vec![svc, web("default", "web", 30080)], vec![]),
            &cfg(),
        );
        assert_eq!(problems_of(&d, "Service default/cip").len(), 1);
        assert_eq!(d.services.keys().copied().collect::<Vec<_>>(), [tcp(30080)]);
    }

    #[test]
    fn ignored_slices_are_silent() {
        let mut v6 = http_slice(
            "default",
            "web-v6",
            "web",
            8080,
            vec![ready("fd00::1", OTHER)],
        );
        v6.address_type = "IPv6".into();
        let mut fqdn = http_slice(
            "default",
            "web-fqdn",
            "web",
            8080,
            vec![ready("example.com", OTHER)],
        );
        fqdn.address_type = "FQDN".into();
        let mut other_proxy = http_slice(
            "default",
            "web-x",
            "web",
            8080,
            vec![ready("10.0.0.9", OTHER)],
        );
        other_proxy
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(LABEL_SERVICE_PROXY_NAME.into(), "x".into());
        let ok = http_slice(
            "default",
            "web-1",
            "web",
            8080,
            vec![ready("10.0.0.1", OTHER)],
        );
        let d = desired(
            &state(
                vec![web("default", "web", 30080)],
                vec![v6, fqdn, other_proxy, ok],
            ),
            &cfg(),
        );
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(addrs(&d.services[&tcp(30080)]), ["10.0.0.1:8080"]);
    }

    #[test]
    fn slices_of_other_namespaces_do_not_mix() {
        let slices = vec![
            http_slice(
                "default",
                "web-1",
                "web",
                8080,
                vec![ready("10.0.0.1", OTHER)],
            ),
            http_slice(
                "other",
                "web-1",
                "web",
                8080,
                vec![ready("10.0.0.2", OTHER)],
            ),
        ];
        let d = desired(&state(vec![web("default", "web", 30080)], slices), &cfg());
        assert_eq!(addrs(&d.services[&tcp(30080)]), ["10.0.0.1:8080"]);
    }

    #[test]
    fn backend_entry_carries_proto_and_local_flag() {
        let b = DesiredBackend {
            addr: "10.0.0.1:8080".parse().unwrap(),
            local: true,
        };
        assert_eq!(
            b.entry(IPPROTO_UDP),
            BackendEntry {
                addr: b.addr,
                proto: IPPROTO_UDP,
                flags: BACKEND_LOCAL,
            }
        );
    }
}
