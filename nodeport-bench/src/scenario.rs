//! The Services and EndpointSlices of one benchmark point: N NodePort Services of 5 endpoints each,
//! two of which are measured (one whose endpoints are all on the node the client asks, one whose
//! endpoints are all on another node); the others spread their endpoints over both workers.
//! Every dataplane gets these same objects: our agents read them from the manifests directory,
//! the kube-proxy renderer turns them into its rules.
//!
//! Names are `svc-NNNNN` and the measured pair sits at (N-1)/2, in the middle by name and by list
//! order: kube-proxy writes its per-service rules in Go map order, effectively random, so a
//! measured service is on average halfway down the chains; placing it there is the fair choice.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::bail;
use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use nodeport_lab::workload::{LABEL_SERVICE_NAME, Pod};

/// The pods' HTTP port (nodeport-echo).
pub const HTTP_PORT: u16 = 8080;
/// The bulk sink's port in every pod.
pub const SINK_PORT: u16 = 5201;
/// The cluster's `--service-node-port-range`: 10,000 NodePort services do not fit in the default
/// 30000-32767, so the bench's cluster is configured wider (the apiserver and our agent both take
/// the range as a flag; kube-proxy does not look at it).
pub const NODE_PORT_RANGE: (u16, u16) = (20000, 31999);
/// Endpoints per Service.
pub const ENDPOINTS: usize = 5;
const NAMESPACE: &str = "bench";

/// Which measured Service.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Endpoints on the node the client sends to.
    SameNode,
    /// Endpoints on another node.
    OtherNode,
}

impl Path {
    pub const ALL: [Path; 2] = [Path::SameNode, Path::OtherNode];
    pub fn label(self) -> &'static str {
        match self {
            Path::SameNode => "backend on the same node",
            Path::OtherNode => "backend on another node",
        }
    }
}

/// A measured Service: its ports and its endpoints' addresses.
#[derive(Clone, Debug)]
pub struct Measured {
    pub http_node_port: u16,
    pub bulk_node_port: u16,
    pub pod_ips: Vec<Ipv4Addr>,
}

/// One benchmark point's objects.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub same_node: Measured,
    pub other_node: Measured,
}

impl Scenario {
    pub fn measured(&self, path: Path) -> &Measured {
        match path {
            Path::SameNode => &self.same_node,
            Path::OtherNode => &self.other_node,
        }
    }

    /// `count` services (at least the two measured ones) over `pods`, where `local` is the node
    /// the client sends to and `remote` another worker; each must run at least
    /// [`ENDPOINTS`] pods.
    pub fn build(count: usize, pods: &[Pod], local: &str, remote: &str) -> anyhow::Result<Self> {
        let on = |node: &str| -> Vec<&Pod> { pods.iter().filter(|p| p.node == node).collect() };
        let (here, there) = (on(local), on(remote));
        if here.len() < ENDPOINTS || there.len() < ENDPOINTS {
            bail!(
                "the bench needs {ENDPOINTS} pods on {local} and on {remote}; they run {} and {}",
                here.len(),
                there.len()
            );
        }
        let max = usize::from(NODE_PORT_RANGE.1 - NODE_PORT_RANGE.0) - 1000;
        if count > max {
            bail!("{count} services: at most {max} fit in the bench's nodePort range");
        }
        let count = count.max(2);
        // Alternating nodes, so any 5 consecutive pods span both.
        let spread: Vec<&Pod> = here
            .iter()
            .zip(there.iter())
            .flat_map(|(a, b)| [*a, *b])
            .collect();
        let mid = (count - 1) / 2;
        let (mut services, mut slices) = (Vec::with_capacity(count), Vec::with_capacity(count));
        let mut measured = Vec::new();
        for i in 0..count {
            let endpoints: Vec<&Pod> = if i == mid {
                here[..ENDPOINTS].to_vec()
            } else if i == mid + 1 {
                there[..ENDPOINTS].to_vec()
            } else {
                (0..ENDPOINTS)
                    .map(|k| spread[(i + k) % spread.len()])
                    .collect()
            };
            let http_node_port = NODE_PORT_RANGE.0 + i as u16;
            let bulk =
                (i == mid || i == mid + 1).then(|| NODE_PORT_RANGE.1 - 999 + (i - mid) as u16);
            let name = format!("svc-{i:05}");
            services.push(service(&name, i, http_node_port, bulk));
            slices.push(slice(&name, &endpoints, bulk.is_some()));
            if let Some(bulk_node_port) = bulk {
                measured.push(Measured {
                    http_node_port,
                    bulk_node_port,
                    pod_ips: endpoints.iter().map(|p| p.ip).collect(),
                });
            }
        }
        let [same_node, other_node]: [Measured; 2] =
            measured.try_into().expect("two measured services");
        Ok(Self {
            services,
            slices,
            same_node,
            other_node,
        })
    }

