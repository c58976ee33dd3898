//! The lab's control plane as pure functions: workloads read from Kubernetes YAML (apps/v1
//! Deployments, v1 Services), pod placement (the scheduler's filters: nodeName, nodeSelector, the
//! control-plane taint), and the EndpointSlices the EndpointSlice controller would write for the
//! pods a Service selects.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use anyhow::{Context as _, bail};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Node, ObjectReference, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{Deserialize, Serialize};

/// The control-plane taint kind (kubeadm) puts on its control-plane node.
pub const CONTROL_PLANE_TAINT: &str = "node-role.kubernetes.io/control-plane";
/// Node label with the node's name without the lab's prefix ("control-plane", "worker",
/// "worker2", …), so workloads can pin pods to a node whatever the prefix.
pub const LABEL_LAB_NODE: &str = "nodeport-lab/node";
/// Label carrying an EndpointSlice's service name.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Deployments and Services from a directory of YAML files.
#[derive(Clone, Debug, Default)]
pub struct Workloads {
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (multi-document); other kinds are ignored.
pub fn load_dir(dir: &Path) -> anyhow::Result<Workloads> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading workloads from {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Workloads::default();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        parse_into(&text, &mut out).with_context(|| format!("in {}", file.display()))?;
    }
    Ok(out)
}

/// Parses multi-document YAML into `out`.
pub fn parse_into(text: &str, out: &mut Workloads) -> anyhow::Result<()> {
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc)
            .with_context(|| format!("document {}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value).with_context(|| format!("document {}", i + 1))?;
        let kind = json["kind"].as_str().unwrap_or_default().to_owned();
        let what = || format!("document {} ({kind})", i + 1);
        match kind.as_str() {
            "Deployment" => out
                .deployments
                .push(serde_json::from_value(json).with_context(what)?),
            "Service" => out
                .services
                .push(serde_json::from_value(json).with_context(what)?),
            _ => {}
        }
    }
    Ok(())
}

/// A lab node, kind style: `<prefix>-control-plane`, `<prefix>-worker`, `<prefix>-worker2`, …
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// 0 for the control plane; its pod CIDR is 10.244.<index>.0/24.
    pub index: u8,
    pub addr: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    /// Tainted `node-role.kubernetes.io/control-plane:NoSchedule`, as kind's control plane.
    pub control_plane: bool,
}

impl NodeInfo {
    pub fn new(name: String, index: u8, addr: Ipv4Addr) -> Self {
        let control_plane = index == 0;
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_owned(), name.clone()),
            ("kubernetes.io/os".to_owned(), "linux".to_owned()),
            (
                "kubernetes.io/arch".to_owned(),
                std::env::consts::ARCH.to_owned(),
            ),
        ]);
        let short = match index {
            0 => "control-plane".to_owned(),
            1 => "worker".to_owned(),
            n => format!("worker{n}"),
        };
        labels.insert(LABEL_LAB_NODE.to_owned(), short);
        if control_plane {
            labels.insert(CONTROL_PLANE_TAINT.to_owned(), String::new());
        }
        Self {
            name,
            index,
            addr,
            labels,
            control_plane,
        }
    }

    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }

    /// The node side of every pod veth (kindnet's ptp plugin).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index, 1)
    }

    /// The Node object the agents read: InternalIP, labels, podCIDR, taints.
    pub fn manifest(&self) -> Node {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels},
            "spec": {"podCIDR": self.pod_cidr(), "podCIDRs": [self.pod_cidr()]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": self.addr.to_string()},
                {"type": "Hostname", "address": self.name},
            ]},
        }))
        .expect("a valid Node");
        if self.control_plane {
            node.spec.get_or_insert_default().taints = Some(vec![
                serde_json::from_value(
                    serde_json::json!({"key": CONTROL_PLANE_TAINT, "effect": "NoSchedule"}),
                )
                .expect("a valid Taint"),
            ]);
        }
        node
    }
}

/// A container port of a pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodPort {
    pub name: Option<String>,
    pub port: u16,
    /// "TCP" or "UDP".
    pub protocol: String,
}

/// A running (or terminating) pod of the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub deployment: String,
    pub template_hash: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PodPort>,
    /// The node-side veth.
    pub host_if: String,
    /// Creation order: the newest pods go first on scale-down, like the ReplicaSet controller.
    pub seq: u64,
    /// Being deleted: in its slices as ready=false, serving=true, terminating=true.
    #[serde(default)]
    pub terminating: bool,
}

/// What a Deployment asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub namespace: String,
    pub deployment: String,
    pub replicas: usize,
    /// `pod-template-hash`: pods of another template are replaced.
    pub hash: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PodPort>,
    pub node_name: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerates_control_plane: bool,
}

