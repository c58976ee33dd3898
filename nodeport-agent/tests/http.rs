//! The HTTP side against kube-proxy's behaviour (`pkg/proxy/healthcheck/proxy_health.go`,
//! `service_health.go`): servers started here on 127.0.0.1, spoken to with plain HTTP/1.1.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nodeport_agent::{
    http::{HealthChecks, HealthState, serve_health_and_metrics_on},
    metrics::{DataplaneSnapshot, Metrics, ServiceTraffic},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("response within 10s")?;
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header/body separator");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// A manual clock starting at 2023-11-14T22:13:20Z.
#[derive(Clone)]
struct TestClock(Arc<Mutex<SystemTime>>);

impl TestClock {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )))
    }
    fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
    fn state(&self, sync_period: Duration) -> Arc<HealthState> {
        let c = self.0.clone();
        HealthState::with_clock(sync_period, Arc::new(move || *c.lock().unwrap()))
    }
}

async fn start_proxy_server(health: Arc<HealthState>, metrics: Arc<Metrics>) -> SocketAddr {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_health_and_metrics_on(listener, health, metrics));
    addr
}

fn assert_json_headers(r: &Reply) {
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn healthz_200_after_sync_with_kube_proxy_fields() {
    let clock = TestClock::new();
    let health = clock.state(Duration::from_secs(30));
    let addr = start_proxy_server(health.clone(), Arc::new(Metrics::new())).await;

    // Starting up, nothing queued: healthy, no per-family status yet, zero lastUpdated replaced
    // by now as kube-proxy does on 200.
    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 200);
    assert_json_headers(&r);
    assert_eq!(
        r.body,
        r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:13:20Z","nodeEligible":true,"healthy":true}"#
    );

    health.queued_update();
    clock.advance(Duration::from_millis(1500));
    health.synced();
    clock.advance(Duration::from_secs(10));
    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 200);
    assert_json_headers(&r);
    assert_eq!(
        r.body,
        r#"{"lastUpdated":"2023-11-14T22:13:31.5Z","currentTime":"2023-11-14T22:13:31.5Z","nodeEligible":true,"healthy":true,"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:21.5Z","healthy":true}}}"#
    );
}

#[tokio::test]
async fn healthz_and_livez_503_when_a_change_waits_past_twice_the_sync_period() {
    let clock = TestClock::new();
    let health = clock.state(Duration::from_secs(30));
    let addr = start_proxy_server(health.clone(), Arc::new(Metrics::new())).await;
    health.synced();
    clock.advance(Duration::from_secs(5));
    health.queued_update();

    clock.advance(Duration::from_secs(59));
    assert_eq!(get(addr, "/healthz").await.unwrap().status, 200);

    clock.advance(Duration::from_secs(1));
    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 503);
    assert_json_headers(&r);
    assert_eq!(
        r.body,
        r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:14:25Z","nodeEligible":true,"healthy":false,"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:20Z","healthy":false}}}"#
    );
    let r = get(addr, "/livez").await.unwrap();
    assert_eq!(r.status, 503);
    assert_json_headers(&r);
    assert_eq!(
        r.body,
        r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:14:25Z","healthy":false,"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:20Z","healthy":false}}}"#
    );

    health.synced();
    assert_eq!(get(addr, "/healthz").await.unwrap().status, 200);
    assert_eq!(get(addr, "/livez").await.unwrap().status, 200);
}

#[tokio::test]
async fn ineligible_node_fails_healthz_but_not_livez() {
    let clock = TestClock::new();
    let health = clock.state(Duration::from_secs(30));
    let addr = start_proxy_server(health.clone(), Arc::new(Metrics::new())).await;
    health.synced();
    health.set_node_eligible(false);

    let r = get(addr, "/healthz").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body,
        r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:13:20Z","nodeEligible":false,"healthy":true,"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:20Z","healthy":true}}}"#
    );
    let r = get(addr, "/livez").await.unwrap();
    assert_eq!(r.status, 200);
    assert_json_headers(&r);
    assert_eq!(
        r.body,
        r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:13:20Z","healthy":true,"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:20Z","healthy":true}}}"#
    );
    assert_eq!(get(addr, "/nothing").await.unwrap().status, 404);
}

