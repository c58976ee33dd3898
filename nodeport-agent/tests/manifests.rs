//! The manifests source: loading a directory of multi-document YAML, and following its changes.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use nodeport_agent::{
    model::{ClusterState, Kind, ObjKey, Resource, SourceEvent},
    source::manifests::{self, Problem},
};
use tokio::sync::mpsc;

/// A fresh directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nodeport-manifests-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn service(node_port: u16) -> String {
    format!(
        "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - name: http
    protocol: TCP
    port: 80
    targetPort: 8080
    nodePort: {node_port}
"
    )
}

const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: 8080
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
  nodeName: node-a
";

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
";

/// A YAML syntax error (unclosed flow sequence).
const MALFORMED: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: broken
spec:
  ports: [{port: 80
";

const OTHER_NS_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: after-the-bad-one
  namespace: shop
spec:
  type: NodePort
  ports: [{port: 443, nodePort: 30443}]
";

/// Well-formed YAML, but not a Service (ports must be a list).
const WRONG_TYPE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: wrong
spec:
  ports: 80
";

const NODE: &str = "\
apiVersion: v1
kind: Node
metadata:
  name: node-a
  namespace: ignored-for-nodes
status:
  addresses:
  - {type: InternalIP, address: 192.168.1.10}
";

const LIST_JSON: &str = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {"apiVersion": "v1", "kind": "Service",
     "metadata": {"name": "from-list", "namespace": "tools"},
     "spec": {"type": "NodePort", "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30053}]}}
  ]
}
"#;

/// The `web` Service, its slice, a Deployment, a malformed document, then another Service; the
/// file starts with a comment and a `---`.
fn web_file(node_port: u16) -> String {
    format!(
        "# the web app\n---\n{}---\n{SLICE}---\n{DEPLOYMENT}---\n{MALFORMED}---\n{OTHER_NS_SERVICE}",
        service(node_port)
    )
}

fn keys(resources: &[Resource]) -> Vec<(Kind, String)> {
    resources
        .iter()
        .map(|r| (r.kind(), r.key().to_string()))
        .collect()
}

#[test]
fn load_dir_reads_every_document_and_reports_bad_ones() {
    let dir = TempDir::new();
    let web = dir.write("10-web.yaml", &web_file(30080));
    let node = dir.write("20-node.yml", NODE);
    dir.write("30-list.json", LIST_JSON);
    let wrong = dir.write("40-wrong.yaml", WRONG_TYPE);
    // Neither of these is read.
    dir.write("notes.txt", "kind: Service\n");
    dir.write(".hidden.yaml", &service(1));
    fs::create_dir(dir.path().join("sub.yaml")).unwrap();

    let (resources, problems) = manifests::load_dir(dir.path());
    assert_eq!(
        keys(&resources),
        [
            (Kind::Service, "default/web".to_owned()),
            (Kind::EndpointSlice, "default/web-abc12".to_owned()),
            (Kind::Service, "shop/after-the-bad-one".to_owned()),
            (Kind::Node, "node-a".to_owned()),
            (Kind::Service, "tools/from-list".to_owned()),
        ]
    );
    // Namespaces: defaulted for namespaced kinds, cleared on Nodes.
    let Resource::Service(web_svc) = &resources[0] else {
        panic!()
    };
    assert_eq!(web_svc.metadata.namespace.as_deref(), Some("default"));
    let ports = web_svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
    assert_eq!(ports[0].node_port, Some(30080));
    let Resource::Node(n) = &resources[3] else {
        panic!()
    };
    assert_eq!(n.metadata.namespace, None);
    assert_eq!(resources[3].key(), ObjKey::new("", "node-a"));

    // The comment before the first `---` is document 1, so the malformed one is document 5; it
    // starts on the line of its `---`.
    let web_lines = web_file(30080);
    let malformed_line = web_lines
        .lines()
        .position(|l| l == "  name: broken")
        .unwrap()
        + 1
        - 4;
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert_eq!(problems[0].file, web);
    assert_eq!(problems[0].document, Some(5));
    assert_eq!(problems[0].line, malformed_line);
    // Positions in the error are the file's: the flow mapping opens on the `ports:` line.
    assert!(
        problems[0].error.contains(&format!(
            "while parsing a flow mapping at line {} column 11",
            malformed_line + 6
        )),
        "{}",
        problems[0]
    );
    assert_eq!(problems[1].file, wrong);
    assert_eq!(problems[1].document, Some(1));
    assert!(
        problems[1].error.contains("invalid type"),
        "{}",
        problems[1]
    );
    assert!(
        problems[1]
            .to_string()
            .starts_with(&format!("{}, document 1 (from line 1): ", wrong.display())),
        "{}",
        problems[1]
    );
    let _ = node;
}

#[test]
fn lists_from_the_api_duplicates_and_objects_without_names() {
    // A ServiceList as the API returns it: the items carry no apiVersion or kind.
    let text = r#"
apiVersion: v1
kind: ServiceList
metadata: {resourceVersion: "7"}
items:
- metadata: {name: a, namespace: x}
  spec: {ports: [{port: 1}]}
- metadata: {name: a, namespace: x}
  spec: {ports: [{port: 2}]}
---
apiVersion: v1
kind: Node
metadata: {}
---
just a string
"#;
    let (resources, problems) = manifests::parse(Path::new("list.yaml"), text);
    assert_eq!(
        keys(&resources),
        [
            (Kind::Service, "x/a".to_owned()),
            (Kind::Service, "x/a".to_owned())
        ]
    );
    let errors: Vec<_> = problems
        .iter()
        .map(|p| (p.document, p.error.as_str()))
        .collect();
    assert_eq!(errors.len(), 3, "{problems:#?}");
    assert_eq!(errors[0].0, Some(1));
    assert!(
        errors[0]
            .1
            .contains("also in list.yaml, document 1; this one wins")
    );
    assert_eq!(errors[1], (Some(2), "Node without metadata.name"));
    assert_eq!(errors[2].0, Some(3));
    assert!(errors[2].1.starts_with("not a Kubernetes object"));
}

#[test]
fn an_unreadable_directory_is_one_problem() {
    let dir = TempDir::new();
    let missing = dir.path().join("nope");
    let (resources, problems) = manifests::load_dir(&missing);
    assert!(resources.is_empty());
    assert_eq!(
        problems,
        [Problem {
            file: missing,
            document: None,
            line: 0,
            error: problems[0].error.clone(),
        }]
    );
}

async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no event within 10 s")
        .expect("source stopped")
}

/// Receives the three snapshots of one load, checks their order, applies them.
async fn snapshots(rx: &mut mpsc::Receiver<SourceEvent>, state: &mut ClusterState) {
    for kind in Kind::ALL {
        match next(rx).await {
            SourceEvent::Snapshot(k, objects) => {
                assert_eq!(k, kind);
                assert!(objects.iter().all(|o| o.kind() == kind));
                state.apply(SourceEvent::Snapshot(k, objects));
            }
            other => panic!("expected a {kind} snapshot, got {other:?}"),
        }
    }
}

fn node_port(state: &ClusterState, key: &ObjKey) -> Option<i32> {
    state.services.get(key)?.spec.as_ref()?.ports.as_ref()?[0].node_port
}

#[tokio::test]
async fn run_sends_snapshots_at_start_and_on_every_change() {
    let dir = TempDir::new();
    let (tx, mut rx) = mpsc::channel(16);
    let source = tokio::spawn(manifests::run(
        dir.path().to_owned(),
        tx,
        Duration::from_millis(20),
    ));
    let mut state = ClusterState::default();

    // An empty directory still yields all three snapshots: the pipeline is synced.
    snapshots(&mut rx, &mut state).await;
    assert!(state.synced(&Kind::ALL));
    assert!(state.services.is_empty() && state.slices.is_empty() && state.nodes.is_empty());

    let web_key = ObjKey::new("default", "web");
    dir.write("web.yaml", &web_file(30080));
    snapshots(&mut rx, &mut state).await;
    assert_eq!(node_port(&state, &web_key), Some(30080));
    assert_eq!(state.services.len(), 2);
    assert_eq!(state.slices.len(), 1);

    dir.write("node.yaml", NODE);
    snapshots(&mut rx, &mut state).await;
    assert_eq!(state.nodes.len(), 1);

    // Same size, new contents.
    dir.write("web.yaml", &web_file(30081));
    snapshots(&mut rx, &mut state).await;
    assert_eq!(node_port(&state, &web_key), Some(30081));

    // Nothing changes: nothing is sent.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err()
    );

    fs::remove_file(dir.path().join("web.yaml")).unwrap();
    snapshots(&mut rx, &mut state).await;
    assert!(state.services.is_empty());
    assert!(state.slices.is_empty());
    assert_eq!(state.nodes.len(), 1);

    // Dropping the receiver stops the source.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), source)
        .await
        .expect("source did not stop")
        .unwrap();
}

