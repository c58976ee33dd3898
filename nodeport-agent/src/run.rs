//! `nodeport-agent run`: load and attach the dataplane, follow cluster state from one source,
//! and keep the maps equal to what kube-proxy's rules would give, incrementally.
//!
//! Level-triggered: every sync computes the whole desired state from the whole cluster state and
//! writes only the difference, so a missed or repeated event cannot leave the maps wrong. Events
//! are debounced (a burst becomes one sync), and a periodic full resync re-reads the maps and
//! repairs any drift. Nothing is written before every watched kind has delivered its first
//! snapshot. On exit the dataplane stays loaded and pinned: connections keep flowing, and the
//! next agent adopts the maps (ids and conntrack included) instead of starting over.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use nodeport_common::Config;
use tokio::{signal::unix::SignalKind, sync::mpsc, time::sleep_until};
use tracing::{info, warn};

use crate::{
    AttachPlan, Dataplane, Ingress, PinLayout, TcBackend,
    http::{HealthChecks, HealthState, serve_health_and_metrics},
    inspect,
    metrics::{DataplaneSnapshot, Metrics, ServiceTraffic},
    model::{
        ClusterState, Kind, SourceEvent,
        desired::{Desired, FrontendId, SemanticsConfig, desired},
    },
    source,
    stats::Stats,
    sync::{
        Syncer,
        apply::{Want, WantService},
    },
    tables::{ServiceTables, monotonic_ns},
};

