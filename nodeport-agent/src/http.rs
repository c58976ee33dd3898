//! The agent's HTTP side, compatible with kube-proxy's so that probes, load balancers and scrapers
//! configured for kube-proxy keep working:
//!
//! * `/healthz` and `/livez` (kube-proxy's `--healthz-bind-address`, port
//!   [`DEFAULT_HEALTHZ_PORT`]), mirroring `pkg/proxy/healthcheck/proxy_health.go`: healthy unless a
//!   change has been waiting longer than the health timeout (twice the sync period) to reach the
//!   maps; `/healthz` is also 503 when the node is being deleted or drained by the cluster
//!   autoscaler. Same headers, status codes and JSON fields in the same order.
//! * `/metrics` on the same listener (kube-proxy serves its metrics on a second port; see
//!   [`crate::metrics`]).
//! * One listener per `healthCheckNodePort` of `externalTrafficPolicy: Local` services
//!   ([`HealthChecks`]), mirroring `pkg/proxy/healthcheck/service_health.go`: 200 when this node
//!   has local endpoints for the service and the agent is healthy, 503 otherwise, with kube-proxy's
//!   JSON body and headers.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get},
};
use k8s_openapi::api::core::v1::Node;
use serde::Serialize;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::metrics::{self, Metrics};

/// kube-proxy's default `--healthz-bind-address` port.
pub const DEFAULT_HEALTHZ_PORT: u16 = 10256;

/// The taint the cluster autoscaler puts on a node it is about to delete; such a node answers
/// `/healthz` with 503 so that load balancers drain it (kube-proxy's `ToBeDeletedTaint`).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// The IP family the dataplane programs, as kube-proxy names it in `/healthz`'s `status`.
const IP_FAMILY: &str = "IPv4";

/// Time source, injectable for tests.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// What `/healthz`, `/livez` and the service health checks report, shared with the sync loop.
pub struct HealthState {
    health_timeout: Duration,
    clock: Clock,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
}

/// The proxy's health at one instant (kube-proxy's `ProxyHealth`, node eligibility aside).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyHealth {
    pub healthy: bool,
    /// The last successful sync, if any.
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
}