/// EndpointSlices rewritten faster than the poll period (pod churn) never read the same twice in
/// a row: they are loaded anyway after `MAX_UNSTABLE_POLLS`, not held back for as long as the churn
/// lasts.
#[tokio::test]
async fn run_loads_a_directory_that_changes_at_every_poll() {
    let dir = TempDir::new();
    let (tx, mut rx) = mpsc::channel(16);
    let poll = Duration::from_millis(50);
    let _source = tokio::spawn(manifests::run(dir.path().to_owned(), tx, poll));
    let mut state = ClusterState::default();
    snapshots(&mut rx, &mut state).await;
    let writer = {
        let path = dir.path().to_owned();
        std::thread::spawn(move || {
            // A new nodePort every 10 ms for 2 s, each file written whole (by rename).
            for i in 0..200 {
                let tmp = path.join(".web.yaml.tmp");
                fs::write(&tmp, web_file(30000 + i)).unwrap();
                fs::rename(&tmp, path.join("web.yaml")).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let started = std::time::Instant::now();
    snapshots(&mut rx, &mut state).await;
    let took = started.elapsed();
    assert!(
        took < poll * (manifests::MAX_UNSTABLE_POLLS + 3),
        "a changing directory was loaded only after {took:?}"
    );
    assert!(node_port(&state, &ObjKey::new("default", "web")).is_some());
    writer.join().unwrap();
}