impl Template {
    pub fn from_deployment(d: &Deployment) -> anyhow::Result<Self> {
        let name = d
            .metadata
            .name
            .clone()
            .context("a Deployment without a name")?;
        let namespace = d
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let what = || format!("Deployment {namespace}/{name}");
        let spec = d
            .spec
            .as_ref()
            .with_context(|| format!("{}: no spec", what()))?;
        let labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        if spec.selector.match_expressions.is_some() {
            bail!(
                "{}: selector.matchExpressions is not supported by the lab",
                what()
            );
        }
        let selector = spec.selector.match_labels.clone().unwrap_or_default();
        if selector.is_empty() || !matches(&selector, &labels) {
            bail!(
                "{}: selector {selector:?} does not match the template's labels {labels:?} (the apiserver refuses this)",
                what()
            );
        }
        let pod = spec.template.spec.clone().unwrap_or_default();
        let mut ports = Vec::new();
        for c in &pod.containers {
            for p in c.ports.iter().flatten() {
                ports.push(PodPort {
                    name: p.name.clone(),
                    port: u16::try_from(p.container_port)
                        .ok()
                        .filter(|p| *p > 0)
                        .with_context(|| {
                            format!("{}: containerPort {}", what(), p.container_port)
                        })?,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                });
            }
        }
        if let Some(p) = ports
            .iter()
            .find(|p| p.protocol != "TCP" && p.protocol != "UDP")
        {
            bail!(
                "{}: protocol {} (the lab serves TCP and UDP)",
                what(),
                p.protocol
            );
        }
        if ports.is_empty() {
            // The echo server must listen somewhere: 8080/TCP, documented in lab/README.
            ports.push(PodPort {
                name: None,
                port: 8080,
                protocol: "TCP".into(),
            });
        }
        let tolerates_control_plane = pod.tolerations.iter().flatten().any(|t| {
            let key_ok = match t.key.as_deref() {
                None | Some("") => t.operator.as_deref() == Some("Exists"),
                Some(k) => k == CONTROL_PLANE_TAINT,
            };
            key_ok
                && t.effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == "NoSchedule")
        });
        let template_json = serde_json::to_string(&spec.template).unwrap_or_default();
        Ok(Self {
            replicas: spec.replicas.unwrap_or(1).max(0) as usize,
            hash: short_hash(&template_json, 10),
            labels,
            ports,
            node_name: pod.node_name.clone(),
            node_selector: pod.node_selector.clone().unwrap_or_default(),
            tolerates_control_plane,
            namespace,
            deployment: name,
        })
    }

    /// The scheduler's filters that matter here. `nodeName` bypasses the scheduler (and taints).
    pub fn fits(&self, node: &NodeInfo) -> bool {
        if let Some(name) = &self.node_name {
            return *name == node.name;
        }
        matches(&self.node_selector, &node.labels)
            && (!node.control_plane || self.tolerates_control_plane)
    }
}

/// Every `selector` label is in `labels` with the same value.
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// FNV-1a, encoded in Kubernetes' "safe" alphabet (no vowels, no look-alike digits).
pub fn short_hash(text: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..len)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            if h == 0 {
                h = 0x9e37_79b9_7f4a_7c15;
            }
            c
        })
        .collect()
}

fn svc_key(s: &Service) -> (String, String) {
    (
        s.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        s.metadata.name.clone().unwrap_or_default(),
    )
}

/// The Services as the apiserver would store them: namespace `default` when absent, a cluster IP
/// (10.96.0.0/16, in file order) and a nodePort (the lowest free one from 30000) where missing on
/// NodePort and LoadBalancer services, and a creation timestamp.
pub fn normalize_services(services: &[Service]) -> anyhow::Result<Vec<Service>> {
    let mut used: BTreeSet<i32> = services
        .iter()
        .flat_map(|s| s.spec.iter().flat_map(|sp| sp.ports.iter().flatten()))
        .filter_map(|p| p.node_port)
        .collect();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, s) in services.iter().enumerate() {
        let mut s = s.clone();
        let (ns, name) = svc_key(&s);
        if name.is_empty() {
            bail!("a Service without a name");
        }
        if !seen.insert((ns.clone(), name.clone())) {
            bail!("Service {ns}/{name} is defined twice");
        }
        s.metadata.namespace = Some(ns);
        if s.metadata.creation_timestamp.is_none() {
            s.metadata.creation_timestamp = Some(serde_json::from_value(serde_json::json!(
                "2026-01-01T00:00:00Z"
            ))?);
        }
        let spec = s.spec.get_or_insert_default();
        if spec.cluster_ip.is_none() {
            let ip = Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 10) as u8).to_string();
            spec.cluster_ip = Some(ip.clone());
            spec.cluster_ips = Some(vec![ip]);
        }
        let wants_node_port = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        for p in spec.ports.iter_mut().flatten() {
            if p.protocol.is_none() {
                p.protocol = Some("TCP".into());
            }
            if wants_node_port && p.node_port.is_none() {
                let free = (30000..=32767)
                    .find(|n| !used.contains(n))
                    .context("no free nodePort")?;
                used.insert(free);
                p.node_port = Some(free);
            }
        }
        out.push(s);
    }
    Ok(out)
}