/// Where cluster state comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of Kubernetes YAML manifests, followed for changes.
    Manifests(PathBuf),
    /// The Kubernetes API: in-cluster config, or this kubeconfig.
    Kube(Option<PathBuf>),
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub node_name: String,
    pub interfaces: Vec<String>,
    pub ingress: Ingress,
    pub tc_backend: TcBackend,
    /// cgroup v2 directory for socket load balancing (`--cgroup`); `None` detaches it.
    pub cgroup: Option<PathBuf>,
    pub source: Source,
    pub nodeport_cidrs: Vec<Ipv4Net>,
    pub nodeport_range: RangeInclusive<u16>,
    pub pin_root: PathBuf,
    pub snat_ports: RangeInclusive<u16>,
    pub health_addr: SocketAddr,
    /// Full resync period (kube-proxy's --iptables-sync-period, 30 s by default).
    pub sync_period: Duration,
    /// Shortest time between two syncs: changes arriving meanwhile are batched.
    pub min_sync_period: Duration,
    pub conntrack: Config,
    /// Sizes of the connection-tracking tables (`--conntrack-entries`, `--rev-nat-entries`).
    pub table_sizes: crate::loader::TableSizes,
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let layout = PinLayout::new(&cfg.pin_root);
    let sizes = cfg.table_sizes;
    let mut dataplane = Dataplane::load_sized(&layout, &sizes).map_err(|e| {
        let hint = if crate::loader::TableSizes::is_size_mismatch(&e) {
            format!(
                " with --conntrack-entries {} --rev-nat-entries {}: the maps pinned under {} were \
                 created with another size and keep it; pass their size, or stop the agent and run \
                 `nodeport-agent unload --pin-root {}` first (tracked connections are lost)",
                sizes.conntrack,
                sizes.rev_nat,
                layout.dir().display(),
                layout.root().display()
            )
        } else {
            String::new()
        };
        anyhow::Error::new(e).context(format!("loading the dataplane{hint}"))
    })?;
    let plan = AttachPlan {
        ingress: cfg.ingress,
        egress: true,
        tc_backend: cfg.tc_backend,
    };
    for iface in &cfg.interfaces {
        for done in dataplane
            .attach_interface(iface, &plan)
            .with_context(|| format!("attaching to {iface}"))?
        {
            info!(%done, "attached");
        }
    }
    match &cfg.cgroup {
        Some(cgroup) => {
            for done in dataplane
                .attach_cgroup(cgroup)
                .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?
            {
                info!(%done, "attached");
            }
        }
        None => {
            for dir in crate::cgroup::detach_all(&layout)? {
                info!(links = %dir.display(), "socket load balancing detached (no --cgroup)");
            }
        }
    }
    let mut tables = ServiceTables::open(&layout.dir())?;
    tables.set_config(&Config {
        snat_port_min: *cfg.snat_ports.start(),
        snat_port_max: *cfg.snat_ports.end(),
        ..cfg.conntrack
    })?;
    let mut syncer = Syncer::adopt(tables).context("adopting the pinned maps")?;
    info!(
        services = syncer.current().services.len(),
        backends = syncer.current().backends.len(),
        "adopted the pinned maps"
    );

    let metrics = Arc::new(Metrics::new());
    let counters_layout = layout.clone();
    let services_dir = layout.dir();
    // Service id -> "namespace/name:port", refreshed at every sync, for the metrics' labels.
    let names: ServiceNames = Arc::default();
    let scrape_names = names.clone();
    metrics.set_dataplane_source(Box::new(move || {
        dataplane_snapshot(&counters_layout, &services_dir, &scrape_names)
    }));
    let health = HealthState::new(cfg.sync_period);
    tokio::spawn({
        let (health, metrics, addr) = (health.clone(), metrics.clone(), cfg.health_addr);
        async move {
            if let Err(e) = serve_health_and_metrics(addr, health, metrics).await {
                warn!(%addr, error = %e, "health and metrics server stopped");
            }
        }
    });
    let mut health_checks = HealthChecks::new(None, health.clone());

    let (tx, mut rx) = mpsc::channel(1024);
    match cfg.source.clone() {
        Source::Manifests(dir) => {
            info!(dir = %dir.display(), "following manifests");
            tokio::spawn(source::manifests::run(dir, tx, Duration::from_millis(500)));
        }
        Source::Kube(kubeconfig) => {
            let client = source::kube::client(kubeconfig.as_deref())
                .await
                .context("connecting to the Kubernetes API")?;
            info!("watching the Kubernetes API");
            tokio::spawn(source::kube::run(client, cfg.node_name.clone(), tx));
        }
    }

    let semantics = SemanticsConfig {
        node_name: cfg.node_name.clone(),
        nodeport_cidrs: cfg.nodeport_cidrs.clone(),
        nodeport_range: cfg.nodeport_range.clone(),
    };
    let mut state = ClusterState::default();
    let mut reported = BTreeSet::new();
    // When the oldest change not yet in the maps arrived, and how many there are.
    let mut pending: Option<Instant> = None;
    let (mut service_changes, mut endpoint_changes) = (0u64, 0u64);
    let mut last_sync = Instant::now() - cfg.min_sync_period;
    let mut resync = tokio::time::interval(cfg.sync_period);
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut waiting_logged = false;
    let mut counting: Option<tokio::task::JoinHandle<Duration>> = None;
    let mut next_count = Instant::now();
    loop {
        let debounce = async {
            match pending {
                Some(_) => sleep_until((last_sync + cfg.min_sync_period).into()).await,
                None => std::future::pending().await,
            }
        };
        let full = tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { anyhow::bail!("the cluster state source stopped") };
                let kind = match &event {
                    SourceEvent::Snapshot(kind, _) => *kind,
                    SourceEvent::Applied(o) | SourceEvent::Deleted(o) => o.kind(),
                };
                if state.apply(event) {
                    pending.get_or_insert_with(Instant::now);
                    health.queued_update();
                    match kind {
                        Kind::Service => service_changes += 1,
                        Kind::EndpointSlice => endpoint_changes += 1,
                        Kind::Node => {
                            if let Some(node) = state.nodes.values().find(|n| n.metadata.name.as_deref() == Some(cfg.node_name.as_str())) {
                                health.sync_node(node);
                            }
                        }
                    }
                    metrics.count_changes(u64::from(kind == Kind::Service), u64::from(kind == Kind::EndpointSlice));
                    metrics.set_changes_pending(service_changes, endpoint_changes);
                }
                continue;
            }
            _ = debounce => false,
            _ = resync.tick() => true,
            _ = sweep.tick() => {
                // Sweeping and counting each walk the whole tables (~5 s for 524,288 flows): on
                // a blocking thread with its own handles on the pinned maps, never on this loop
                // (a sync must not wait for them), one walk at a time, and for at most about a
                // tenth of the time.
                if let Some(h) = counting.take_if(|h| h.is_finished()) {
                    let took = h.await.unwrap_or_default();
                    next_count = Instant::now() + took * 9;
                }
                if counting.is_none() && Instant::now() >= next_count {
                    let (dir, metrics) = (layout.dir(), metrics.clone());
                    counting = Some(tokio::task::spawn_blocking(move || {
                        let swept = crate::tables::ServiceTables::open(&dir)
                            .and_then(|mut t| t.sweep_expired(monotonic_ns()));
                        match swept {
                            Ok(0) => {}
                            Ok(n) => info!(flows = n, "swept expired connections"),
                            Err(e) => warn!(error = %e, "sweeping expired connections"),
                        }
                        match crate::metrics::count_tables(&dir, monotonic_ns()) {
                            Ok(p) => {
                                metrics.set_table_pressure(&p);
                                p.took
                            }
                            Err(e) => {
                                warn!(error = %e, "counting the connection-tracking tables");
                                Duration::ZERO
                            }
                        }
                    }));
                }
                continue;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        if !state.synced(&Kind::ALL) {
            if !waiting_logged {
                info!("waiting for the first full snapshot of every watched kind before writing");
                waiting_logged = true;
            }
            continue;
        }
        let started = Instant::now();
        let want_state = desired(&state, &semantics);
        for p in &want_state.problems {
            if reported.insert(p.to_string()) {
                warn!(object = %p.object, problem = %p.message, "ignoring invalid configuration");
            }
        }
        reported.retain(|p: &String| want_state.problems.iter().any(|q| q.to_string() == *p));
        metrics.set_invalid_objects(&invalid_objects(&want_state.problems));
        let want = to_want(&want_state);
        let report = if full {
            syncer.resync(&want)
        } else {
            syncer.sync(&want)
        };
        for e in &report.errors {
            warn!(error = %e, "map write failed; retried at the next sync");
        }
        last_sync = Instant::now();
        metrics.observe_sync(started.elapsed());
        if let Some(first) = pending.take() {
            metrics.observe_programming_latency(first.elapsed());
        }
        (service_changes, endpoint_changes) = (0, 0);
        metrics.set_changes_pending(0, 0);
        if report.errors.is_empty() {
            health.synced();
        }
        let checks: Vec<(u16, String, String, usize)> = want_state
            .health_checks
            .iter()
            .map(|h| {
                (
                    h.node_port,
                    h.service.namespace.clone(),
                    h.service.name.clone(),
                    h.local_endpoints,
                )
            })
            .collect();
        if !cfg.nodeport_cidrs.is_empty() {
            // kube-proxy: with --nodeport-addresses, health check ports listen on the node's
            // matching addresses only (the set nodePorts are served on).
            let ips = want_state
                .node_addrs
                .iter()
                .map(|a| IpAddr::V4(*a))
                .collect();
            health_checks.set_bind_ips(ips).await;
        }
        health_checks.update(&checks).await;
        if let Ok(mut names) = names.write() {
            *names = syncer
                .current()
                .services
                .iter()
                .filter_map(|(key, entry)| {
                    let d = want_state.services.get(&FrontendId {
                        node_port: key.0,
                        proto: key.1,
                    })?;
                    let port = if d.port_name.is_empty() {
                        key.0.to_string()
                    } else {
                        d.port_name.clone()
                    };
                    Some((entry.svc_id, format!("{}:{port}", d.service)))
                })
                .collect();
        }
        // The small service maps from what the syncer wrote; the connection-tracking tables are
        // counted periodically (count_tables at the sweep), walking them at every sync would
        // delay syncs by the size of the tables.
        let current = syncer.current();
        metrics.set_map_fill(
            nodeport_common::map_names::FRONTENDS,
            current.services.len() as u64,
            u64::from(nodeport_common::capacity::FRONTENDS),
        );
        metrics.set_map_fill(
            nodeport_common::map_names::BACKENDS,
            current.backends.len() as u64,
            u64::from(nodeport_common::capacity::BACKENDS),
        );
        if report.writes > 0 || full {
            info!(
                writes = report.writes,
                services = want.services.len(),
                full,
                took_ms = started.elapsed().as_millis() as u64,
                "synced"
            );
        }
    }
    info!("stopping: the dataplane stays loaded and pinned; the next agent adopts it");
    Ok(())
}

