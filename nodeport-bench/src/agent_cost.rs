//! The agent's own cost (docs/BENCHMARKS.md): time to first full sync and resident memory at
//! 1,000 and 10,000 services, and change-to-map latency (p50, p99) of endpoint updates.
//!
//! For each service count and each source the real `nodeport-agent run` runs in a fresh network
//! namespace (attached to a veth there, maps pinned under its own bpffs directory), given N
//! NodePort Services with one EndpointSlice of [`AgentCostOptions::endpoints_per_service`]
//! endpoints each, through one of its two sources ([`AgentSource`]):
//!
//! - manifests: `--manifests DIR`, the objects in YAML files (Services in one file, slices 100 to
//!   a file);
//! - kube: `--kubeconfig F`, the objects listed and watched from a fake API server
//!   (fake-apiserver: the real list/watch protocol over HTTP, in the same namespace, on its own
//!   two threads).
//!
//! Measured:
//!
//! - first sync: from spawning the process until its `/healthz` reports a first successful sync
//!   (`status.IPv4.lastUpdated`, which the agent sets only after writing the maps), then checked
//!   against the pinned maps (all N frontends there, each with its endpoints);
//! - memory: `VmRSS` of the agent after that sync (and `VmHWM`, its peak), and again after the
//!   updates;
//! - update latency: one endpoint address of one slice changed (manifests: the slice file written
//!   whole and renamed over the old one; kube: the slice replaced on the fake server, which sends
//!   a MODIFIED watch event), timed until the pinned maps hold the new backend for that service's
//!   frontend (looked up directly in the maps: frontend, its slots, their backends). The manifests
//!   source polls its directory every 500 ms and loads a change once two polls read the same, so
//!   its latency includes 0.5-1 s of polling; the agent's own part (from the event reaching the
//!   sync loop to the maps written, kube-proxy's `network_programming_duration_seconds`) is read
//!   from its `/metrics` and reported apart.
use std::{
    fmt::Write as _,
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{HashMap, Map, MapData};
use fake_apiserver::{Fake, Res, ServerInNetns};
use nodeport_common::{
    Backend, BackendKey, Frontend, FrontendKey, IPPROTO_TCP, Slot, SlotKey, map_names,
};

/// What to measure.
pub struct AgentCostOptions {
    /// The `nodeport-agent` binary.
    pub agent: PathBuf,
    /// One measurement per count.
    pub service_counts: Vec<usize>,
    pub endpoints_per_service: usize,
    /// Endpoint updates timed per count.
    pub updates: usize,
    /// Each count is measured through each of these.
    pub sources: Vec<AgentSource>,
}

/// Where the agent reads the cluster from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentSource {
    /// `--manifests DIR`: YAML files, polled.
    Manifests,
    /// `--kubeconfig F`: list and watch from a (fake) API server.
    Kube,
}

