//! deploy/ checked against the code it deploys: every manifest parses into k8s-openapi types and
//! re-serialises to itself (no misspelt field silently ignored); the DaemonSet's command line and
//! ConfigMap parse with the agent's own `Cli`; the ClusterRole is exactly what
//! `source::kube::WATCHES` requests; the added capabilities are exactly `caps::REQUIRED`; the kind
//! cluster, its overlay and the example agree on names and ports; the Containerfile builds and
//! copies the binary the DaemonSet runs, with the workspace's pinned toolchains.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use nodeport_agent::{
    caps::REQUIRED,
    cli::{Cli, Command},
    source::kube::WATCHES,
};
use serde::Deserialize as _;
use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every object in deploy/, typed by its kind.
#[derive(Debug, Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
}

/// Deserialises `doc` as `T` and fails unless serialising it back gives the same document: a
/// field k8s-openapi does not know (a typo, a wrong level) would be dropped silently otherwise.
fn typed<T>(doc: &Value, what: &str) -> T
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let object: T =
        serde_yaml_ng::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let original = serde_json::to_value(doc).expect("YAML to JSON");
    let back = serde_json::to_value(&object).expect("object to JSON");
    assert_eq!(
        back, original,
        "{what}: fields lost or changed by k8s-openapi (unknown or misplaced field?)"
    );
    object
}

/// The YAML documents of a file.
fn documents(path: &Path) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&read(path))
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn parse_objects(path: &Path, into: &mut Objects) {
    for (i, doc) in documents(path).iter().enumerate() {
        let kind = doc["kind"].as_str().unwrap_or("");
        let what = format!("{} document {} ({kind})", path.display(), i + 1);
        match kind {
            "Namespace" => into.namespaces.push(typed(doc, &what)),
            "ServiceAccount" => into.service_accounts.push(typed(doc, &what)),
            "ClusterRole" => into.cluster_roles.push(typed(doc, &what)),
            "ClusterRoleBinding" => into.cluster_role_bindings.push(typed(doc, &what)),
            "ConfigMap" => into.config_maps.push(typed(doc, &what)),
            "DaemonSet" => into.daemon_sets.push(typed(doc, &what)),
            "Deployment" => into.deployments.push(typed(doc, &what)),
            "Service" => into.services.push(typed(doc, &what)),
            other => panic!("{what}: unexpected kind {other:?}"),
        }
    }
}