#[tokio::test]
async fn metrics_exposes_every_family_and_label() {
    let health = HealthState::new(Duration::from_secs(30));
    let metrics = Arc::new(Metrics::new());
    metrics.observe_sync(Duration::from_millis(12));
    metrics.observe_queued();
    metrics.observe_programming_latency(Duration::from_secs(2));
    metrics.set_changes_pending(1, 3);
    metrics.count_changes(2, 6);
    metrics.set_map_fill("np_front4", 10, 65_536);
    metrics.set_map_fill("np_ct4", 262_144, 524_288);
    metrics.set_dataplane_source(Box::new(|| DataplaneSnapshot {
        counters: nodeport_common::Counter::ALL
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name(), i as u64, 100 * i as u64))
            .collect(),
        services: vec![ServiceTraffic {
            node_port: 30053,
            protocol: "UDP".into(),
            service: "kube-system/dns".into(),
            packets: 5,
            bytes: 400,
        }],
        sockets: nodeport_common::SockCounter::ALL
            .iter()
            .map(|c| (c.name(), 1))
            .collect(),
    }));
    let addr = start_proxy_server(health, metrics).await;
    // One probe so the healthz counter has a sample.
    assert_eq!(get(addr, "/healthz").await.unwrap().status, 200);

    let r = get(addr, "/metrics").await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        r.header("content-type")
    );
    for family in [
        "nodeport_sync_proxy_rules_duration_seconds histogram",
        "nodeport_sync_proxy_rules_last_timestamp_seconds gauge",
        "nodeport_sync_proxy_rules_last_queued_timestamp_seconds gauge",
        "nodeport_network_programming_duration_seconds histogram",
        "nodeport_sync_proxy_rules_endpoint_changes_pending gauge",
        "nodeport_sync_proxy_rules_service_changes_pending gauge",
        "nodeport_sync_proxy_rules_endpoint_changes counter",
        "nodeport_sync_proxy_rules_service_changes counter",
        "nodeport_proxy_healthz counter",
        "nodeport_map_entries gauge",
        "nodeport_map_capacity gauge",
        "nodeport_map_fill_ratio gauge",
        "nodeport_packets counter",
        "nodeport_bytes counter",
        "nodeport_service_packets counter",
        "nodeport_service_bytes counter",
    ] {
        let line = format!("# TYPE {family}");
        assert!(
            r.body.lines().any(|l| l == line),
            "no {line:?} in\n{}",
            r.body
        );
    }
    let mut samples = vec![
        "nodeport_sync_proxy_rules_duration_seconds_bucket{le=\"0.016\"} 1".to_owned(),
        "nodeport_network_programming_duration_seconds_bucket{le=\"2.0\"} 1".to_owned(),
        "nodeport_network_programming_duration_seconds_bucket{le=\"1.0\"} 0".to_owned(),
        "nodeport_sync_proxy_rules_service_changes_pending 1".to_owned(),
        "nodeport_sync_proxy_rules_endpoint_changes_pending 3".to_owned(),
        "nodeport_sync_proxy_rules_service_changes_total 2".to_owned(),
        "nodeport_sync_proxy_rules_endpoint_changes_total 6".to_owned(),
        "nodeport_proxy_healthz_total{code=\"200\"} 1".to_owned(),
        "nodeport_map_entries{map=\"np_front4\"} 10".to_owned(),
        "nodeport_map_capacity{map=\"np_ct4\"} 524288".to_owned(),
        "nodeport_map_fill_ratio{map=\"np_ct4\"} 0.5".to_owned(),
        "nodeport_service_packets_total{node_port=\"30053\",protocol=\"UDP\",service=\"kube-system/dns\"} 5".to_owned(),
        "nodeport_service_bytes_total{node_port=\"30053\",protocol=\"UDP\",service=\"kube-system/dns\"} 400".to_owned(),
    ];
    for (i, c) in nodeport_common::Counter::ALL.iter().enumerate() {
        samples.push(format!(
            "nodeport_packets_total{{reason=\"{}\"}} {i}",
            c.name()
        ));
        samples.push(format!(
            "nodeport_bytes_total{{reason=\"{}\"}} {}",
            c.name(),
            100 * i
        ));
    }
    for sample in &samples {
        assert!(
            r.body.lines().any(|l| l == sample),
            "no {sample:?} in\n{}",
            r.body
        );
    }
    let last_sync: f64 = r
        .body
        .lines()
        .find_map(|l| l.strip_prefix("nodeport_sync_proxy_rules_last_timestamp_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - last_sync).abs() < 60.0, "{last_sync} vs {now}");
}

/// A port free right now on 127.0.0.1 (bound to port 0, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind((LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn check(port: u16, ns: &str, name: &str, local: usize) -> (u16, String, String, usize) {
    (port, ns.to_owned(), name.to_owned(), local)
}

