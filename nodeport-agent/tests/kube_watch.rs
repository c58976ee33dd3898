//! The Kubernetes source against a fake API server on 127.0.0.1 (tests/support/fake_api.rs)
//! that speaks the list/watch protocol: lists (`{"kind":"ServiceList",…,"metadata":{"resourceVersion":"N"},"items":[…]}`)
//! and watches (newline-delimited `{"type":…,"object":…}` events, streamed with chunked encoding,
//! replayed from the requested resourceVersion; bookmarks; a 410 Gone ERROR event when the
//! requested resourceVersion is expired). Every request is recorded (and logged at debug level:
//! `RUST_LOG=debug cargo test --test kube_watch -- --nocapture`).

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use nodeport_agent::{
    model::{Kind, Resource, SourceEvent},
    source::kube::{self as kube_source, ENDPOINTSLICE_LABEL_SELECTOR, SERVICE_LABEL_SELECTOR},
};
use serde_json::{Value, json};
use support::fake_api::{Fake, Req, Res};
use tokio::{net::TcpListener, sync::mpsc};

// ---- test data and helpers ----

fn svc(ns: &str, name: &str, node_port: u16) -> Value {
    json!({"metadata": {"namespace": ns, "name": name},
           "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                    "ports": [{"port": 80, "protocol": "TCP", "nodePort": node_port}]}})
}

fn slice(ns: &str, name: &str, ip: &str) -> Value {
    json!({"metadata": {"namespace": ns, "name": name,
                        "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4",
           "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
           "ports": [{"port": 8080, "protocol": "TCP"}]})
}

fn node(name: &str) -> Value {
    json!({"metadata": {"name": name}})
}

fn client(port: u16) -> kube::Client {
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("no event within 20 s")
        .expect("source stopped")
}

fn names(objects: &[Resource]) -> BTreeSet<String> {
    objects.iter().map(|o| o.key().to_string()).collect()
}

/// The next three events: one Snapshot of each kind, in any order (the watchers run
/// concurrently).
async fn snapshots(rx: &mut mpsc::Receiver<SourceEvent>) -> BTreeMap<Kind, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for _ in 0..3 {
        match next(rx).await {
            SourceEvent::Snapshot(kind, objects) => {
                assert!(objects.iter().all(|o| o.kind() == kind));
                assert!(
                    out.insert(kind, names(&objects)).is_none(),
                    "two {kind} snapshots"
                );
            }
            other => panic!("expected snapshots, got {other:?}"),
        }
    }
    out
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn key(event: &SourceEvent) -> (&'static str, Kind, String) {
    match event {
        SourceEvent::Applied(o) => ("applied", o.kind(), o.key().to_string()),
        SourceEvent::Deleted(o) => ("deleted", o.kind(), o.key().to_string()),
        SourceEvent::Snapshot(k, _) => ("snapshot", *k, String::new()),
    }
}

// ---- tests ----

#[tokio::test]
async fn list_watch_bookmark_and_relist_after_410() {
    init_tracing();
    let fake = Fake::default();
    fake.put(Res::Services, svc("default", "web", 30080));
    fake.put(Res::Services, svc("default", "old", 30081));
    fake.put(
        Res::EndpointSlices,
        slice("default", "web-abc12", "10.244.1.5"),
    );
    fake.put(Res::Nodes, node("node-a"));
    fake.put(Res::Nodes, node("node-b"));
    let (port, _server) = fake.serve(0).await;

    let (tx, mut rx) = mpsc::channel(16);
    let source = tokio::spawn(kube_source::run(client(port), "node-a".into(), tx));

    // The initial lists arrive as one snapshot per kind; the node's field selector narrows the
    // Node list to this node.
    let first = snapshots(&mut rx).await;
    assert_eq!(first[&Kind::Service], set(&["default/web", "default/old"]));
    assert_eq!(first[&Kind::EndpointSlice], set(&["default/web-abc12"]));
    assert_eq!(first[&Kind::Node], set(&["node-a"]));

    for res in [Res::Services, Res::EndpointSlices, Res::Nodes] {
        eventually(&format!("a {res:?} watch"), || fake.open_watches(res) == 1).await;
    }
    let requests = fake.requests();
    for r in &requests {
        println!("{:?} {}", r.res, r.uri);
    }
    let of = |res: Res, watch: bool| -> Vec<Req> {
        requests
            .iter()
            .filter(|r| r.res == res && r.is_watch() == watch)
            .cloned()
            .collect()
    };
    // Selectors: kube-proxy's.
    for r in of(Res::Services, false)
        .iter()
        .chain(&of(Res::Services, true))
    {
        assert_eq!(r.query["labelSelector"], SERVICE_LABEL_SELECTOR);
        assert_eq!(
            r.query["labelSelector"],
            "!service.kubernetes.io/service-proxy-name"
        );
        assert_eq!(r.query["fieldSelector"], "spec.clusterIP!=None");
    }
    for r in of(Res::EndpointSlices, false)
        .iter()
        .chain(&of(Res::EndpointSlices, true))
    {
        assert_eq!(r.query["labelSelector"], ENDPOINTSLICE_LABEL_SELECTOR);
        assert_eq!(
            r.query["labelSelector"],
            "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
        );
        assert!(!r.query.contains_key("fieldSelector"));
    }
    for r in of(Res::Nodes, false).iter().chain(&of(Res::Nodes, true)) {
        assert_eq!(r.query["fieldSelector"], "metadata.name=node-a");
        assert!(!r.query.contains_key("labelSelector"));
    }
    // One list (pages of 500; no resourceVersion: a consistent read of the most recent state,
    // kube's default ListSemantic) then one watch from the list's resourceVersion, with
    // bookmarks.
    for res in [Res::Services, Res::EndpointSlices, Res::Nodes] {
        let lists = of(res, false);
        assert_eq!(lists.len(), 1, "{lists:?}");
        assert_eq!(lists[0].query["limit"], "500");
        assert!(!lists[0].query.contains_key("resourceVersion"));
        let watches = of(res, true);
        assert_eq!(watches.len(), 1, "{watches:?}");
        assert_eq!(watches[0].query["allowWatchBookmarks"], "true");
        assert_eq!(watches[0].query["timeoutSeconds"], "290");
        assert_eq!(watches[0].query["resourceVersion"], "5");
    }

    // An added Service arrives as Applied, a deleted one as Deleted, a changed slice as Applied.
    fake.put(Res::Services, svc("default", "new", 30082));
    let e = next(&mut rx).await;
    assert_eq!(key(&e), ("applied", Kind::Service, "default/new".into()));
    let SourceEvent::Applied(Resource::Service(new)) = e else {
        unreachable!()
    };
    assert_eq!(new.spec.unwrap().ports.unwrap()[0].node_port, Some(30082));
    fake.delete(Res::Services, "default/old", false);
    assert_eq!(
        key(&next(&mut rx).await),
        ("deleted", Kind::Service, "default/old".into())
    );
    fake.put(
        Res::EndpointSlices,
        slice("default", "web-abc12", "10.244.1.6"),
    );
    assert_eq!(
        key(&next(&mut rx).await),
        ("applied", Kind::EndpointSlice, "default/web-abc12".into())
    );
    // A node that is not this one is not watched.
    fake.put(Res::Nodes, node("node-c"));

    // A bookmark sends nothing, but moves the resourceVersion a re-watch resumes from: end the
    // watch (as the API server does at timeoutSeconds) and the next one starts at the bookmark.
    let bookmark_rv = fake.bookmark(Res::Services);
    tokio::time::sleep(Duration::from_millis(100)).await;
    fake.close_watches(Res::Services);
    eventually("a resumed Service watch", || {
        fake.open_watches(Res::Services) == 1
    })
    .await;
    let resumed = fake
        .requests()
        .into_iter()
        .rfind(|r| r.res == Res::Services)
        .unwrap();
    assert!(resumed.is_watch(), "{resumed:?}");
    assert_eq!(
        resumed.query["resourceVersion"],
        bookmark_rv.to_string(),
        "{resumed:?}"
    );
    assert!(
        rx.try_recv().is_err(),
        "a bookmark or a resumed watch sent an event"
    );

    // A Service deleted while the watch missed it, then 410 Gone: the watcher lists again, and
    // the new snapshot omits it.
    fake.delete(Res::Services, "default/new", true);
    fake.expire(Res::Services);
    match next(&mut rx).await {
        SourceEvent::Snapshot(Kind::Service, objects) => {
            assert_eq!(names(&objects), set(&["default/web"]));
        }
        other => panic!("expected a Service snapshot, got {other:?}"),
    }
    let service_lists = fake
        .requests()
        .into_iter()
        .filter(|r| r.res == Res::Services && !r.is_watch())
        .count();
    assert_eq!(service_lists, 2);
    // And watching goes on from the new list.
    fake.put(Res::Services, svc("default", "later", 30083));
    assert_eq!(
        key(&next(&mut rx).await),
        ("applied", Kind::Service, "default/later".into())
    );
    // The other watchers were not disturbed.
    for res in [Res::EndpointSlices, Res::Nodes] {
        assert_eq!(
            fake.requests()
                .iter()
                .filter(|r| r.res == res && !r.is_watch())
                .count(),
            1
        );
    }

    // Dropping the receiver stops the watchers.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), source)
        .await
        .expect("source did not stop")
        .unwrap();
}

#[tokio::test]
async fn unreachable_api_server_backs_off_then_recovers() {
    init_tracing();
    // A port nothing listens on: connections are refused.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let (tx, mut rx) = mpsc::channel(16);
    let source = tokio::spawn(kube_source::run(client(port), "node-a".into(), tx));

    // Nothing is sent while the API server is unreachable (downstream keeps its state), and the
    // source keeps trying.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rx.try_recv().is_err());
    assert!(!source.is_finished());

    // Once it is up, the watchers list: all three snapshots arrive.
    let fake = Fake::default();
    fake.put(Res::Services, svc("default", "web", 30080));
    fake.put(Res::Nodes, node("node-a"));
    let (_, _server) = fake.serve(port).await;
    let first = snapshots(&mut rx).await;
    assert_eq!(first[&Kind::Service], set(&["default/web"]));
    assert_eq!(first[&Kind::EndpointSlice], set(&[]));
    assert_eq!(first[&Kind::Node], set(&["node-a"]));
    // Each watcher listed once the server was up (failed attempts never reached it).
    let lists = fake.requests().iter().filter(|r| !r.is_watch()).count();
    assert_eq!(lists, 3);

    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), source)
        .await
        .expect("source did not stop")
        .unwrap();
}

#[test]
fn watches_describe_what_is_requested() {
    // The RBAC description names the resources the watchers request, in Kind::ALL order.
    let paths: Vec<(Kind, Option<Res>, &[&str])> = kube_source::WATCHES
        .iter()
        .map(|w| {
            let path = if w.group.is_empty() {
                format!("/api/{}/{}", w.version, w.resource)
            } else {
                format!("/apis/{}/{}/{}", w.group, w.version, w.resource)
            };
            (w.kind, Res::of_path(&path), w.verbs)
        })
        .collect();
    assert_eq!(
        paths,
        [
            (Kind::Service, Some(Res::Services), &["list", "watch"][..]),
            (
                Kind::EndpointSlice,
                Some(Res::EndpointSlices),
                &["list", "watch"][..]
            ),
            (Kind::Node, Some(Res::Nodes), &["list", "watch"][..]),
        ]
    );
    for kind in Kind::ALL {
        assert_eq!(kube_source::watch_of(kind).kind, kind);
    }
    let node = kube_source::watch_of(Kind::Node);
    assert_eq!(
        node.field_selector_for("node-a").as_deref(),
        Some("metadata.name=node-a")
    );
    assert!(!node.namespaced);
}

#[tokio::test]
async fn client_from_a_kubeconfig_file() {
    init_tracing();
    let fake = Fake::default();
    fake.put(Res::Nodes, node("node-a"));
    let (port, _server) = fake.serve(0).await;
    let dir = std::env::temp_dir().join(format!("nodeport-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config");
    std::fs::write(
        &path,
        format!(
            "\
apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {{server: 'http://127.0.0.1:{port}'}}
users:
- name: nobody
  user: {{}}
contexts:
- name: fake
  context: {{cluster: fake, user: nobody}}
current-context: fake
"
        ),
    )
    .unwrap();
    let client = kube_source::client(Some(&path)).await;
    let missing = kube_source::client(Some(&dir.join("missing"))).await;
    std::fs::remove_dir_all(&dir).unwrap();

    let (tx, mut rx) = mpsc::channel(16);
    let source = tokio::spawn(kube_source::run(client.unwrap(), "node-a".into(), tx));
    let first = snapshots(&mut rx).await;
    assert_eq!(first[&Kind::Node], set(&["node-a"]));
    drop(rx);
    source.await.unwrap();

    let Err(err) = missing else {
        panic!("a missing kubeconfig gave a client")
    };
    assert!(
        matches!(err, kube_source::ClientError::Kubeconfig { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("missing"), "{err}");
}