/// Every file under `dir`, recursively, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn kustomization(dir: &Path) -> Value {
    let docs = documents(&dir.join("kustomization.yaml"));
    assert_eq!(docs.len(), 1, "{}: one document", dir.display());
    let k = docs.into_iter().next().unwrap();
    assert_eq!(k["kind"].as_str(), Some("Kustomization"));
    k
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The files an overlay patches with, by path, and whether each is a JSON patch (has a target).
fn patches(k: &Value) -> Vec<(String, bool)> {
    k["patches"]
        .as_sequence()
        .map(|s| {
            s.iter()
                .map(|p| {
                    (
                        p["path"].as_str().expect("patch path").to_owned(),
                        !p["target"].is_null(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Parses every manifest: the base's resources and the kind overlay's strategic-merge patches and
/// example as Kubernetes objects, its JSON patches as patch operations, the kind cluster config as
/// YAML. Any other file in deploy/ must be one of the few known non-manifests.
fn all_objects() -> (Objects, Objects) {
    let (base, kind) = (deploy().join("base"), deploy().join("kind"));
    let mut known: BTreeSet<PathBuf> = BTreeSet::new();
    let mut objects = Objects::default();
    for r in strings(&kustomization(&base)["resources"]) {
        parse_objects(&base.join(&r), &mut objects);
        known.insert(base.join(r));
    }
    let mut overlay = Objects::default();
    let k = kustomization(&kind);
    for (p, json) in patches(&k) {
        let path = kind.join(&p);
        if json {
            for op in documents(&path) {
                let ops: Vec<JsonPatchOp> = serde_yaml_ng::from_value(op)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!ops.is_empty(), "{}: no operations", path.display());
            }
        } else {
            parse_objects(&path, &mut overlay);
        }
        known.insert(path);
    }
    for f in files(&kind.join("example")) {
        parse_objects(&f, &mut overlay);
        known.insert(f);
    }
    known.insert(deploy().join("kustomization.yaml"));
    known.insert(base.join("kustomization.yaml"));
    known.insert(kind.join("kustomization.yaml"));
    known.insert(kind.join("cluster.yaml"));
    known.insert(deploy().join("image/toolchains.sh"));
    for f in files(&deploy()) {
        assert!(
            known.contains(&f),
            "{} is in deploy/ but neither applied, patched, an example nor a known file",
            f.display()
        );
    }
    (objects, overlay)
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPatchOp {
    op: String,
    path: String,
    value: Option<serde_json::Value>,
}

fn daemon_set(o: &Objects) -> &DaemonSet {
    assert_eq!(o.daemon_sets.len(), 1, "one DaemonSet");
    &o.daemon_sets[0]
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(spec.containers.len(), 1, "one container");
    &spec.containers[0]
}

fn config_data(o: &Objects) -> BTreeMap<String, String> {
    assert_eq!(o.config_maps.len(), 1, "one ConfigMap");
    o.config_maps[0].data.clone().unwrap_or_default()
}

#[test]
fn every_manifest_parses_into_kubernetes_types() {
    let (base, overlay) = all_objects();
    assert_eq!(base.namespaces.len(), 1);
    assert_eq!(base.service_accounts.len(), 1);
    assert_eq!(base.cluster_roles.len(), 1);
    assert_eq!(base.cluster_role_bindings.len(), 1);
    assert_eq!(base.config_maps.len(), 1);
    assert_eq!(base.daemon_sets.len(), 1);
    assert_eq!(
        overlay.config_maps.len(),
        1,
        "the kind overlay's ConfigMap patch"
    );
    assert_eq!(overlay.deployments.len(), 1, "the example Deployment");
    assert_eq!(overlay.services.len(), 1, "the example Service");
    // Everything namespaced lives in the one namespace.
    let ns = base.namespaces[0].metadata.name.as_deref().unwrap();
    for m in base
        .service_accounts
        .iter()
        .map(|x| &x.metadata)
        .chain(base.config_maps.iter().map(|x| &x.metadata))
        .chain(base.daemon_sets.iter().map(|x| &x.metadata))
    {
        assert_eq!(m.namespace.as_deref(), Some(ns), "{:?}", m.name);
    }
}

#[test]
fn kustomizations_apply_every_manifest_once() {
    let base = deploy().join("base");
    let listed = strings(&kustomization(&base)["resources"]);
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "listed twice: {listed:?}");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<BTreeSet<_>>(),
        on_disk,
        "deploy/base/kustomization.yaml resources vs the files in deploy/base/"
    );
    // `kubectl apply -k deploy/` is the base; the kind overlay builds on the base and patches
    // only files that exist.
    assert_eq!(strings(&kustomization(&deploy())["resources"]), ["base"]);
    let kind = kustomization(&deploy().join("kind"));
    assert_eq!(strings(&kind["resources"]), ["../base"]);
    for (p, _) in patches(&kind) {
        assert!(deploy().join("kind").join(&p).is_file(), "{p}");
    }
}

/// kustomize refuses a kustomization whose resource directory contains the kustomization itself
/// ("cycle detected: candidate root … contains visited root …"), e.g. an overlay in deploy/kind/
/// naming deploy/ as its base.
#[test]
fn no_kustomization_lives_inside_one_of_its_bases() {
    for dir in [deploy(), deploy().join("base"), deploy().join("kind")] {
        let here = dir.canonicalize().unwrap();
        for r in strings(&kustomization(&dir)["resources"]) {
            let target = dir.join(&r).canonicalize().unwrap();
            if target.is_dir() {
                assert!(
                    !here.starts_with(&target),
                    "{}: resource {r} contains this kustomization",
                    dir.display()
                );
                assert!(target.join("kustomization.yaml").is_file(), "{r}");
            }
        }
    }
}

/// The agent's argv and environment as the kubelet builds them, turned into one argv: each
/// environment variable becomes the option that reads it, found through the Cli definition, so
/// an unknown key fails here.
fn agent_argv(container: &Container, data: &BTreeMap<String, String>) -> Vec<String> {
    let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
    argv.extend(container.args.clone().unwrap_or_default());
    assert!(!argv.is_empty(), "the container runs nothing");
    let cli = Cli::command();
    let sub = argv.get(1).expect("a subcommand").clone();
    let run = cli
        .find_subcommand(&sub)
        .unwrap_or_else(|| panic!("{sub:?} is not an agent subcommand"));
    let env_to_long: BTreeMap<String, String> = run
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_string_lossy().into_owned(),
                a.get_long()?.to_owned(),
            ))
        })
        .collect();
    // Read by libraries rather than the command line: the log filter (tracing-subscriber's
    // EnvFilter) and the in-cluster API address (kube-rs, as every Kubernetes client).
    let library_env = [
        "RUST_LOG",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
    ];
    let mut env: BTreeMap<String, String> = data.clone();
    for e in container.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().expect("a fieldRef");
                assert_eq!(field.field_path, "spec.nodeName", "{}", e.name);
                "nodeport-worker".to_owned()
            }
            other => panic!("{}: unexpected {other:?}", e.name),
        };
        env.insert(e.name.clone(), value);
    }
    for (key, value) in env {
        if library_env.contains(&key.as_str()) {
            continue;
        }
        let long = env_to_long
            .get(&key)
            .unwrap_or_else(|| panic!("{key} is not an environment variable of `agent {sub}`"));
        argv.push(format!("--{long}={value}"));
    }
    argv
}