impl std::fmt::Debug for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthState")
            .field("health_timeout", &self.health_timeout)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl HealthState {
    /// The health timeout is twice `sync_period`, as kube-proxy's (`2*config.SyncPeriod`).
    pub fn new(sync_period: Duration) -> Arc<Self> {
        Self::with_clock(sync_period, Arc::new(SystemTime::now))
    }

    pub fn with_clock(sync_period: Duration, clock: Clock) -> Arc<Self> {
        Arc::new(Self {
            health_timeout: sync_period.saturating_mul(2),
            clock,
            inner: Mutex::new(Inner {
                last_updated: None,
                oldest_pending: None,
                // Eligible (and so healthy) while starting up, until a node object says otherwise.
                node_eligible: true,
            }),
        })
    }

    pub fn health_timeout(&self) -> Duration {
        self.health_timeout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change arrived that the maps do not hold yet (kube-proxy's `QueuedUpdate`). Only the
    /// oldest unsynced change counts: if no [`synced`](Self::synced) follows within the health
    /// timeout, the agent is unhealthy.
    pub fn queued_update(&self) {
        let now = (self.clock)();
        self.lock().oldest_pending.get_or_insert(now);
    }

    /// The maps now hold everything received so far (kube-proxy's `Updated`).
    pub fn synced(&self) {
        let now = (self.clock)();
        let mut inner = self.lock();
        inner.oldest_pending = None;
        inner.last_updated = Some(now);
    }

    /// The proxy's own health, ignoring the node's eligibility (kube-proxy's `IsHealthy`/
    /// `Health().Healthy`, which the service health checks report).
    pub fn healthy(&self) -> bool {
        self.health().healthy
    }

    pub fn health(&self) -> ProxyHealth {
        let inner = self.lock();
        let now = (self.clock)();
        let healthy = match inner.oldest_pending {
            // Starting up with nothing queued, or fully synced.
            None => true,
            // A change is queued but not late yet (a clock stepping back counts as not late).
            Some(queued) => now.duration_since(queued).unwrap_or_default() < self.health_timeout,
        };
        ProxyHealth {
            healthy,
            last_updated: inner.last_updated,
            current_time: now,
        }
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// Derives eligibility from this node's object, as kube-proxy: not eligible once it is being
    /// deleted or carries [`TO_BE_DELETED_TAINT`].
    pub fn sync_node(&self, node: &Node) {
        self.set_node_eligible(node_eligible(node));
    }
}

/// kube-proxy's node eligibility rule: no deletion timestamp and no autoscaler deletion taint.
pub fn node_eligible(node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !tainted
}

/// `/healthz` and `/livez` bodies: kube-proxy's `ProxyHealth` marshalled by `encoding/json`.
#[derive(Serialize)]
struct HealthBody {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
    #[serde(rename = "currentTime")]
    current_time: String,
    #[serde(rename = "nodeEligible", skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, ProxierHealth>,
}

#[derive(Serialize)]
struct ProxierHealth {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
    healthy: bool,
}

impl HealthBody {
    fn new(health: &ProxyHealth, node_eligible: Option<bool>) -> Self {
        let mut status = BTreeMap::new();
        if let Some(last) = health.last_updated {
            status.insert(
                IP_FAMILY,
                ProxierHealth {
                    last_updated: go_time(Some(last)),
                    healthy: health.healthy,
                },
            );
        }
        // As kube-proxy: when healthy, the top-level lastUpdated is "now" (older releases
        // reported the last sync loop run, which was recent whenever healthy).
        let last_updated = if health.healthy {
            Some(health.current_time)
        } else {
            health.last_updated
        };
        Self {
            last_updated: go_time(last_updated),
            current_time: go_time(Some(health.current_time)),
            node_eligible,
            healthy: health.healthy,
            status,
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

fn status_for(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[derive(Clone)]
struct ProxyState {
    health: Arc<HealthState>,
    metrics: Arc<Metrics>,
}

async fn healthz(State(state): State<ProxyState>) -> Response {
    let health = state.health.health();
    let eligible = state.health.node_eligible();
    let mut body = HealthBody::new(&health, Some(eligible));
    // `healthy` in the body is the proxy's own health; the status code also needs the node.
    let ok = health.healthy && eligible;
    if !ok {
        // kube-proxy reports "now" as lastUpdated only on 200, so also when only the node is
        // ineligible the real last sync is shown.
        body.last_updated = go_time(health.last_updated);
    }
    let status = status_for(ok);
    state.metrics.count_healthz(status.as_u16());
    json_response(status, serde_json::to_string(&body).unwrap_or_default())
}

async fn livez(State(state): State<ProxyState>) -> Response {
    let health = state.health.health();
    let body = HealthBody::new(&health, None);
    let status = status_for(health.healthy);
    state.metrics.count_livez(status.as_u16());
    json_response(status, serde_json::to_string(&body).unwrap_or_default())
}

async fn metrics_handler(State(state): State<ProxyState>) -> Response {
    // The dataplane source reads BPF maps: keep those syscalls off the async workers.
    let m = state.metrics.clone();
    match tokio::task::spawn_blocking(move || m.encode()).await {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The `/healthz`, `/livez` and `/metrics` routes.
pub fn health_router(health: Arc<HealthState>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", any(healthz))
        .route("/livez", any(livez))
        .route("/metrics", get(metrics_handler))
        .with_state(ProxyState { health, metrics })
}

/// Serves `/healthz`, `/livez` and `/metrics` on `addr` until the task is dropped or fails.
pub async fn serve_health_and_metrics(
    addr: SocketAddr,
    health: Arc<HealthState>,
    metrics: Arc<Metrics>,
) -> io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    serve_health_and_metrics_on(listener, health, metrics).await
}

/// As [`serve_health_and_metrics`], on a listener already bound (e.g. to port 0).
pub async fn serve_health_and_metrics_on(
    listener: TcpListener,
    health: Arc<HealthState>,
    metrics: Arc<Metrics>,
) -> io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "serving /healthz, /livez and /metrics");
    axum::serve(listener, health_router(health, metrics)).await
}

/// One service's health check, as the listener reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ServiceHealth {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

#[derive(Clone)]
struct CheckState {
    service: Arc<RwLock<ServiceHealth>>,
    health: Arc<HealthState>,
}

/// kube-proxy's service health check body, byte for byte (`dedent` of its template: tabs, no
/// trailing newline).
pub fn service_health_body(
    namespace: &str,
    name: &str,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        q(namespace),
        q(name),
        local_endpoints,
        proxy_healthy
    )
}

static ENDPOINT_WEIGHT: HeaderName = HeaderName::from_static("x-load-balancing-endpoint-weight");

async fn service_check(State(state): State<CheckState>) -> Response {
    let service = state
        .service
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let proxy_healthy = state.health.healthy();
    let body = service_health_body(
        &service.namespace,
        &service.name,
        service.local_endpoints,
        proxy_healthy,
    );
    let mut response = json_response(
        status_for(service.local_endpoints != 0 && proxy_healthy),
        body,
    );
    response.headers_mut().insert(
        ENDPOINT_WEIGHT.clone(),
        HeaderValue::from(service.local_endpoints),
    );
    response
}

struct Running {
    service: Arc<RwLock<ServiceHealth>>,
    /// One server per bind address.
    servers: Vec<(oneshot::Sender<()>, JoinHandle<io::Result<()>>)>,
}

/// How long a removed health check may take to finish its in-flight requests before its task is
/// aborted (its listening socket is closed before that wait).
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The `healthCheckNodePort` listeners, one per `externalTrafficPolicy: Local` service with one.
/// Like kube-proxy, every path on such a port answers; a port that fails to bind is logged and
/// retried on the next [`update`](Self::update). Dropping this closes every listener.
pub struct HealthChecks {
    /// Where each port listens: `0.0.0.0`, or (kube-proxy with `--nodeport-addresses`) each of
    /// the node's nodePort addresses.
    bind_ips: Vec<IpAddr>,
    health: Arc<HealthState>,
    running: BTreeMap<u16, Running>,
}

impl std::fmt::Debug for HealthChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecks")
            .field("bind_ips", &self.bind_ips)
            .field("ports", &self.ports())
            .finish_non_exhaustive()
    }
}

impl HealthChecks {
    /// Listens on `bind_ip` (default `0.0.0.0`, as kube-proxy without `--nodeport-addresses`).
    pub fn new(bind_ip: Option<IpAddr>, health: Arc<HealthState>) -> Self {
        Self {
            bind_ips: vec![bind_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))],
            health,
            running: BTreeMap::new(),
        }
    }

    /// Listens on exactly these addresses from now on (kube-proxy's health check server with
    /// `--nodeport-addresses` listens on each matching node address, not on `0.0.0.0`). Open
    /// ports are closed when the set changes and reopened by the next
    /// [`update`](Self::update); with no address, no port listens.
    pub async fn set_bind_ips(&mut self, mut ips: Vec<IpAddr>) {
        ips.sort();
        ips.dedup();
        if ips == self.bind_ips {
            return;
        }
        tracing::info!(addresses = ?ips, "health check ports move to these addresses");
        self.bind_ips = ips;
        for (_, running) in std::mem::take(&mut self.running) {
            close(running).await;
        }
    }

    /// The ports listening now, ascending.
    pub fn ports(&self) -> Vec<u16> {
        self.running.keys().copied().collect()
    }

    /// Makes the set of listeners exactly `checks` (`(port, namespace, name, local endpoints)`):
    /// removed ports are closed (their sockets are closed when this returns), kept ports are
    /// updated in place without reopening, new ports are opened. A port listed twice keeps its
    /// first entry (the API server never allocates one port to two services).
    pub async fn update(&mut self, checks: &[(u16, String, String, usize)]) {
        let mut wanted: BTreeMap<u16, ServiceHealth> = BTreeMap::new();
        for (port, namespace, name, local_endpoints) in checks {
            match wanted.entry(*port) {
                Entry::Vacant(v) => {
                    v.insert(ServiceHealth {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        local_endpoints: *local_endpoints,
                    });
                }
                Entry::Occupied(o) => tracing::warn!(
                    port,
                    service = %format!("{namespace}/{name}"),
                    kept = %format!("{}/{}", o.get().namespace, o.get().name),
                    "health check port listed twice; ignoring the later service"
                ),
            }
        }

        let removed: Vec<u16> = self
            .running
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in removed {
            if let Some(running) = self.running.remove(&port) {
                tracing::info!(port, "closing health check");
                close(running).await;
            }
        }

        for (port, service) in wanted {
            if let Some(running) = self.running.get(&port) {
                let mut current = running.service.write().unwrap_or_else(|e| e.into_inner());
                if *current != service {
                    *current = service;
                }
                continue;
            }
            let mut listeners = Vec::with_capacity(self.bind_ips.len());
            for ip in &self.bind_ips {
                let addr = SocketAddr::new(*ip, port);
                match TcpListener::bind(addr).await {
                    Ok(l) => listeners.push(l),
                    Err(e) => {
                        tracing::warn!(
                            %addr,
                            service = %format!("{}/{}", service.namespace, service.name),
                            error = %e,
                            "failed to start health check; will retry on the next update"
                        );
                        break;
                    }
                }
            }
            if listeners.len() != self.bind_ips.len() || listeners.is_empty() {
                continue;
            }
            tracing::info!(
                addresses = ?self.bind_ips,
                port,
                service = %format!("{}/{}", service.namespace, service.name),
                "opening health check"
            );
            let service = Arc::new(RwLock::new(service));
            let router = Router::new()
                .fallback(service_check)
                .with_state(CheckState {
                    service: service.clone(),
                    health: self.health.clone(),
                });
            let servers = listeners
                .into_iter()
                .map(|listener| {
                    let (shutdown, stop) = oneshot::channel::<()>();
                    let router = router.clone();
                    let task = tokio::spawn(async move {
                        axum::serve(listener, router)
                            .with_graceful_shutdown(async move {
                                // A send or a dropped sender (HealthChecks dropped) both stop it.
                                let _ = stop.await;
                            })
                            .await
                    });
                    (shutdown, task)
                })
                .collect();
            self.running.insert(port, Running { service, servers });
        }
    }
}

async fn close(running: Running) {
    for (shutdown, task) in running.servers {
        let _ = shutdown.send(());
        let abort = task.abort_handle();
        if tokio::time::timeout(CLOSE_GRACE, task).await.is_err() {
            abort.abort();
        }
    }
}

/// Formats like Go's `time.Time` in JSON (RFC 3339 with nanoseconds, trailing zeros trimmed), in
/// UTC; `None` is Go's zero time.
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(d) = t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) else {
        return "0001-01-01T00:00:00Z".to_owned();
    };
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let nanos = d.subsec_nanos();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    #[test]
    fn go_time_format() {
        assert_eq!(go_time(None), "0001-01-01T00:00:00Z");
        assert_eq!(go_time(Some(UNIX_EPOCH)), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(go_time(Some(t)), "2023-11-14T22:13:20Z");
        let t = t + Duration::from_millis(120);
        assert_eq!(go_time(Some(t)), "2023-11-14T22:13:20.12Z");
        let t = UNIX_EPOCH + Duration::new(951_782_400, 1); // 2000-02-29
        assert_eq!(go_time(Some(t)), "2000-02-29T00:00:00.000000001Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_399); // 2100-02-28T23:59:59
        assert_eq!(go_time(Some(t)), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn service_body_is_kube_proxys_dedented_template() {
        assert_eq!(
            service_health_body("default", "web", 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }

    #[test]
    fn health_follows_queued_updates() {
        let now = Arc::new(Mutex::new(UNIX_EPOCH + Duration::from_secs(1000)));
        let clock_now = now.clone();
        let state = HealthState::with_clock(
            Duration::from_secs(30),
            Arc::new(move || *clock_now.lock().unwrap()),
        );
        let advance = |s: u64| *now.lock().unwrap() += Duration::from_secs(s);
        assert_eq!(state.health_timeout(), Duration::from_secs(60));
        // Healthy while starting up with nothing queued.
        assert!(state.healthy());
        state.queued_update();
        advance(59);
        assert!(state.healthy());
        // A second change does not restart the clock.
        state.queued_update();
        advance(1);
        assert!(!state.healthy());
        state.synced();
        assert!(state.healthy());
        // Idle for long after a sync: still healthy (nothing pending).
        advance(3600);
        assert!(state.healthy());
        assert_eq!(
            state.health().last_updated,
            Some(UNIX_EPOCH + Duration::from_secs(1060))
        );
    }

    #[test]
    fn node_eligibility() {
        let mut node = Node::default();
        assert!(node_eligible(&node));
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert!(!node_eligible(&node));
        let deleting = Node {
            metadata: ObjectMeta {
                deletion_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2024-01-01T00:00:00Z".parse().unwrap(),
                )),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!node_eligible(&deleting));
    }
}