fn service_body(ns: &str, name: &str, local: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": \"{ns}\",\n\t\t\"name\": \"{name}\"\n\t}},\n\t\"localEndpoints\": {local},\n\t\"serviceProxyHealthy\": {healthy}\n}}"
    )
}

#[tokio::test]
async fn service_health_check_200_with_local_endpoints_503_without() {
    let health = HealthState::new(Duration::from_secs(30));
    let mut checks = HealthChecks::new(Some(LOCALHOST), health.clone());
    let (p1, p2) = (free_port(), free_port());
    checks
        .update(&[check(p1, "default", "web", 2), check(p2, "shop", "cart", 0)])
        .await;
    let mut ports = vec![p1, p2];
    ports.sort();
    assert_eq!(checks.ports(), ports);

    // Any path answers, as kube-proxy's handler is the whole server.
    for path in ["/", "/healthz", "/anything"] {
        let r = get(SocketAddr::new(LOCALHOST, p1), path).await.unwrap();
        assert_eq!(r.status, 200, "{path}");
        assert_json_headers(&r);
        assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("2"));
        assert_eq!(r.body, service_body("default", "web", 2, true));
    }
    let r = get(SocketAddr::new(LOCALHOST, p2), "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_json_headers(&r);
    assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("0"));
    assert_eq!(r.body, service_body("shop", "cart", 0, true));

    // Counts change in place.
    checks
        .update(&[check(p1, "default", "web", 0), check(p2, "shop", "cart", 3)])
        .await;
    let r = get(SocketAddr::new(LOCALHOST, p1), "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.body, service_body("default", "web", 0, true));
    let r = get(SocketAddr::new(LOCALHOST, p2), "/").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("3"));
    assert_eq!(r.body, service_body("shop", "cart", 3, true));
    checks.update(&[]).await;
}

#[tokio::test]
async fn service_health_checks_listen_on_exactly_the_bind_addresses() {
    // kube-proxy with --nodeport-addresses: each matching node address, never 0.0.0.0. Every
    // 127.0.0.0/8 address is local (lo), so three of them stand for a node's addresses.
    let ip = |last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
    let health = HealthState::new(Duration::from_secs(30));
    let mut checks = HealthChecks::new(None, health);
    checks.set_bind_ips(vec![ip(3), ip(2)]).await;
    let port = free_port();
    checks.update(&[check(port, "default", "lb", 1)]).await;
    assert_eq!(checks.ports(), [port]);
    let answers = |addrs: Vec<IpAddr>| async move {
        let mut out = Vec::new();
        for a in addrs {
            out.push(
                get(SocketAddr::new(a, port), "/")
                    .await
                    .map(|r| r.status)
                    .ok(),
            );
        }
        out
    };
    assert_eq!(
        answers(vec![ip(1), ip(2), ip(3)]).await,
        [None, Some(200), Some(200)],
        "127.0.0.1 is not a bind address"
    );
    // The node's addresses change: the port moves with them at the next update.
    checks.set_bind_ips(vec![ip(3)]).await;
    assert!(checks.ports().is_empty(), "closed until the next update");
    checks.update(&[check(port, "default", "lb", 1)]).await;
    assert_eq!(
        answers(vec![ip(1), ip(2), ip(3)]).await,
        [None, None, Some(200)]
    );
    // No address at all (none inside --nodeport-addresses): nothing listens.
    checks.set_bind_ips(Vec::new()).await;
    checks.update(&[check(port, "default", "lb", 1)]).await;
    assert!(checks.ports().is_empty());
    assert_eq!(answers(vec![ip(3)]).await, [None]);
}