fn merged(base: &Objects, overlay: &Objects) -> BTreeMap<String, String> {
    let mut data = config_data(base);
    data.extend(config_data(overlay));
    data
}

#[test]
fn daemonset_command_line_parses_with_the_agents_cli() {
    let (base, overlay) = all_objects();
    let container = agent_container(daemon_set(&base));
    let binary = Path::new(env!("CARGO_BIN_EXE_nodeport-agent"));
    for (name, data) in [
        ("deploy/", config_data(&base)),
        ("deploy/kind/", merged(&base, &overlay)),
    ] {
        let argv = agent_argv(container, &data);
        assert_eq!(
            Path::new(&argv[0]).file_name(),
            binary.file_name(),
            "{name}: the command is the agent binary"
        );
        let cli = Cli::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{name}: {argv:?} does not parse:\n{e}"));
        let Command::Run(run) = cli.command else {
            panic!("{name}: not `run`")
        };
        assert_eq!(run.node_name, "nodeport-worker");
        assert!(run.manifests.is_none(), "{name}: the API, not a directory");
        // The healthz port the agent binds is the one the probes and hostPort name.
        let port = container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("healthz"))
            .expect("a port named healthz");
        assert_eq!(
            port.container_port,
            i32::from(run.healthz_bind_address.port())
        );
        assert_eq!(port.host_port, Some(port.container_port));
        // The pins go to the host's bpffs, mounted into the pod.
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "bpffs")
            .expect("the bpffs mount");
        assert!(
            run.pin.pin_root.starts_with(&mount.mount_path),
            "{name}: pin root {} outside {}",
            run.pin.pin_root.display(),
            mount.mount_path
        );
        // Socket load balancing attaches to the host's cgroup v2 root, mounted into the pod.
        let cgroup = run.cgroup.as_ref().expect("NODEPORT_CGROUP is set");
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| Path::new(&m.mount_path) == cgroup)
            .unwrap_or_else(|| panic!("{name}: nothing mounted at {}", cgroup.display()));
        let pod = daemon_set(&base)
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .expect("the cgroup volume");
        assert_eq!(volume.host_path.as_ref().unwrap().path, "/sys/fs/cgroup");
    }
    // The kind overlay points the API client at the kind control plane.
    let data = config_data(&overlay);
    let cluster = kind_cluster();
    assert_eq!(
        data.get("KUBERNETES_SERVICE_HOST").map(String::as_str),
        Some(format!("{}-control-plane", cluster["name"].as_str().unwrap()).as_str())
    );
}

#[tokio::test]
async fn probes_hit_paths_the_agent_serves() {
    let (base, _) = all_objects();
    let container = agent_container(daemon_set(&base));
    let health = nodeport_agent::http::HealthState::new(Duration::from_secs(30));
    let metrics = Arc::new(nodeport_agent::metrics::Metrics::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(nodeport_agent::http::serve_health_and_metrics_on(
        listener, health, metrics,
    ));
    for (what, probe) in [
        ("liveness", &container.liveness_probe),
        ("readiness", &container.readiness_probe),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what}: an httpGet probe"));
        assert_eq!(get.port, IntOrString::String("healthz".into()), "{what}");
        let path = get.path.as_deref().expect("a path");
        let status = http_status(addr, path).await;
        assert_eq!(status, 200, "{what} probe {path}");
    }
    assert_eq!(
        http_status(addr, "/no-such-path").await,
        404,
        "the server answers 404 to unknown paths, so the 200s above are real routes"
    );
    server.abort();
}

async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {out:?}"))
}

