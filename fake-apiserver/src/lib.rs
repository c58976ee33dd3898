//! A fake Kubernetes API server on 127.0.0.1 that speaks the list/watch protocol: lists
//! (`{"kind":"ServiceList",…,"metadata":{"resourceVersion":"N"},"items":[…]}`) and watches
//! (newline-delimited `{"type":…,"object":…}` events, streamed with chunked encoding, replayed
//! from the requested resourceVersion; bookmarks; a 410 Gone ERROR event when the requested
//! resourceVersion is expired). Every request is recorded (and logged at debug level).
//!
//! Faults, for the reliability tests: connections dropped mid-stream (half an event, then a
//! reset), 410 Gone on lists, any error status on every request, slow responses, and watches that
//! deliver only bookmarks (object events held back until the fault ends).
//!
//! Used by the agent's integration tests (nodeport-agent/tests: kube_watch, api_faults, hostile)
//! and by the agent's cost benchmark (nodeport-bench, the Kubernetes source at scale).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Res {
    Services,
    EndpointSlices,
    Nodes,
}

impl Res {
    pub const ALL: [Res; 3] = [Res::Services, Res::EndpointSlices, Res::Nodes];

    pub fn of_path(path: &str) -> Option<Res> {
        match path {
            "/api/v1/services" => Some(Res::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Res::EndpointSlices),
            "/api/v1/nodes" => Some(Res::Nodes),
            _ => None,
        }
    }

    fn type_meta(self) -> (&'static str, &'static str) {
        match self {
            Res::Services => ("v1", "Service"),
            Res::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSlice"),
            Res::Nodes => ("v1", "Node"),
        }
    }
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Req {
    pub res: Res,
    pub uri: String,
    pub query: BTreeMap<String, String>,
}

impl Req {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
}

/// What goes down an open watch.
enum Chunk {
    Data(String),
    /// Ends the response with an error: hyper resets the connection mid-body.
    Abort,
}

/// The faults in force; all off by default.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Every request (list or watch) answered with this status and a Status body.
    pub status: Option<u16>,
    /// Lists answered 410 Gone (an expired continue token or resourceVersion).
    pub gone_on_list: bool,
    /// Every response delayed this long.
    pub delay: Duration,
    /// Object events held back: open and new watches get only the bookmarks sent meanwhile.
    pub bookmarks_only: bool,
}

#[derive(Default)]
struct Collection {
    /// "namespace/name" → object (without apiVersion and kind, as list items come).
    objects: BTreeMap<String, Value>,
    /// Every change as (resourceVersion, type, object), for watches that resume from an older
    /// resourceVersion.
    history: Vec<(u64, &'static str, Value)>,
    /// Open watches: their field selector and where their events go.
    watches: Vec<(Option<String>, mpsc::UnboundedSender<Chunk>)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_rv: u64,
    /// Events held back while `Faults::bookmarks_only`.
    held: Vec<(&'static str, Value)>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    collections: BTreeMap<Res, Collection>,
    requests: Vec<Req>,
    faults: Faults,
}

#[derive(Clone, Default)]
pub struct Fake(Arc<Mutex<Store>>);

fn key_of(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!(
        "{}/{}",
        m["namespace"].as_str().unwrap_or_default(),
        m["name"].as_str().unwrap()
    )
}

/// Whether `obj` matches a field selector (only `metadata.name=X` is understood; the others are
/// only recorded, the test data matches them).
fn selected(field_selector: Option<&str>, obj: &Value) -> bool {
    match field_selector.and_then(|s| s.strip_prefix("metadata.name=")) {
        Some(name) => obj["metadata"]["name"].as_str() == Some(name),
        None => true,
    }
}

fn event_line(res: Res, kind: &str, obj: &Value) -> String {
    let (api_version, k) = res.type_meta();
    let mut obj = obj.clone();
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(k);
    format!("{}\n", json!({"type": kind, "object": obj}))
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "code": code, "message": message})
}

