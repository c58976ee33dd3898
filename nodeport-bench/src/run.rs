//! One benchmark run: a lab, then for each service count, repetitions in which every dataplane
//! takes its turn (the order rotates from one repetition to the next, so none always runs first
//! or always follows the same neighbour), each measuring both paths.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nodeport_lab::{Config, Lab, sys, workload::Pod};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{self, Dataplane},
    load::{self, BulkFigures, ConnFigures, KeepAliveFigures, Sink},
    scenario::{ENDPOINTS, HTTP_PORT, Path, SINK_PORT, Scenario},
};

#[derive(Clone, Debug)]
pub struct Options {
    /// Lab prefix (every namespace and pin directory starts with it).
    pub prefix: String,
    pub agent: PathBuf,
    pub echo: PathBuf,
    pub services: Vec<usize>,
    pub reps: usize,
    /// Per figure.
    pub duration: Duration,
    /// Concurrent connections of the load generator.
    pub workers: usize,
    /// Client hosts the new connections come from in turn (addresses of the client namespace):
    /// 1 is the single client of the other figures.
    pub clients: usize,
    pub dataplanes: Vec<Dataplane>,
    /// Written after every sample (the results so far), so a run cut short still has them.
    pub progress: Option<PathBuf>,
}

/// One measurement: one dataplane, one path, one repetition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub services: usize,
    pub rep: usize,
    pub dataplane: Dataplane,
    pub path: Path,
    pub conn: ConnFigures,
    pub keep_alive: KeepAliveFigures,
    pub bulk: BulkFigures,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub date: String,
    pub command: String,
    pub services: Vec<usize>,
    pub reps: usize,
    pub duration_s: f64,
    pub workers: usize,
    /// Client addresses of the new-connection figures (absent in runs before the option: 1).
    #[serde(default = "one")]
    pub clients: usize,
    pub dataplanes: Vec<Dataplane>,
    pub samples: Vec<Sample>,
    /// How long the whole run took, seconds.
    pub wall_s: f64,
}

/// The lab of a run; everything of it goes on drop.
struct BenchLab {
    lab: Lab,
    cfg: Config,
    workloads: PathBuf,
    sinks: Vec<Sink>,
    current: Option<Dataplane>,
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        self.sinks.clear();
        if let Err(e) = nodeport_lab::down(&self.cfg) {
            eprintln!("[bench] cleanup: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.workloads);
    }
}

const PODS_PER_WORKER: usize = ENDPOINTS;

fn workloads_yaml() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: bench}}
spec:
  replicas: {}
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      containers:
      - name: echo
        image: nodeport-echo
        ports: [{{containerPort: {HTTP_PORT}}}]
"#,
        2 * PODS_PER_WORKER
    )
}