#[test]
fn cluster_role_grants_exactly_what_the_watchers_request() {
    let (base, _) = all_objects();
    let role = &base.cluster_roles[0];
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none(), "no resourceNames: {rule:?}");
        assert!(rule.non_resource_urls.is_none(), "no URLs: {rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "{rule:?}");
                    assert!(!granted.contains(&(group.clone(), resource.clone(), verb.clone())));
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let needed: BTreeSet<(String, String, String)> = WATCHES
        .iter()
        .flat_map(|w| {
            w.verbs
                .iter()
                .map(|v| (w.group.to_owned(), w.resource.to_owned(), (*v).to_owned()))
        })
        .collect();
    assert_eq!(granted, needed);

    // Bound to the DaemonSet's service account, in its namespace.
    let ds = daemon_set(&base);
    let binding = &base.cluster_role_bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let sa = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .service_account_name
        .clone()
        .expect("serviceAccountName");
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, sa);
    assert_eq!(subjects[0].namespace, ds.metadata.namespace);
    assert_eq!(
        Some(&sa),
        base.service_accounts[0].metadata.name.as_ref(),
        "the service account exists"
    );
}

#[test]
fn daemonset_has_exactly_the_required_capabilities_and_runs_on_every_node() {
    let (base, _) = all_objects();
    let ds = daemon_set(&base);
    let container = agent_container(ds);
    let sc = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
    let required: BTreeSet<String> = REQUIRED.iter().map(|r| r.kubernetes_name()).collect();
    assert_eq!(
        added, required,
        "securityContext.capabilities.add vs caps::REQUIRED"
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "a toleration of every taint: {tolerations:?}"
    );
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .expect("a rolling update");
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)), "no surge");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));

    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "bpffs")
        .expect("the bpffs volume");
    assert_eq!(volume.host_path.as_ref().unwrap().path, "/sys/fs/bpf");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "bpffs")
        .unwrap();
    // Bidirectional would need privileged; see daemonset.yaml.
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(mount.mount_path, "/sys/fs/bpf");

    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|f| f.field_ref.as_ref())
        .expect("NODE_NAME from the downward API");
    assert_eq!(node_name.field_path, "spec.nodeName");
    assert!(container.resources.is_some(), "resources set");
}

fn kind_cluster() -> Value {
    let docs = documents(&deploy().join("kind/cluster.yaml"));
    assert_eq!(docs.len(), 1);
    docs.into_iter().next().unwrap()
}

#[test]
fn kind_cluster_has_no_kube_proxy_and_maps_the_examples_node_port_on_every_node() {
    let cluster = kind_cluster();
    assert_eq!(cluster["kind"].as_str(), Some("Cluster"));
    assert_eq!(
        cluster["apiVersion"].as_str(),
        Some("kind.x-k8s.io/v1alpha4")
    );
    assert_eq!(
        cluster["networking"]["kubeProxyMode"].as_str(),
        Some("none")
    );
    let nodes = cluster["nodes"].as_sequence().expect("nodes");
    let roles: Vec<&str> = nodes.iter().map(|n| n["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["control-plane", "worker", "worker", "worker"]);

    let (_, overlay) = all_objects();
    let service = &overlay.services[0];
    let spec = service.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    let node_ports: Vec<i32> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| p.node_port.expect("a fixed nodePort"))
        .collect();
    assert!(!node_ports.is_empty());
    let mut host_ports = BTreeSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let mappings = node["extraPortMappings"]
            .as_sequence()
            .unwrap_or_else(|| panic!("node {i}: extraPortMappings"));
        for np in &node_ports {
            let m = mappings
                .iter()
                .find(|m| m["containerPort"].as_i64() == Some(i64::from(*np)))
                .unwrap_or_else(|| panic!("node {i} ({}) does not map nodePort {np}", roles[i]));
            assert_eq!(m["protocol"].as_str(), Some("TCP"));
            assert!(
                host_ports.insert(m["hostPort"].as_i64().unwrap()),
                "hostPort reused"
            );
        }
    }
    // The example's pods match its Service and serve its targetPort.
    let deployment = &overlay.deployments[0];
    let labels = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone();
    for (k, v) in spec.selector.iter().flatten() {
        assert_eq!(
            labels.as_ref().and_then(|l| l.get(k)),
            Some(v),
            "selector {k}"
        );
    }
    let container_ports: Vec<i32> = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    for p in spec.ports.iter().flatten() {
        let IntOrString::Int(target) = p.target_port.clone().expect("targetPort") else {
            panic!("numeric targetPort")
        };
        assert!(container_ports.contains(&target), "{target} not served");
    }
}

