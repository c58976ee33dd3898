//! Prometheus metrics, named like kube-proxy's (`pkg/proxy/metrics/metrics.go`) with a `nodeport_`
//! prefix instead of `kubeproxy_`, with the same suffixes, meaning and histogram buckets, so the
//! dashboards and alerts written for kube-proxy port by changing the prefix. On top of those: how
//! full each BPF map is, and the dataplane's own counters (per reason, per service), read from the
//! maps at scrape time.
//!
//! The exposition is OpenMetrics text (what `prometheus-client` writes: counters as `<name>_total`,
//! ending in `# EOF`), served with [`CONTENT_TYPE`].

use std::{
    fmt,
    sync::{Arc, RwLock, atomic::AtomicU64},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The prefix of every metric name (kube-proxy's is `kubeproxy`).
pub const PREFIX: &str = "nodeport";

/// kube-proxy's `sync_proxy_rules_duration_seconds` buckets: `ExponentialBuckets(0.001, 2, 15)`,
/// 1ms to ~16s.
pub fn sync_duration_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 15).collect()
}

/// kube-proxy's `network_programming_duration_seconds` buckets: `MergeBuckets` (which starts with
/// a 0 bucket) of 0.25s and 0.5s, 1s..59s by 1s, 60s..115s by 5s, 120s..300s by 30s.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.0, 0.25, 0.5];
    buckets.extend((1..=59).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

/// What the dataplane counted, read at scrape time (see [`Metrics::set_dataplane_source`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneSnapshot {
    /// `(nodeport_common::Counter::name(), packets, bytes)` for every counter.
    pub counters: Vec<(&'static str, u64, u64)>,
    pub services: Vec<ServiceTraffic>,
    /// `(nodeport_common::SockCounter::name(), calls)` for every socket counter.
    pub sockets: Vec<(&'static str, u64)>,
}

/// Traffic to one NodePort.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTraffic {
    pub node_port: u16,
    /// `TCP` or `UDP`, as in the Service spec.
    pub protocol: String,
    /// `namespace/name` (empty when the port no longer belongs to a known service).
    pub service: String,
    pub packets: u64,
    pub bytes: u64,
}

type DataplaneSource = Box<dyn Fn() -> DataplaneSnapshot + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// The agent's metrics. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    last_queued: Gauge<f64, AtomicU64>,
    network_programming: Histogram,
    endpoint_changes_pending: Gauge,
    service_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    service_changes_total: Counter,
    healthz_total: Family<CodeLabels, Counter>,
    livez_total: Family<CodeLabels, Counter>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    map_fill_ratio: Family<MapLabels, Gauge<f64, AtomicU64>>,
    snat_ports_used_max: Gauge,
    snat_ports: Gauge,
    table_count_duration: Gauge<f64, AtomicU64>,
    invalid_objects: Family<KindLabels, Gauge>,
    dataplane: Arc<DataplaneCollector>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let sync_duration = Histogram::new(sync_duration_buckets());
        let last_sync = Gauge::<f64, AtomicU64>::default();
        let last_queued = Gauge::<f64, AtomicU64>::default();
        let network_programming = Histogram::new(network_programming_buckets());
        let endpoint_changes_pending = Gauge::default();
        let service_changes_pending = Gauge::default();
        let endpoint_changes_total = Counter::default();
        let service_changes_total = Counter::default();
        let healthz_total = Family::<CodeLabels, Counter>::default();
        let livez_total = Family::<CodeLabels, Counter>::default();
        let map_entries = Family::<MapLabels, Gauge>::default();
        let map_capacity = Family::<MapLabels, Gauge>::default();
        let map_fill_ratio = Family::<MapLabels, Gauge<f64, AtomicU64>>::default();
        let snat_ports_used_max = Gauge::default();
        let snat_ports = Gauge::default();
        let table_count_duration = Gauge::<f64, AtomicU64>::default();
        let invalid_objects = Family::<KindLabels, Gauge>::default();
        let dataplane = Arc::new(DataplaneCollector::default());

        // Names and help texts as kube-proxy's, minus the `kubeproxy_` prefix (added by the
        // registry as `nodeport_`; counters get their `_total` from the encoder).
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            last_sync.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            last_queued.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            network_programming.clone(),
        );
        registry.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            endpoint_changes_pending.clone(),
        );
        registry.register(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            service_changes_pending.clone(),
        );
        registry.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            endpoint_changes_total.clone(),
        );
        registry.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            service_changes_total.clone(),
        );
        registry.register(
            "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            healthz_total.clone(),
        );
        registry.register(
            "proxy_livez",
            "Cumulative proxy livez HTTP status",
            livez_total.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in a BPF map at the last sync",
            map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Maximum entries of a BPF map",
            map_capacity.clone(),
        );
        registry.register(
            "map_fill_ratio",
            "Entries over maximum entries of a BPF map (0..1)",
            map_fill_ratio.clone(),
        );
        registry.register(
            "snat_ports_used_max",
            "SNAT ports held by live flows for the busiest (node address, backend, protocol), at the last count; new flows to it drop (drop_snat_exhausted) when it reaches nodeport_snat_ports",
            snat_ports_used_max.clone(),
        );
        registry.register(
            "snat_ports",
            "Size of the SNAT port range (--snat-ports): concurrent flows per (node address, backend, protocol)",
            snat_ports.clone(),
        );
        registry.register(
            "table_count_duration_seconds",
            "Time the last periodic count of the connection-tracking tables took",
            table_count_duration.clone(),
        );
        registry.register(
            "invalid_objects",
            "Objects with a problem (logged with their name) that are ignored in whole or in part, by kind, at the last sync",
            invalid_objects.clone(),
        );
        registry.register_collector(Box::new(dataplane.clone()));

        Self {
            registry,
            sync_duration,
            last_sync,
            last_queued,
            network_programming,
            endpoint_changes_pending,
            service_changes_pending,
            endpoint_changes_total,
            service_changes_total,
            healthz_total,
            livez_total,
            map_entries,
            map_capacity,
            map_fill_ratio,
            snat_ports_used_max,
            snat_ports,
            table_count_duration,
            invalid_objects,
            dataplane,
        }
    }

    /// Objects with problems at the last sync: `(kind, objects)` for every kind watched, zeros
    /// included, so an alert can watch one series per kind.
    pub fn set_invalid_objects(&self, counts: &[(&str, usize)]) {
        for (kind, objects) in counts {
            let labels = KindLabels {
                kind: (*kind).to_owned(),
            };
            self.invalid_objects
                .get_or_create(&labels)
                .set(saturating_i64(*objects as u64));
        }
    }

    /// One successful sync of the maps took `duration`: observed in the duration histogram, and
    /// the last-sync timestamp set to now.
    pub fn observe_sync(&self, duration: Duration) {
        self.observe_sync_at(duration, SystemTime::now());
    }

    /// [`observe_sync`](Self::observe_sync) with the wall-clock time of the sync given.
    pub fn observe_sync_at(&self, duration: Duration, now: SystemTime) {
        self.sync_duration.observe(duration.as_secs_f64());
        self.last_sync.set(unix_seconds(now));
    }

    /// A sync was requested (a change arrived): sets the last-queued timestamp to now. If it is
    /// much later than the last-sync timestamp, the sync loop is stuck.
    pub fn observe_queued(&self) {
        self.last_queued.set(unix_seconds(SystemTime::now()));
    }

    /// The time from a change arriving (or being made, when its object says when) to the maps
    /// holding it.
    pub fn observe_programming_latency(&self, latency: Duration) {
        self.network_programming.observe(latency.as_secs_f64());
    }

    /// Changes received but not yet written to the maps (kube-proxy's two `*_changes_pending`
    /// gauges).
    pub fn set_changes_pending(&self, services: u64, endpoints: u64) {
        self.service_changes_pending.set(saturating_i64(services));
        self.endpoint_changes_pending.set(saturating_i64(endpoints));
    }

    /// Adds to the cumulative change counters (kube-proxy's `*_changes_total`).
    pub fn count_changes(&self, services: u64, endpoints: u64) {
        self.service_changes_total.inc_by(services);
        self.endpoint_changes_total.inc_by(endpoints);
    }

    /// How full one map is (`map` is its name, e.g. `np_ct4`).
    pub fn set_map_fill(&self, map: &str, entries: u64, capacity: u64) {
        let labels = MapLabels {
            map: map.to_owned(),
        };
        self.map_entries
            .get_or_create(&labels)
            .set(saturating_i64(entries));
        self.map_capacity
            .get_or_create(&labels)
            .set(saturating_i64(capacity));
        let ratio = if capacity == 0 {
            0.0
        } else {
            entries as f64 / capacity as f64
        };
        self.map_fill_ratio.get_or_create(&labels).set(ratio);
    }

    /// The result of a periodic [`count_tables`]: fill of the connection-tracking tables and the
    /// SNAT pressure.
    pub fn set_table_pressure(&self, p: &TablePressure) {
        self.set_map_fill(
            nodeport_common::map_names::CONNTRACK,
            p.conntrack_entries,
            p.conntrack_capacity,
        );
        self.set_map_fill(
            nodeport_common::map_names::REV_NAT,
            p.rev_nat_entries,
            p.rev_nat_capacity,
        );
        self.snat_ports_used_max
            .set(saturating_i64(p.snat_ports_used_max));
        self.snat_ports.set(saturating_i64(p.snat_ports));
        self.table_count_duration.set(p.took.as_secs_f64());
    }

    /// Installs the function that reads the dataplane's counters; it runs on every scrape.
    /// Without one, the dataplane families are absent.
    pub fn set_dataplane_source(&self, f: Box<dyn Fn() -> DataplaneSnapshot + Send + Sync>) {
        *self
            .dataplane
            .source
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Counts one `/healthz` answer by status code (kube-proxy's `proxy_healthz_total{code}`).
    pub fn count_healthz(&self, code: u16) {
        self.healthz_total
            .get_or_create(&CodeLabels {
                code: code.to_string(),
            })
            .inc();
    }

    /// Counts one `/livez` answer by status code (kube-proxy's `proxy_livez_total{code}`).
    pub fn count_livez(&self, code: u16) {
        self.livez_total
            .get_or_create(&CodeLabels {
                code: code.to_string(),
            })
            .inc();
    }

    /// The whole exposition, OpenMetrics text (see [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail, and our collector returns only the writer's errors.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding metrics into a String");
        out
    }
}