#[tokio::test]
async fn service_health_check_503_when_the_proxy_is_unhealthy() {
    let clock = TestClock::new();
    let health = clock.state(Duration::from_secs(1));
    let mut checks = HealthChecks::new(Some(LOCALHOST), health.clone());
    let port = free_port();
    checks.update(&[check(port, "default", "web", 1)]).await;
    health.queued_update();
    clock.advance(Duration::from_secs(2));
    let r = get(SocketAddr::new(LOCALHOST, port), "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("1"));
    assert_eq!(r.body, service_body("default", "web", 1, false));
    // Node eligibility does not matter here (kube-proxy uses the proxier's health only).
    health.synced();
    health.set_node_eligible(false);
    let r = get(SocketAddr::new(LOCALHOST, port), "/").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, service_body("default", "web", 1, true));
    checks.update(&[]).await;
}

#[tokio::test]
async fn removing_a_check_closes_its_port_and_it_can_reopen() {
    let health = HealthState::new(Duration::from_secs(30));
    let mut checks = HealthChecks::new(Some(LOCALHOST), health);
    let (keep, drop_) = (free_port(), free_port());
    checks
        .update(&[check(keep, "a", "keep", 1), check(drop_, "b", "gone", 1)])
        .await;
    assert_eq!(
        get(SocketAddr::new(LOCALHOST, drop_), "/")
            .await
            .unwrap()
            .status,
        200
    );

    checks.update(&[check(keep, "a", "keep", 1)]).await;
    assert_eq!(checks.ports(), vec![keep]);
    let err = TcpStream::connect(SocketAddr::new(LOCALHOST, drop_))
        .await
        .expect_err("removed health check port still accepts connections");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(
        get(SocketAddr::new(LOCALHOST, keep), "/")
            .await
            .unwrap()
            .status,
        200
    );

    // Back again: the port is reopened.
    checks
        .update(&[check(keep, "a", "keep", 1), check(drop_, "b", "gone", 0)])
        .await;
    let r = get(SocketAddr::new(LOCALHOST, drop_), "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.body, service_body("b", "gone", 0, true));

    checks.update(&[]).await;
    assert!(checks.ports().is_empty());
    for port in [keep, drop_] {
        assert!(
            TcpStream::connect(SocketAddr::new(LOCALHOST, port))
                .await
                .is_err()
        );
    }
}

#[tokio::test]
async fn a_port_in_use_is_skipped_and_retried() {
    let health = HealthState::new(Duration::from_secs(30));
    let mut checks = HealthChecks::new(Some(LOCALHOST), health);
    let squatter = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = squatter.local_addr().unwrap().port();
    checks.update(&[check(port, "default", "web", 1)]).await;
    assert!(checks.ports().is_empty());
    drop(squatter);
    checks.update(&[check(port, "default", "web", 1)]).await;
    assert_eq!(checks.ports(), vec![port]);
    assert_eq!(
        get(SocketAddr::new(LOCALHOST, port), "/")
            .await
            .unwrap()
            .status,
        200
    );
    checks.update(&[]).await;
}