    /// The manifests the agents read: every Service, then every slice, as one YAML stream.
    pub fn manifest_yaml(&self) -> anyhow::Result<String> {
        let mut text = String::new();
        for s in &self.services {
            text.push_str("---\n");
            text.push_str(&serde_yaml_ng::to_string(s)?);
        }
        for s in &self.slices {
            text.push_str("---\n");
            text.push_str(&serde_yaml_ng::to_string(s)?);
        }
        Ok(text)
    }

    /// The frontends every node's maps must hold: one per service port.
    pub fn frontends(&self) -> usize {
        self.services.len() + 2
    }
}

fn service(name: &str, index: usize, http_node_port: u16, bulk: Option<u16>) -> Service {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + index as u32).to_string();
    let port = |name: &str, port: i32, target: u16, node_port: u16| ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(i32::from(target))),
        node_port: Some(i32::from(node_port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let mut ports = vec![port("http", 80, HTTP_PORT, http_node_port)];
    if let Some(bulk) = bulk {
        ports.push(port("bulk", 5201, SINK_PORT, bulk));
    }
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NAMESPACE.into()),
            creation_timestamp: Some(
                serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z"))
                    .expect("a valid timestamp"),
            ),
            ..Default::default()
        },
        // No selector: the slices below are written by the bench, as a controller would.
        spec: Some(ServiceSpec {
            type_: Some("NodePort".into()),
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            external_traffic_policy: Some("Cluster".into()),
            ports: Some(ports),
            ..Default::default()
        }),
        status: None,
    }
}

fn slice(service: &str, pods: &[&Pod], bulk: bool) -> EndpointSlice {
    let mut ports = vec![EndpointPort {
        name: Some("http".into()),
        port: Some(i32::from(HTTP_PORT)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }];
    if bulk {
        ports.push(EndpointPort {
            name: Some("bulk".into()),
            port: Some(i32::from(SINK_PORT)),
            protocol: Some("TCP".into()),
            ..Default::default()
        });
    }
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-bench")),
            namespace: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([
                (LABEL_SERVICE_NAME.to_owned(), service.to_owned()),
                (
                    "endpointslice.kubernetes.io/managed-by".to_owned(),
                    "nodeport-bench".to_owned(),
                ),
            ])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: pods
            .iter()
            .map(|p| Endpoint {
                addresses: vec![p.ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(p.node.clone()),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(p.name.clone()),
                    namespace: Some(p.namespace.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(ports),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> Vec<Pod> {
        let mut out = Vec::new();
        for (node, idx) in [("w1", 1u8), ("w2", 2u8)] {
            for h in 0..5u8 {
                out.push(Pod {
                    name: format!("p-{node}-{h}"),
                    namespace: "bench".into(),
                    deployment: "echo".into(),
                    template_hash: "x".into(),
                    node: node.into(),
                    ip: Ipv4Addr::new(10, 244, idx, 2 + h),
                    labels: Default::default(),
                    ports: Vec::new(),
                    host_if: "v".into(),
                    seq: 0,
                    terminating: false,
                });
            }
        }
        out
    }

    #[test]
    fn measured_services_sit_in_the_middle_with_their_nodes_endpoints() {
        let s = Scenario::build(1000, &pods(), "w1", "w2").unwrap();
        assert_eq!(s.services.len(), 1000);
        assert_eq!(s.slices.len(), 1000);
        assert_eq!(s.same_node.http_node_port, 20499);
        assert_eq!(s.other_node.http_node_port, 20500);
        assert!(s.same_node.pod_ips.iter().all(|ip| ip.octets()[2] == 1));
        assert!(s.other_node.pod_ips.iter().all(|ip| ip.octets()[2] == 2));
        // Fillers have 5 endpoints on both nodes.
        let nodes: std::collections::BTreeSet<_> = s.slices[0]
            .endpoints
            .iter()
            .map(|e| e.node_name.clone().unwrap())
            .collect();
        assert_eq!(nodes.len(), 2);
        assert_eq!(s.slices[0].endpoints.len(), ENDPOINTS);
        assert_eq!(s.frontends(), 1002);
    }

    #[test]
    fn one_service_means_the_measured_pair() {
        let s = Scenario::build(1, &pods(), "w1", "w2").unwrap();
        assert_eq!(s.services.len(), 2);
        assert!(Scenario::build(20000, &pods(), "w1", "w2").is_err());
    }
}