impl AgentSource {
    /// `manifests`, `kube` or `both`.
    pub fn parse_list(s: &str) -> anyhow::Result<Vec<Self>> {
        match s {
            "manifests" => Ok(vec![Self::Manifests]),
            "kube" => Ok(vec![Self::Kube]),
            "both" => Ok(vec![Self::Manifests, Self::Kube]),
            other => bail!("unknown source {other:?}: manifests, kube or both"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Manifests => "manifests",
            Self::Kube => "kube",
        }
    }
}

/// One service count's figures.
#[derive(Clone, Debug)]
pub struct AgentCost {
    pub source: AgentSource,
    pub services: usize,
    /// Process start until the maps hold every service.
    pub first_sync: Duration,
    /// VmRSS after the first sync.
    pub rss_bytes: u64,
    /// VmHWM (peak resident memory) after the first sync.
    pub peak_rss_bytes: u64,
    /// VmRSS and VmHWM after the updates.
    pub rss_after_updates_bytes: u64,
    pub peak_rss_after_updates_bytes: u64,
    /// File rewritten until the maps hold the new backend.
    pub update_p50: Duration,
    pub update_p99: Duration,
    /// The agent's own part of an update (event received until maps written), mean over the
    /// updates, from its `network_programming_duration_seconds`.
    pub programming_mean: Duration,
    /// Updates timed (every one was observed in the maps).
    pub updates: usize,
}

/// The manifests source's poll period (`source::manifests::DEFAULT_POLL`).
pub const MANIFESTS_POLL: Duration = Duration::from_millis(500);

const NODE: &str = "bench-node";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// nodePorts are 10000 + i: the default range (30000-32767) holds only 2,768.
const FIRST_NODE_PORT: usize = 10_000;
const NODE_PORT_RANGE: &str = "10000-60999";
const TARGET_PORT: u16 = 8080;
/// Slices per manifest file: an update rewrites one file of this many slices.
const SLICES_PER_FILE: usize = 100;
const PREFIX: &str = "npac";

/// Measures each service count in turn (see the module documentation).
pub fn measure(opts: &AgentCostOptions) -> anyhow::Result<Vec<AgentCost>> {
    ensure!(
        opts.agent.is_file(),
        "{} is not a file (build it: cargo build --release -p nodeport-agent)",
        opts.agent.display()
    );
    ensure!(opts.endpoints_per_service > 0, "endpoints_per_service is 0");
    sweep_leftovers(&opts.agent);
    let mut results = Vec::new();
    for &n in &opts.service_counts {
        ensure!(
            n > 0 && FIRST_NODE_PORT + n <= 61_000,
            "{n} services do not fit nodePorts {NODE_PORT_RANGE}"
        );
        for &source in &opts.sources {
            results.push(
                measure_one(opts, n, source)
                    .with_context(|| format!("{n} services, {} source", source.name()))?,
            );
        }
    }
    Ok(results)
}

/// A markdown table of the results.
pub fn render_markdown(results: &[AgentCost]) -> String {
    let mut out = String::from(
        "| source | services | first full sync | RSS after sync (peak) | endpoint update p50 | p99 | agent's part (mean) | updates | RSS after the updates (peak) |\n\
         |--------|---------:|----------------:|----------------------:|--------------------:|----:|--------------------:|--------:|-----------------------------:|\n",
    );
    for r in results {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} MiB ({:.1} MiB) | {} | {} | {} | {} | {:.1} MiB ({:.1} MiB) |",
            r.source.name(),
            thousands(r.services),
            ms(r.first_sync),
            mib(r.rss_bytes),
            mib(r.peak_rss_bytes),
            ms(r.update_p50),
            ms(r.update_p99),
            ms(r.programming_mean),
            r.updates,
            mib(r.rss_after_updates_bytes),
            mib(r.peak_rss_after_updates_bytes),
        );
    }
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn measure_one(
    opts: &AgentCostOptions,
    n: usize,
    source: AgentSource,
) -> anyhow::Result<AgentCost> {
    let run = Run::new(&opts.agent, n)?;
    let endpoints = opts.endpoints_per_service;
    let mut slices: Vec<Vec<Ipv4Addr>> = (0..n)
        .map(|i| {
            (0..endpoints)
                .map(|j| endpoint_ip(i * endpoints + j))
                .collect()
        })
        .collect();
    // The kube source's API server, serving every object before the agent starts (declared
    // before the agent: stopped after it).
    let fake = Fake::default();
    let mut _server = None;
    let source_args = match source {
        AgentSource::Manifests => {
            std::fs::write(run.manifests.join("00-node.yaml"), node_yaml())?;
            let services: String = (0..n).map(service_yaml).collect();
            std::fs::write(run.manifests.join("01-services.yaml"), services)?;
            for file in 0..n.div_ceil(SLICES_PER_FILE) {
                write_slice_file(&run.manifests, file, &slices)?;
            }
            vec!["--manifests".into(), run.manifests.clone()]
        }
        AgentSource::Kube => {
            fake.put(Res::Nodes, yaml_object(&node_yaml())?);
            for (i, ips) in slices.iter().enumerate() {
                fake.put(Res::Services, yaml_object(&service_yaml(i))?);
                fake.put(Res::EndpointSlices, yaml_object(&slice_yaml(i, ips))?);
            }
            let server = ServerInNetns::start(&fake, &format!("/run/netns/{}", run.ns));
            let config = run.work.join("kubeconfig");
            std::fs::write(&config, fake_apiserver::kubeconfig(server.port))?;
            _server = Some(server);
            vec!["--kubeconfig".into(), config]
        }
    };

    let started = Instant::now();
    let mut agent = run.start(&source_args)?;
    let health = in_netns(&run.ns, move || -> anyhow::Result<()> {
        while started.elapsed() < Duration::from_secs(600) {
            if let Ok(body) = http_get("/healthz")
                && body.contains("\"IPv4\"")
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("no first sync reported within 600 s")
    })?;
    if let Err(e) = health {
        bail!("{e}; agent log:\n{}", run.log_tail());
    }
    let first_sync = started.elapsed();
    let maps = Maps::open(&run.pin_root)?;
    for (i, ips) in slices.iter().enumerate() {
        let got = maps.backends(node_port(i))?;
        ensure!(
            got.len() == endpoints && ips.iter().all(|ip| got.contains(ip)),
            "after the first sync, service {i} has backends {got:?} instead of {ips:?}"
        );
    }
    let (rss_bytes, peak_rss_bytes) = memory(agent.id())?;
    let programming_before = in_netns(&run.ns, programming_sum_count)??;

    let mut latencies = Vec::with_capacity(opts.updates);
    for u in 0..opts.updates {
        // Spread over the services (and so over the files); every update a fresh address.
        let i = (u * 7919) % n;
        let new_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + u as u32);
        slices[i][0] = new_ip;
        let t = Instant::now();
        match source {
            AgentSource::Manifests => {
                write_slice_file(&run.manifests, i / SLICES_PER_FILE, &slices)?;
            }
            AgentSource::Kube => {
                fake.put(
                    Res::EndpointSlices,
                    yaml_object(&slice_yaml(i, &slices[i]))?,
                );
            }
        }
        loop {
            if maps.backends(node_port(i))?.contains(&new_ip) {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "update {u} (service {i} -> {new_ip}) not in the maps after 60 s; agent log:\n{}",
                    run.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        latencies.push(t.elapsed());
        // Let the agent's debounce window pass, so each update is its own sync.
        std::thread::sleep(Duration::from_millis(150));
    }
    let programming_after = in_netns(&run.ns, programming_sum_count)??;
    let (rss_after_updates_bytes, peak_rss_after_updates_bytes) = memory(agent.id())?;
    if let Some(status) = agent.try_wait()? {
        bail!("the agent exited ({status}); log:\n{}", run.log_tail());
    }
    let syncs = programming_after.1 - programming_before.1;
    let programming_mean = if syncs > 0.0 {
        Duration::from_secs_f64((programming_after.0 - programming_before.0) / syncs)
    } else {
        Duration::ZERO
    };
    latencies.sort();
    Ok(AgentCost {
        source,
        services: n,
        first_sync,
        rss_bytes,
        peak_rss_bytes,
        rss_after_updates_bytes,
        peak_rss_after_updates_bytes,
        update_p50: percentile(&latencies, 50),
        update_p99: percentile(&latencies, 99),
        programming_mean,
        updates: latencies.len(),
    })
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn node_port(i: usize) -> u16 {
    (FIRST_NODE_PORT + i) as u16
}

fn endpoint_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + k as u32)
}

fn node_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: \"{NODE_IP}\"}}\n"
    )
}