impl BenchLab {
    fn up(opts: &Options) -> anyhow::Result<Self> {
        dataplane::check_binary(&opts.agent, "the agent")?;
        dataplane::check_binary(&opts.echo, "the echo")?;
        let workloads = std::env::temp_dir().join(format!("{}-workloads", opts.prefix));
        std::fs::create_dir_all(&workloads)?;
        std::fs::write(workloads.join("echo.yaml"), workloads_yaml())?;
        let cfg = Config::new(
            &opts.prefix,
            workloads.clone(),
            opts.agent.clone(),
            opts.echo.clone(),
        );
        let lab = nodeport_lab::up(cfg.clone())?;
        let mut me = Self {
            lab,
            cfg,
            workloads,
            sinks: Vec::new(),
            current: None,
        };
        // The lab started its agents (TC): the bench starts its own, per dataplane.
        dataplane::stop_agents(&me.lab)?;
        let client = me.cfg.client_ns();
        for addr in client_sources(opts.clients)? {
            sys::ip_in(
                &client,
                &["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
            )?;
        }
        // The direct path: the client routes each pod CIDR via its node.
        for n in me.lab.nodes() {
            sys::ip_in(
                &client,
                &[
                    "route",
                    "replace",
                    &n.pod_cidr(),
                    "via",
                    &n.addr.to_string(),
                ],
            )?;
        }
        // XDP rewrites packets without the stack's checksum offload: the client sends complete
        // checksums (docs/ARCHITECTURE.md). Set for every dataplane, so they all see the same
        // client and pods.
        sys::exec_in(&client, &["ethtool", "-K", "eth0", "tx", "off"])?;
        // A frame sent with XDP_TX on a veth reaches its peer only if the peer runs NAPI, which a
        // veth enables when GRO is requested explicitly (Linux 5.13+; on by default does not
        // count): off then on, on the bridge ports. Also set for every dataplane.
        for n in me.lab.nodes() {
            let port = format!("port{}", n.index);
            for state in ["off", "on"] {
                sys::exec_in(&me.cfg.net_ns(), &["ethtool", "-K", &port, "gro", state])?;
            }
        }
        for pod in me.lab.pods().to_vec() {
            // The pods' answers, too: XDP translates replies from pods on other nodes, and a
            // veth hands on a partial checksum as it is (forwarding does not complete it).
            sys::exec_in(
                &me.cfg.pod_ns(&pod.name),
                &["ethtool", "-K", "eth0", "tx", "off"],
            )?;
            let listener = sys::in_netns(&me.cfg.pod_ns(&pod.name), || Sink::bind(SINK_PORT))??;
            me.sinks.push(Sink::serve(listener));
        }
        Ok(me)
    }

    fn switch(&mut self, to: Dataplane, scenario: &Scenario) -> anyhow::Result<()> {
        if let Some(from) = self.current.take() {
            dataplane::leave(&self.lab, from)
                .with_context(|| format!("leaving {}", from.label()))?;
        }
        dataplane::enter(&self.lab, to, scenario)
            .with_context(|| format!("switching to {}", to.label()))?;
        self.current = Some(to);
        Ok(())
    }

    fn pods(&self) -> Vec<Pod> {
        self.lab.pods().to_vec()
    }

    fn node_addr(&self, index: u8) -> Ipv4Addr {
        nodeport_lab::lab::node_addr(index)
    }
}

/// Where the client sends for a dataplane and path: the pods themselves (direct), or the
/// nodePort on the first worker.
fn targets(
    dp: Dataplane,
    scenario: &Scenario,
    path: Path,
    node: Ipv4Addr,
    rep: usize,
) -> (Vec<SocketAddrV4>, SocketAddrV4) {
    let m = scenario.measured(path);
    if dp == Dataplane::Direct {
        let http = m
            .pod_ips
            .iter()
            .map(|ip| SocketAddrV4::new(*ip, HTTP_PORT))
            .collect();
        (
            http,
            SocketAddrV4::new(m.pod_ips[rep % m.pod_ips.len()], SINK_PORT),
        )
    } else {
        (
            vec![SocketAddrV4::new(node, m.http_node_port)],
            SocketAddrV4::new(node, m.bulk_node_port),
        )
    }
}

/// Until a GET through the path answers (rules and maps may take a moment to apply everywhere).
fn probe(lab: &Lab, target: SocketAddrV4, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match lab.get(*target.ip(), target.port(), Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: no answer from {target}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

pub fn run(opts: &Options, command: &str) -> anyhow::Result<Results> {
    if opts.services.is_empty() || opts.reps == 0 || opts.dataplanes.is_empty() {
        bail!("nothing to measure: give service counts, repetitions and dataplanes");
    }
    let started = Instant::now();
    let mut bench = BenchLab::up(opts).context("bringing the bench's lab up")?;
    let nodes = bench.lab.nodes();
    let (local, remote) = (&nodes[1], &nodes[2]);
    let node = bench.node_addr(local.index);
    let mut samples = Vec::new();
    for &count in &opts.services {
        let scenario = Scenario::build(count, &bench.pods(), &local.name, &remote.name)?;
        // Switch away first: running agents would pick the new objects up mid-measurement.
        if let Some(from) = bench.current.take() {
            dataplane::leave(&bench.lab, from)?;
        }
        dataplane::write_manifests(&bench.lab, &scenario)?;
        for rep in 0..opts.reps {
            let n = opts.dataplanes.len();
            for k in 0..n {
                let dp = opts.dataplanes[(k + rep) % n];
                let t0 = Instant::now();
                bench.switch(dp, &scenario)?;
                eprintln!(
                    "[bench] {count} services, rep {}/{}: {} (switch {:.1}s)",
                    rep + 1,
                    opts.reps,
                    dp.label(),
                    t0.elapsed().as_secs_f64()
                );
                for path in Path::ALL {
                    let (http, bulk) = targets(dp, &scenario, path, node, rep);
                    let what = format!("{} ({})", dp.label(), path.label());
                    probe(&bench.lab, http[0], &what)?;
                    let (w, d) = (opts.workers, opts.duration);
                    let sources = if opts.clients > 1 {
                        std::iter::once(nodeport_lab::CLIENT_ADDR)
                            .chain(client_sources(opts.clients)?)
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let (conn, keep_alive, bulk) = bench.lab.in_client(|| {
                        anyhow::Ok((
                            load::new_connections(&http, w, d, &sources)?,
                            load::keep_alive(&http, w, d)?,
                            load::bulk(bulk, d)?,
                        ))
                    })??;
                    eprintln!(
                        "[bench]   {}: {:.0} conn/s ({} SYN retransmits, {} failed), {:.0} req/s, {:.2} Gbit/s",
                        path.label(),
                        conn.per_sec,
                        conn.syn_retransmits,
                        conn.failed,
                        keep_alive.per_sec,
                        bulk.gbit_per_sec
                    );
                    samples.push(Sample {
                        services: scenario.services.len(),
                        rep,
                        dataplane: dp,
                        path,
                        conn,
                        keep_alive,
                        bulk,
                    });
                    if let Some(file) = &opts.progress {
                        let so_far = results(opts, command, &samples, started);
                        std::fs::write(file, serde_json::to_string_pretty(&so_far)?)
                            .with_context(|| format!("writing {}", file.display()))?;
                    }
                }
            }
        }
    }
    if let Some(from) = bench.current.take() {
        dataplane::leave(&bench.lab, from)?;
    }
    drop(bench);
    Ok(results(opts, command, &samples, started))
}

/// The client namespace's extra addresses for `clients` client hosts: the lab's client address
/// is the first; these follow it in the lab's /24 (nodes are at .2 and up, the client at .100).
fn client_sources(clients: usize) -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
    anyhow::ensure!(
        (1..=100).contains(&clients),
        "--clients {clients}: between 1 and 100 client addresses"
    );
    let base = u32::from(nodeport_lab::CLIENT_ADDR);
    Ok((1..clients as u32)
        .map(|i| std::net::Ipv4Addr::from(base + i))
        .collect())
}

fn one() -> usize {
    1
}

fn results(opts: &Options, command: &str, samples: &[Sample], started: Instant) -> Results {
    Results {
        date: today(),
        command: command.to_owned(),
        services: opts.services.clone(),
        reps: opts.reps,
        duration_s: opts.duration.as_secs_f64(),
        workers: opts.workers,
        clients: opts.clients,
        dataplanes: opts.dataplanes.clone(),
        samples: samples.to_vec(),
        wall_s: started.elapsed().as_secs_f64(),
    }
}

impl Results {
    /// Adds an earlier run's samples (other service counts), e.g. 10,000 services measured with
    /// fewer repetitions in a run of their own. Both commands are kept.
    pub fn merge(&mut self, earlier: Results) {
        let mine: std::collections::BTreeSet<usize> =
            self.samples.iter().map(|s| s.services).collect();
        self.samples.extend(
            earlier
                .samples
                .into_iter()
                .filter(|s| !mine.contains(&s.services)),
        );
        self.command = format!("{}` and `{}", earlier.command, self.command);
        self.wall_s += earlier.wall_s;
        for dp in earlier.dataplanes {
            if !self.dataplanes.contains(&dp) {
                self.dataplanes.push(dp);
            }
        }
    }
}

fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