#[test]
fn containerfile_builds_and_copies_the_binary_the_daemonset_runs() {
    let file = read(&repo().join("Containerfile"));
    let binary = Path::new(env!("CARGO_BIN_EXE_nodeport-agent"))
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        file.contains(&format!("cargo build --release --locked -p {binary}")),
        "builds the agent package"
    );
    let copy = file
        .lines()
        .find(|l| l.starts_with("COPY --from=builder"))
        .expect("a COPY from the builder");
    let parts: Vec<&str> = copy.split_whitespace().collect();
    let (from, to) = (parts[2], parts[3]);
    assert!(from.ends_with(&format!("/{binary}")), "{copy}");
    assert!(
        file.contains(&format!("target/release/{binary} {from}")),
        "the copied file is the release binary"
    );
    let (base, _) = all_objects();
    let command = agent_container(daemon_set(&base)).command.clone().unwrap();
    assert_eq!(command[0], to, "the DaemonSet runs what the image holds");
    assert!(file.contains(&format!("ENTRYPOINT [\"{to}\"]")));

    // The toolchains come from the pin files through deploy/image/toolchains.sh: no version is
    // written in the Containerfile, and the script reads the pins setup.sh reads.
    let out = std::process::Command::new("bash")
        .arg(deploy().join("image/toolchains.sh"))
        .arg("--print-pins")
        .arg(repo())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pins: BTreeMap<String, String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let stable = read(&repo().join("rust-toolchain.toml"))
        .lines()
        .find_map(|l| {
            l.trim().strip_prefix("channel").map(|r| {
                r.trim_start_matches([' ', '='])
                    .trim()
                    .trim_matches('"')
                    .to_owned()
            })
        })
        .expect("rust-toolchain.toml channel");
    let nightly = read(&repo().join("ebpf-toolchain")).trim().to_owned();
    let linker = read(&repo().join("scripts/setup.sh"))
        .lines()
        .find_map(|l| l.strip_prefix("BPF_LINKER_VERSION=").map(str::to_owned))
        .expect("setup.sh BPF_LINKER_VERSION");
    assert_eq!(pins["stable"], stable);
    assert_eq!(pins["nightly"], nightly);
    assert_eq!(pins["bpf-linker"], linker);
    for pin in [&stable, &nightly, &linker] {
        assert!(
            !file.contains(pin.as_str()),
            "the Containerfile repeats {pin}"
        );
    }
    assert!(file.contains("RUN bash deploy/image/toolchains.sh"));
    for copied in ["rust-toolchain.toml", "ebpf-toolchain", "scripts/setup.sh"] {
        assert!(file.contains(copied), "the builder reads {copied}");
    }

    let ignore = read(&repo().join(".dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        ".dockerignore excludes target/"
    );
}

/// The kind overlay's JSON patches change fields the base DaemonSet has (a `replace` of a missing
/// path fails at `kubectl apply -k` time), and the patched DaemonSet is still a DaemonSet.
#[test]
fn kind_json_patches_apply_to_the_base_daemonset() {
    let kind = deploy().join("kind");
    let ds_path = deploy().join("base/daemonset.yaml");
    let mut ds = serde_json::to_value(&documents(&ds_path)[0]).unwrap();
    let mut applied = 0;
    for p in kustomization(&kind)["patches"].as_sequence().unwrap() {
        if p["target"].is_null() {
            continue;
        }
        assert_eq!(p["target"]["kind"].as_str(), Some("DaemonSet"), "{p:?}");
        let path = kind.join(p["path"].as_str().unwrap());
        for doc in documents(&path) {
            let ops: Vec<JsonPatchOp> = serde_yaml_ng::from_value(doc).unwrap();
            for op in ops {
                assert_eq!(op.op, "replace", "{}: only replace is used", path.display());
                let field = ds.pointer_mut(&op.path).unwrap_or_else(|| {
                    panic!(
                        "{}: {} not in {}",
                        path.display(),
                        op.path,
                        ds_path.display()
                    )
                });
                let value = op.value.expect("a value");
                assert_ne!(
                    *field,
                    value,
                    "{}: {} is already {value}",
                    path.display(),
                    op.path
                );
                *field = value;
                applied += 1;
            }
        }
    }
    assert!(applied > 0, "the overlay patches the DaemonSet");
    let patched: DaemonSet = serde_json::from_value(ds).expect("still a DaemonSet");
    let pod = patched.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.dns_policy.as_deref(),
        Some("Default"),
        "kind: the node's resolver"
    );
}