fn service_yaml(i: usize) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.{}.{}\n  ports:\n  - {{name: http, port: 80, targetPort: {TARGET_PORT}, nodePort: {}, protocol: TCP}}\n",
        i / 250,
        i % 250 + 1,
        node_port(i)
    )
}

fn slice_yaml(i: usize, ips: &[Ipv4Addr]) -> String {
    let mut out = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-abcde\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\n\
         addressType: IPv4\nports:\n- {{name: http, port: {TARGET_PORT}, protocol: TCP}}\nendpoints:\n"
    );
    for ip in ips {
        let _ = writeln!(
            out,
            "- {{addresses: [\"{ip}\"], nodeName: other-node, conditions: {{ready: true}}}}"
        );
    }
    out
}

/// One object of a manifest as the fake API server keeps it: JSON, without apiVersion and kind
/// (it adds them to watch events; list items come without them).
fn yaml_object(yaml: &str) -> anyhow::Result<serde_json::Value> {
    let mut value: serde_json::Value = serde_yaml_ng::from_str(yaml)?;
    let object = value.as_object_mut().context("not a mapping")?;
    object.remove("apiVersion");
    object.remove("kind");
    Ok(value)
}

/// Writes slices file `file` whole under a dot name (skipped by the agent) and renames it into
/// place, as kubectl or a ConfigMap update would.
fn write_slice_file(dir: &Path, file: usize, slices: &[Vec<Ipv4Addr>]) -> anyhow::Result<()> {
    let range = file * SLICES_PER_FILE..((file + 1) * SLICES_PER_FILE).min(slices.len());
    let text: String = range.map(|i| slice_yaml(i, &slices[i])).collect();
    let name = format!("slices-{file:04}.yaml");
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// VmRSS and VmHWM of a process, bytes.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed status line")?
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The pinned frontends, slots and backends, for direct lookups.
struct Maps {
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: HashMap<MapData, BackendKey, Backend>,
}

impl Maps {
    fn open(pin_root: &Path) -> anyhow::Result<Self> {
        let dir = nodeport_agent::PinLayout::new(pin_root).dir();
        fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
            dir: &Path,
            name: &str,
        ) -> anyhow::Result<T> {
            let data = MapData::from_pin(dir.join(name))
                .with_context(|| format!("opening {}", dir.join(name).display()))?;
            Ok(T::try_from(Map::from_map_data(data)?)?)
        }
        Ok(Self {
            frontends: open(&dir, map_names::FRONTENDS)?,
            slots: open(&dir, map_names::SLOTS)?,
            backends: open(&dir, map_names::BACKENDS)?,
        })
    }

    /// The backend addresses the packet path would pick from for TCP `node_port`.
    fn backends(&self, node_port: u16) -> anyhow::Result<Vec<Ipv4Addr>> {
        let key = FrontendKey {
            port: node_port.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let Ok(fe) = self.frontends.get(&key, 0) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(usize::from(fe.count));
        for slot in 1..=u32::from(fe.count) {
            let Ok(s) = self.slots.get(
                &SlotKey {
                    svc_id: fe.svc_id,
                    slot,
                },
                0,
            ) else {
                continue;
            };
            if let Ok(b) = self.backends.get(&BackendKey { id: s.backend_id }, 0) {
                out.push(Ipv4Addr::from(u32::from_be(b.addr)));
            }
        }
        Ok(out)
    }
}

/// A namespace, a pin root and a manifests directory for one run, removed on drop.
struct Run {
    agent_bin: PathBuf,
    ns: String,
    pin_root: PathBuf,
    work: PathBuf,
    manifests: PathBuf,
    log: PathBuf,
}

impl Run {
    fn new(agent_bin: &Path, n: usize) -> anyhow::Result<Self> {
        let name = format!("{PREFIX}-{}-{n}", std::process::id());
        let work = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&work);
        let manifests = work.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        let run = Self {
            agent_bin: agent_bin.to_owned(),
            ns: name.clone(),
            pin_root: PathBuf::from("/sys/fs/bpf").join(&name),
            log: work.join("agent.log"),
            work,
            manifests,
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh("ip", &["netns", "add", &name])?;
        let ip = |args: &[&str]| {
            let mut all = vec!["-n", name.as_str()];
            all.extend_from_slice(args);
            sh("ip", &all)
        };
        ip(&["link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ])?;
        ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
        ip(&["link", "set", "eth0", "up"])?;
        ip(&["link", "set", "eth1", "up"])?;
        Ok(run)
    }

    /// The agent, reading from `source_args` (`--manifests DIR` or `--kubeconfig F`).
    fn start(&self, source_args: &[PathBuf]) -> anyhow::Result<AgentProcess> {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(&self.agent_bin)
            .args(["run", "--node-name", NODE, "--interfaces", "eth0"])
            .args(source_args)
            .arg("--pin-root")
            .arg(&self.pin_root)
            .args(["--service-node-port-range", NODE_PORT_RANGE])
            .args(["--healthz-bind-address", "127.0.0.1:10256"])
            .stdout(Stdio::null())
            .stderr(File::create(&self.log)?)
            .spawn()
            .context("starting the agent")?;
        Ok(AgentProcess(child))
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = Command::new(&self.agent_bin)
            .arg("unload")
            .arg("--pin-root")
            .arg(&self.pin_root)
            .output();
        let _ = std::fs::remove_dir_all(&self.pin_root);
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// The agent, killed on drop (before its [`Run`] is removed: declared after it).
struct AgentProcess(Child);

impl AgentProcess {
    fn id(&self) -> u32 {
        self.0.id()
    }

    fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.0.try_wait()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes namespaces, pins and work directories of earlier runs whose process is gone.
fn sweep_leftovers(agent: &Path) {
    let dead = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| dead(n))
            .collect()
    };
    for ns in names(Path::new("/run/netns")) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    }
    for pins in names(Path::new("/sys/fs/bpf")) {
        let root = Path::new("/sys/fs/bpf").join(pins);
        let _ = Command::new(agent)
            .arg("unload")
            .arg("--pin-root")
            .arg(&root)
            .output();
        let _ = std::fs::remove_dir_all(root);
    }
    for work in names(&std::env::temp_dir()) {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(work));
    }
}

fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output()?;
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs `f` on a thread inside network namespace `ns` (the agent's health server listens on its
/// loopback).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let file = File::open(format!("/run/netns/{ns}"))?;
    std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; setns moves only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::anyhow!(
                "setns: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in the namespace panicked"))?
}

fn http_get(path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256).into(),
        Duration::from_secs(1),
    )?;
    // /metrics at 10,000 services is megabytes, built from a walk of the maps.
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The agent's `network_programming_duration_seconds` sum and count.
fn programming_sum_count() -> anyhow::Result<(f64, f64)> {
    let body = http_get("/metrics")?;
    let value = |suffix: &str| -> anyhow::Result<f64> {
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, v) = l.split_once(' ')?;
                name.ends_with(suffix).then(|| v.trim().parse().ok())?
            })
            .with_context(|| format!("no {suffix} in /metrics"))
    };
    Ok((
        value("network_programming_duration_seconds_sum")?,
        value("network_programming_duration_seconds_count")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99), Duration::from_millis(99));
        assert_eq!(percentile(&s[..20], 99), Duration::from_millis(20));
        assert_eq!(percentile(&s[..1], 50), Duration::from_millis(1));
        assert_eq!(thousands(10000), "10,000");
        assert_eq!(thousands(100), "100");
    }
}