/// The id-free map content for `desired`.
pub fn to_want(d: &Desired) -> Want {
    Want {
        node_addrs: d.node_addrs.clone(),
        services: d
            .services
            .iter()
            .map(|(f, s)| {
                (
                    (f.node_port, f.proto),
                    WantService {
                        flags: s.flags(),
                        affinity_timeout_s: s.affinity_timeout_s.unwrap_or(0),
                        backends: s.backends.iter().map(|b| b.entry(f.proto)).collect(),
                        cluster_backends: s
                            .cluster_backends
                            .iter()
                            .map(|b| b.entry(f.proto))
                            .collect(),
                        draining: s.draining.iter().map(|b| b.entry(f.proto)).collect(),
                    },
                )
            })
            .collect(),
    }
}

/// Distinct objects with problems, per watched kind (`Problem::object` is "<Kind> <key>").
fn invalid_objects(problems: &[crate::model::desired::Problem]) -> Vec<(&'static str, usize)> {
    ["Service", "EndpointSlice", "Node"]
        .into_iter()
        .map(|kind| {
            let objects: BTreeSet<&str> = problems
                .iter()
                .map(|p| p.object.as_str())
                .filter(|o| o.split_once(' ').is_some_and(|(k, _)| k == kind))
                .collect();
            (kind, objects.len())
        })
        .collect()
}

type ServiceNames = Arc<std::sync::RwLock<std::collections::BTreeMap<u32, String>>>;

fn dataplane_snapshot(
    layout: &PinLayout,
    dir: &std::path::Path,
    names: &ServiceNames,
) -> DataplaneSnapshot {
    let names = names.read().map(|n| n.clone()).unwrap_or_default();
    let stats = Stats::read_pinned(layout).ok();
    let counters = stats
        .iter()
        .flat_map(|s| s.iter().map(|(c, t)| (c.name(), t.packets, t.bytes)))
        .collect();
    let sockets = stats
        .iter()
        .flat_map(|s| s.sock_iter().map(|(c, n)| (c.name(), n)))
        .collect();
    let services = ServiceTables::open(dir)
        .and_then(|t| inspect::services(&t))
        .map(|rows| {
            rows.into_iter()
                .map(|r| ServiceTraffic {
                    node_port: r.node_port,
                    protocol: r.protocol,
                    service: names
                        .get(&r.service_id)
                        .cloned()
                        .unwrap_or_else(|| format!("id {}", r.service_id)),
                    packets: r.packets,
                    bytes: r.bytes,
                })
                .collect()
        })
        .unwrap_or_default();
    DataplaneSnapshot {
        counters,
        services,
        sockets,
    }
}