/// How full the connection-tracking tables are, and how close the busiest SNAT port range is to
/// exhaustion.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TablePressure {
    pub conntrack_entries: u64,
    /// The pinned map's real `max_entries` (`--conntrack-entries`), not the object's default.
    pub conntrack_capacity: u64,
    pub rev_nat_entries: u64,
    pub rev_nat_capacity: u64,
    /// Live (unexpired) source-NATed flows of the busiest (node address, backend address,
    /// backend port, protocol): each holds one port of the range.
    pub snat_ports_used_max: u64,
    pub snat_ports: u64,
    pub took: Duration,
}

/// Counts the pinned connection-tracking tables in `dir`. Walking an LRU map from userspace
/// costs a syscall or two per entry (the kernel exposes no element count to userspace), so this
/// runs periodically on a blocking thread, never per scrape (its cost is measured in
/// docs/RELIABILITY.md and exported as `table_count_duration_seconds`).
pub fn count_tables(dir: &std::path::Path, now_ns: u64) -> Result<TablePressure, crate::Error> {
    use std::collections::HashMap;

    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use nodeport_common::{CT_SNAT, CtEntry, FlowKey, RevNat, map_names};

    let started = std::time::Instant::now();
    let map_err = |name: &str| {
        let name = name.to_owned();
        move |source| crate::Error::Map {
            name: name.clone(),
            source,
        }
    };
    let open = |name: &str| -> Result<Map, crate::Error> {
        let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
        Map::from_map_data(data).map_err(map_err(name))
    };
    let cfg = crate::tables::ServiceTables::open(dir)?.config()?;
    let conntrack_capacity = crate::loader::pinned_max_entries(dir, map_names::CONNTRACK)?;
    let rev_nat_capacity = crate::loader::pinned_max_entries(dir, map_names::REV_NAT)?;

    // The programs insert and the LRU evicts while we walk: an entry can vanish between
    // get_next_key and the lookup (skipped), and when the key we stand on is evicted the kernel
    // restarts the walk from the first bucket. The walk is bounded to twice the capacity, and
    // the counts to the capacity, so churn can neither hang nor inflate it.
    let conntrack: BpfHashMap<MapData, FlowKey, CtEntry> =
        open(map_names::CONNTRACK)?
            .try_into()
            .map_err(map_err(map_names::CONNTRACK))?;
    let mut conntrack_entries = 0u64;
    let mut per_pair: HashMap<(u32, u32, u16, u8), u64> = HashMap::new();
    for (key, ct) in conntrack
        .iter()
        .take(2 * conntrack_capacity as usize)
        .flatten()
    {
        conntrack_entries += 1;
        if ct.flags & CT_SNAT != 0 && ct.expires_ns > now_ns {
            *per_pair
                .entry((ct.nat_addr, ct.backend_addr, ct.backend_port, key.proto))
                .or_default() += 1;
        }
    }
    let rev_nat: BpfHashMap<MapData, FlowKey, RevNat> = open(map_names::REV_NAT)?
        .try_into()
        .map_err(map_err(map_names::REV_NAT))?;
    let rev_nat_entries = rev_nat
        .keys()
        .take(2 * rev_nat_capacity as usize)
        .flatten()
        .count() as u64;
    let snat_ports = if cfg.snat_port_min == 0 || cfg.snat_port_max < cfg.snat_port_min {
        0
    } else {
        u64::from(cfg.snat_port_max - cfg.snat_port_min) + 1
    };
    Ok(TablePressure {
        conntrack_entries: conntrack_entries.min(u64::from(conntrack_capacity)),
        conntrack_capacity: u64::from(conntrack_capacity),
        rev_nat_entries: rev_nat_entries.min(u64::from(rev_nat_capacity)),
        rev_nat_capacity: u64::from(rev_nat_capacity),
        snat_ports_used_max: per_pair
            .values()
            .copied()
            .max()
            .unwrap_or(0)
            .min(snat_ports),
        snat_ports,
        took: started.elapsed(),
    })
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads the dataplane counters at scrape time.
#[derive(Default)]
struct DataplaneCollector {
    source: RwLock<Option<DataplaneSource>>,
}

impl fmt::Debug for DataplaneCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataplaneCollector").finish_non_exhaustive()
    }
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshot = {
            let source = self.source.read().unwrap_or_else(|e| e.into_inner());
            match source.as_ref() {
                Some(f) => f(),
                None => return Ok(()),
            }
        };
        let counter_type = ConstCounter::new(0u64).metric_type();

        if !snapshot.counters.is_empty() {
            for (name, help, pick) in [
                (
                    "packets",
                    "Packets the dataplane handled, by outcome (reasons starting with drop_ were dropped)",
                    0usize,
                ),
                (
                    "bytes",
                    "Bytes the dataplane handled, by outcome (reasons starting with drop_ were dropped)",
                    1,
                ),
            ] {
                let mut metric = encoder.encode_descriptor(name, help, None, counter_type)?;
                for &(reason, packets, bytes) in &snapshot.counters {
                    let value = if pick == 0 { packets } else { bytes };
                    let labels = [("reason", reason)];
                    ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
                }
            }
        }

        if !snapshot.sockets.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "socket_lb_calls",
                "Socket calls (connect, sendmsg, recvmsg, getpeername) of the node's own processes \
                 and pods the socket programs handled, by outcome",
                None,
                counter_type,
            )?;
            for &(result, calls) in &snapshot.sockets {
                ConstCounter::new(calls).encode(metric.encode_family(&[("result", result)])?)?;
            }
        }

        if !snapshot.services.is_empty() {
            for (name, help, pick) in [
                (
                    "service_packets",
                    "Packets sent to a NodePort and translated by the dataplane",
                    0usize,
                ),
                (
                    "service_bytes",
                    "Bytes sent to a NodePort and translated by the dataplane",
                    1,
                ),
            ] {
                let mut metric = encoder.encode_descriptor(name, help, None, counter_type)?;
                for s in &snapshot.services {
                    let value = if pick == 0 { s.packets } else { s.bytes };
                    let port = s.node_port.to_string();
                    let labels = [
                        ("node_port", port.as_str()),
                        ("protocol", s.protocol.as_str()),
                        ("service", s.service.as_str()),
                    ];
                    ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_kube_proxy() {
        let sync = sync_duration_buckets();
        assert_eq!(sync.len(), 15);
        assert_eq!(sync[0], 0.001);
        assert!((sync[14] - 16.384).abs() < 1e-9);

        let np = network_programming_buckets();
        assert_eq!(np.len(), 1 + 2 + 59 + 12 + 7);
        assert_eq!(&np[..4], &[0.0, 0.25, 0.5, 1.0]);
        assert_eq!(np[61], 59.0);
        assert_eq!(np[62], 60.0);
        assert_eq!(np[73], 115.0);
        assert_eq!(np[74], 120.0);
        assert_eq!(*np.last().unwrap(), 300.0);
        assert!(np.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn encodes_every_family_with_labels() {
        let m = Metrics::new();
        m.observe_sync_at(
            Duration::from_millis(3),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        m.observe_programming_latency(Duration::from_millis(700));
        m.set_changes_pending(2, 5);
        m.count_changes(1, 4);
        m.set_map_fill("np_ct4", 1024, 4096);
        m.count_healthz(200);
        m.set_invalid_objects(&[("Service", 2), ("EndpointSlice", 0)]);
        m.set_dataplane_source(Box::new(|| DataplaneSnapshot {
            counters: vec![("new_flow", 10, 1000), ("drop_no_backend", 3, 180)],
            services: vec![ServiceTraffic {
                node_port: 30080,
                protocol: "TCP".into(),
                service: "default/web".into(),
                packets: 7,
                bytes: 700,
            }],
            sockets: vec![("sock_translated", 5)],
        }));
        let text = m.encode();
        for line in [
            "# TYPE nodeport_sync_proxy_rules_duration_seconds histogram",
            "nodeport_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "nodeport_sync_proxy_rules_duration_seconds_count 1",
            "nodeport_sync_proxy_rules_last_timestamp_seconds 1700000000.0",
            "# TYPE nodeport_sync_proxy_rules_last_queued_timestamp_seconds gauge",
            "nodeport_network_programming_duration_seconds_bucket{le=\"0.5\"} 0",
            "nodeport_network_programming_duration_seconds_bucket{le=\"1.0\"} 1",
            "nodeport_sync_proxy_rules_service_changes_pending 2",
            "nodeport_sync_proxy_rules_endpoint_changes_pending 5",
            "nodeport_sync_proxy_rules_service_changes_total 1",
            "nodeport_sync_proxy_rules_endpoint_changes_total 4",
            "nodeport_proxy_healthz_total{code=\"200\"} 1",
            "nodeport_map_entries{map=\"np_ct4\"} 1024",
            "nodeport_map_capacity{map=\"np_ct4\"} 4096",
            "nodeport_map_fill_ratio{map=\"np_ct4\"} 0.25",
            "# TYPE nodeport_packets counter",
            "nodeport_packets_total{reason=\"new_flow\"} 10",
            "nodeport_packets_total{reason=\"drop_no_backend\"} 3",
            "nodeport_bytes_total{reason=\"drop_no_backend\"} 180",
            "nodeport_socket_lb_calls_total{result=\"sock_translated\"} 5",
            "nodeport_invalid_objects{kind=\"Service\"} 2",
            "nodeport_invalid_objects{kind=\"EndpointSlice\"} 0",
            "nodeport_service_packets_total{node_port=\"30080\",protocol=\"TCP\",service=\"default/web\"} 7",
            "nodeport_service_bytes_total{node_port=\"30080\",protocol=\"TCP\",service=\"default/web\"} 700",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn table_pressure_is_exported() {
        let m = Metrics::new();
        m.set_table_pressure(&TablePressure {
            conntrack_entries: 4000,
            conntrack_capacity: 4096,
            rev_nat_entries: 3999,
            rev_nat_capacity: 4096,
            snat_ports_used_max: 64,
            snat_ports: 64,
            took: Duration::from_millis(25),
        });
        let text = m.encode();
        for line in [
            "nodeport_map_entries{map=\"np_ct4\"} 4000",
            "nodeport_map_capacity{map=\"np_ct4\"} 4096",
            "nodeport_map_entries{map=\"np_rnat4\"} 3999",
            "nodeport_snat_ports_used_max 64",
            "nodeport_snat_ports 64",
            "nodeport_table_count_duration_seconds 0.025",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn dataplane_families_absent_without_source() {
        let text = Metrics::new().encode();
        assert!(!text.contains("nodeport_packets"), "{text}");
        assert!(text.contains("nodeport_sync_proxy_rules_duration_seconds"));
    }
}