/// One endpoint of a service port, as kube-proxy would see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    pub pod: String,
    pub node: String,
    pub addr: String,
    pub ready: bool,
    pub serving: bool,
}

/// The pod's port for a service port (`targetPort`: a number, a container port name, or absent =
/// `port`), or None if the pod has no such named port.
fn target_port(sp: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<u16> {
    let proto = sp.protocol.as_deref().unwrap_or("TCP");
    match &sp.target_port {
        None => u16::try_from(sp.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => pod
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name) && p.protocol == proto)
            .map(|p| p.port),
    }
}

/// The pods a Service selects (none for a Service without a selector).
pub fn selected<'a>(svc: &Service, pods: &'a [Pod]) -> Vec<&'a Pod> {
    let (ns, _) = svc_key(svc);
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    if selector.is_empty() {
        return Vec::new();
    }
    pods.iter()
        .filter(|p| p.namespace == ns && matches(&selector, &p.labels))
        .collect()
}

/// The EndpointSlices the EndpointSlice controller writes for `svc`: its selected pods grouped by
/// their resolved ports (one slice per group), each endpoint with its address, node, target pod
/// and conditions; a Service whose selector matches nothing gets one slice with no endpoints.
/// A Service without a selector gets none (its slices would be someone else's).
pub fn endpoint_slices(svc: &Service, pods: &[Pod]) -> Vec<EndpointSlice> {
    let (ns, name) = svc_key(svc);
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    if spec.selector.as_ref().is_none_or(|s| s.is_empty()) {
        return Vec::new();
    }
    let service_ports = spec.ports.clone().unwrap_or_default();
    let mut groups: BTreeMap<Vec<(String, u16, String)>, Vec<&Pod>> = BTreeMap::new();
    for pod in selected(svc, pods) {
        let ports: Vec<(String, u16, String)> = service_ports
            .iter()
            .filter_map(|sp| {
                Some((
                    sp.name.clone().unwrap_or_default(),
                    target_port(sp, pod)?,
                    sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                ))
            })
            .collect();
        if !ports.is_empty() {
            groups.entry(ports).or_default().push(pod);
        }
    }
    let meta = |suffix: &str| ObjectMeta {
        name: Some(format!(
            "{name}-{}",
            short_hash(&format!("{ns}/{name}/{suffix}"), 5)
        )),
        namespace: Some(ns.clone()),
        labels: Some(BTreeMap::from([
            (LABEL_SERVICE_NAME.to_owned(), name.clone()),
            (
                "endpointslice.kubernetes.io/managed-by".to_owned(),
                "endpointslice-controller.k8s.io".to_owned(),
            ),
        ])),
        ..Default::default()
    };
    if groups.is_empty() {
        return vec![EndpointSlice {
            metadata: meta(""),
            address_type: "IPv4".into(),
            endpoints: Vec::new(),
            ports: None,
        }];
    }
    groups
        .into_iter()
        .map(|(ports, pods)| EndpointSlice {
            metadata: meta(&format!("{ports:?}")),
            address_type: "IPv4".into(),
            endpoints: pods
                .iter()
                .map(|p| Endpoint {
                    addresses: vec![p.ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(!p.terminating),
                        serving: Some(true),
                        terminating: Some(p.terminating),
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
            ports: Some(
                ports
                    .into_iter()
                    .map(|(name, port, protocol)| EndpointPort {
                        name: Some(name),
                        port: Some(i32::from(port)),
                        protocol: Some(protocol),
                        ..Default::default()
                    })
                    .collect(),
            ),
        })
        .collect()
}

/// A frontend: (nodePort, "TCP"/"UDP").
pub type Frontend = (u16, String);

/// What a node's agent should balance each frontend over, with kube-proxy's rules: ready
/// endpoints, else serving-terminating ones; with `externalTrafficPolicy: Local` only those on
/// the node (chosen the same way among them). Addresses are `ip:port`.
pub fn expected_backends(
    services: &[Service],
    pods: &[Pod],
    node: &str,
) -> BTreeMap<Frontend, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        if !matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")) {
            continue;
        }
        let local_only = spec.external_traffic_policy.as_deref() == Some("Local");
        let chosen = selected(svc, pods);
        for sp in spec.ports.iter().flatten() {
            let Some(node_port) = sp.node_port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            let eps: Vec<(String, bool, bool)> = chosen
                .iter()
                .filter_map(|p| {
                    Some((
                        format!("{}:{}", p.ip, target_port(sp, p)?),
                        p.node == node,
                        !p.terminating,
                    ))
                })
                .collect();
            let pick = |local: bool| -> BTreeSet<String> {
                let set: Vec<_> = eps.iter().filter(|e| !local || e.1).collect();
                let ready: BTreeSet<String> =
                    set.iter().filter(|e| e.2).map(|e| e.0.clone()).collect();
                if ready.is_empty() {
                    set.iter().map(|e| e.0.clone()).collect()
                } else {
                    ready
                }
            };
            let proto = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
            out.insert((node_port, proto), pick(local_only));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, tier: front}}
    spec:
      containers:
      - name: web
        image: x
        ports: [{containerPort: 9898, name: http}, {containerPort: 5353, protocol: UDP, name: dns}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 31000}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    fn pod(name: &str, node: &str, ip: [u8; 4], terminating: bool) -> Pod {
        let mut w = Workloads::default();
        parse_into(YAML, &mut w).unwrap();
        let t = Template::from_deployment(&w.deployments[0]).unwrap();
        Pod {
            name: name.into(),
            namespace: "default".into(),
            deployment: "web".into(),
            template_hash: t.hash,
            node: node.into(),
            ip: ip.into(),
            labels: t.labels,
            ports: t.ports,
            host_if: "veth0".into(),
            seq: 0,
            terminating,
        }
    }

    #[test]
    fn workloads_parse_and_services_get_defaults() {
        let mut w = Workloads::default();
        parse_into(YAML, &mut w).unwrap();
        assert_eq!((w.deployments.len(), w.services.len()), (1, 1));
        let t = Template::from_deployment(&w.deployments[0]).unwrap();
        assert_eq!(t.replicas, 2);
        assert_eq!(t.ports.len(), 2);
        let s = normalize_services(&w.services).unwrap();
        let spec = s[0].spec.as_ref().unwrap();
        assert_eq!(s[0].metadata.namespace.as_deref(), Some("default"));
        assert!(spec.cluster_ip.is_some());
        let ports = spec.ports.as_ref().unwrap();
        assert_eq!(
            ports[1].node_port,
            Some(30000),
            "a free nodePort is allocated"
        );
        assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
    }

    #[test]
    fn placement_follows_node_name_selector_and_taint() {
        let mut w = Workloads::default();
        parse_into(YAML, &mut w).unwrap();
        let mut t = Template::from_deployment(&w.deployments[0]).unwrap();
        let cp = NodeInfo::new("l-control-plane".into(), 0, [198, 18, 0, 2].into());
        let w1 = NodeInfo::new("l-worker".into(), 1, [198, 18, 0, 3].into());
        assert!(!t.fits(&cp) && t.fits(&w1), "the control plane is tainted");
        t.node_selector
            .insert("kubernetes.io/hostname".into(), "l-worker2".into());
        assert!(!t.fits(&w1));
        t.node_name = Some("l-control-plane".into());
        assert!(t.fits(&cp), "nodeName bypasses the scheduler");
    }

    #[test]
    fn slices_resolve_named_ports_and_mark_terminating_pods() {
        let mut w = Workloads::default();
        parse_into(YAML, &mut w).unwrap();
        let svcs = normalize_services(&w.services).unwrap();
        let pods = vec![
            pod("a", "n1", [10, 244, 1, 2], false),
            pod("b", "n2", [10, 244, 2, 2], true),
        ];
        let slices = endpoint_slices(&svcs[0], &pods);
        assert_eq!(slices.len(), 1);
        let ports = slices[0].ports.as_ref().unwrap();
        assert_eq!(ports[0].port, Some(9898));
        assert_eq!(ports[1].port, Some(5353));
        let conds = slices[0].endpoints[1].conditions.as_ref().unwrap();
        assert_eq!(
            (conds.ready, conds.serving, conds.terminating),
            (Some(false), Some(true), Some(true))
        );
        let exp = expected_backends(&svcs, &pods, "n1");
        assert_eq!(
            exp[&(31000, "TCP".into())],
            BTreeSet::from(["10.244.1.2:9898".to_owned()]),
            "terminating endpoints are only used when nothing is ready"
        );
        // A selector that matches nothing: one empty slice, no backends.
        let mut bad = svcs[0].clone();
        bad.spec.as_mut().unwrap().selector =
            Some(BTreeMap::from([("app".into(), "nothing".into())]));
        let slices = endpoint_slices(&bad, &pods);
        assert_eq!(slices.len(), 1);
        assert!(slices[0].endpoints.is_empty());
        assert!(expected_backends(&[bad], &pods, "n1")[&(31000, "TCP".into())].is_empty());
    }

    #[test]
    fn hashes_are_stable_and_safe() {
        assert_eq!(short_hash("x", 10), short_hash("x", 10));
        assert_ne!(short_hash("x", 10), short_hash("y", 10));
        assert!(
            short_hash("x", 10)
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        );
    }
}