fn gone_line() -> String {
    format!(
        "{}\n",
        json!({"type": "ERROR", "object": status_body(410, "Expired", "too old resource version")})
    )
}

impl Fake {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.0.lock().unwrap()
    }

    /// Creates or replaces an object, telling open watches.
    pub fn put(&self, res: Res, mut obj: Value) -> u64 {
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv;
        let hold = s.faults.bookmarks_only;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = s.collections.entry(res).or_default();
        let key = key_of(&obj);
        let kind = if c.objects.insert(key, obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        if hold {
            c.held.push((kind, obj.clone()));
        } else {
            c.notify(res, kind, &obj);
        }
        c.history.push((rv, kind, obj));
        rv
    }

    /// Deletes an object, telling open watches (or, `silently`, not: as if the watch had missed
    /// it).
    pub fn delete(&self, res: Res, key: &str, silently: bool) {
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv;
        let c = s.collections.entry(res).or_default();
        let mut obj = c.objects.remove(key).expect("no such object");
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if !silently {
            c.notify(res, "DELETED", &obj);
            c.history.push((rv, "DELETED", obj));
        }
    }

    /// Sends a bookmark to open watches: at the current resourceVersion, or, while events are held
    /// back, at the last one delivered (a bookmark promises every event before it was sent).
    pub fn bookmark(&self, res: Res) -> u64 {
        let mut s = self.lock();
        let mut rv = s.rv;
        let c = s.collections.entry(res).or_default();
        if let Some((_, first_held)) = c.held.first() {
            rv = first_held["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(rv, |v| v - 1);
        }
        let (api_version, kind) = res.type_meta();
        let line = format!(
            "{}\n",
            json!({"type": "BOOKMARK", "object": {
                "apiVersion": api_version, "kind": kind,
                "metadata": {"resourceVersion": rv.to_string()},
            }})
        );
        for (_, w) in &c.watches {
            let _ = w.send(Chunk::Data(line.clone()));
        }
        rv
    }

    /// Ends open watches normally (as the API server does at timeoutSeconds).
    pub fn close_watches(&self, res: Res) {
        self.lock()
            .collections
            .entry(res)
            .or_default()
            .watches
            .clear();
    }

    /// Drops open watches mid-stream: half an event line, then the connection is reset.
    pub fn drop_watches(&self, res: Res) {
        let mut s = self.lock();
        let c = s.collections.entry(res).or_default();
        for (_, w) in c.watches.drain(..) {
            let _ = w.send(Chunk::Data(
                r#"{"type":"MODIFIED","object":{"apiVer"#.into(),
            ));
            let _ = w.send(Chunk::Abort);
        }
    }

    /// Compacts history: open watches get a 410 Gone ERROR event and end; resuming from any
    /// resourceVersion seen so far gets 410 too, so the client must list again.
    pub fn expire(&self, res: Res) {
        let mut s = self.lock();
        let rv = s.rv;
        let c = s.collections.entry(res).or_default();
        c.oldest_rv = rv;
        c.history.clear();
        for (_, w) in c.watches.drain(..) {
            let _ = w.send(Chunk::Data(gone_line()));
        }
    }

    /// Sets the faults in force. Ending `bookmarks_only` delivers the held events.
    pub fn set_faults(&self, faults: Faults) {
        let mut s = self.lock();
        let release = s.faults.bookmarks_only && !faults.bookmarks_only;
        s.faults = faults;
        if release {
            for (res, c) in &mut s.collections {
                for (kind, obj) in std::mem::take(&mut c.held) {
                    c.notify(*res, kind, &obj);
                }
            }
        }
    }

    pub fn requests(&self) -> Vec<Req> {
        self.lock().requests.clone()
    }

    pub fn open_watches(&self, res: Res) -> usize {
        let mut s = self.lock();
        let c = s.collections.entry(res).or_default();
        c.watches.retain(|(_, w)| !w.is_closed());
        c.watches.len()
    }

    /// Serves on 127.0.0.1 (a random port unless given), in the background.
    pub async fn serve(&self, port: u16) -> (u16, JoinHandle<()>) {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = Router::new().fallback(handle).with_state(self.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (port, server)
    }
}

impl Collection {
    fn notify(&mut self, res: Res, kind: &'static str, obj: &Value) {
        let line = event_line(res, kind, obj);
        self.watches.retain(|(fields, w)| {
            !selected(fields.as_deref(), obj) || w.send(Chunk::Data(line.clone())).is_ok()
        });
    }
}

/// Decodes an `application/x-www-form-urlencoded` query.
fn parse_query(query: &str) -> BTreeMap<String, String> {
    fn decode(s: &str) -> String {
        let mut out = Vec::new();
        let mut bytes = s.bytes();
        while let Some(b) = bytes.next() {
            match b {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                    out.push(u8::from_str_radix(&hex, 16).unwrap());
                }
                b => out.push(b),
            }
        }
        String::from_utf8(out).unwrap()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn handle(State(fake): State<Fake>, uri: Uri) -> Response {
    let Some(res) = Res::of_path(uri.path()) else {
        return json_response(
            StatusCode::NOT_FOUND,
            status_body(404, "NotFound", &format!("{uri} not found")),
        );
    };
    let query = parse_query(uri.query().unwrap_or_default());
    let req = Req {
        res,
        uri: uri.to_string(),
        query: query.clone(),
    };
    tracing::debug!(uri = %req.uri, "fake API server request");
    let watch = req.is_watch();
    let faults = {
        let mut s = fake.lock();
        s.requests.push(req);
        s.faults.clone()
    };
    if !faults.delay.is_zero() {
        tokio::time::sleep(faults.delay).await;
    }
    if let Some(code) = faults.status {
        let status = StatusCode::from_u16(code).unwrap();
        return json_response(status, status_body(code, "InternalError", "injected fault"));
    }
    if faults.gone_on_list && !watch {
        return json_response(
            StatusCode::GONE,
            status_body(410, "Expired", "The provided continue parameter is too old"),
        );
    }
    let mut s = fake.lock();
    let rv = s.rv;
    let c = s.collections.entry(res).or_default();
    let fields = query.get("fieldSelector").cloned();
    if !watch {
        let items: Vec<&Value> = c
            .objects
            .values()
            .filter(|o| selected(fields.as_deref(), o))
            .collect();
        let (api_version, kind) = res.type_meta();
        return json_response(
            StatusCode::OK,
            json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                   "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
        );
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::unbounded_channel();
    if from < c.oldest_rv {
        let _ = tx.send(Chunk::Data(gone_line()));
    } else {
        let held_from = c.held.first().map(|(_, o)| {
            o["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        });
        for (rv, kind, obj) in &c.history {
            let held = held_from.is_some_and(|h| *rv >= h);
            if *rv > from && !held && selected(fields.as_deref(), obj) {
                let _ = tx.send(Chunk::Data(event_line(res, kind, obj)));
            }
        }
        c.watches.push((fields, tx));
    }
    let body = futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await? {
            Chunk::Data(line) => Some((Ok::<_, std::io::Error>(line), rx)),
            Chunk::Abort => Some((Err(std::io::Error::other("injected connection drop")), rx)),
        }
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

/// A kubeconfig file for the fake server on `port`.
pub fn kubeconfig(port: u16) -> String {
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
    )
}

/// The fake server running on its own thread and runtime inside network namespace `netns`
/// (`/run/netns/…`), so an agent in that namespace reaches it on 127.0.0.1; stopped on drop.
pub struct ServerInNetns {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerInNetns {
    pub fn start(fake: &Fake, netns: &str) -> Self {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(netns).expect("netns file");
        let fake = fake.clone();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: a valid netns fd; only this thread (and the runtime's threads it spawns)
            // live there.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (port, _server) = fake.serve(0).await;
                port_tx.send(port).unwrap();
                let _ = stopped.await;
            });
            rt.shutdown_background();
        });
        let port = port_rx.recv().expect("the fake API server did not start");
        Self {
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerInNetns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
