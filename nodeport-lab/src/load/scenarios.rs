//! The fault scenarios of docs/RELIABILITY.md, run against a lab under [`Load`]:
//!
//! - [`restarts`]: every node's agent (or one node's) killed with SIGKILL and restarted with the
//!   same arguments, N times, then a rolling upgrade to another agent executable (SIGTERM, start
//!   the new one, wait until it synced, next node: a DaemonSet's `maxUnavailable: 1`). The
//!   dataplane is pinned, so forwarding must not notice: no established connection may break.
//! - [`churn`]: a pod added and one removed every period, with kubelet's graceful deletion (the
//!   endpoint turns terminating, the pod is deleted `grace` later) or abruptly (`grace` zero).
//!   Connections to surviving pods must never fail; connections to removed pods must end, and
//!   how and how fast they end is measured.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Break, Failure, Load, LoadConfig, Log, NewConn};
use crate::{Lab, sys};

/// The nodePort of the scenarios' Service.
pub const NODE_PORT: u16 = 30250;
/// The Deployment the scenarios load (namespace default).
pub const DEPLOYMENT: &str = "web";

/// A Deployment of `replicas` echo pods and a NodePort Service on [`NODE_PORT`].
pub fn workload(replicas: usize) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {DEPLOYMENT}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {DEPLOYMENT}}}}}
  template:
    metadata: {{labels: {{app: {DEPLOYMENT}}}}}
    spec:
      containers:
      - name: web
        image: nodeport-echo
        ports: [{{containerPort: 8080, name: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: {DEPLOYMENT}}}
spec:
  type: NodePort
  selector: {{app: {DEPLOYMENT}}}
  ports:
  - {{name: http, port: 80, targetPort: http, nodePort: {NODE_PORT}}}
"#
    )
}

/// The load the scenarios use by default: every node's nodePort.
pub fn load_config(lab: &Lab, long_conns: usize, new_per_sec: u32) -> LoadConfig {
    let nodes: Vec<_> = lab.nodes().iter().map(|n| n.addr).collect();
    LoadConfig {
        targets: super::targets(&nodes, NODE_PORT),
        long_conns,
        new_per_sec,
        request_timeout: Duration::from_secs(5),
        new_timeout: Duration::from_secs(3),
    }
}

/// Whether `node`'s agent answers `/healthz` having synced at least once (kube-proxy's body
/// carries a per-family `status` only after the first successful sync).
pub fn agent_synced(node: &str) -> bool {
    sys::in_netns(node, || -> anyhow::Result<bool> {
        let t = Duration::from_millis(300);
        let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], 10256).into(), t)?;
        s.set_read_timeout(Some(t))?;
        write!(
            s,
            "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let json: serde_json::Value = serde_json::from_str(body.trim())?;
        Ok(text.starts_with("HTTP/1.1 200")
            && json["status"].as_object().is_some_and(|s| !s.is_empty()))
    })
    .ok()
    .and_then(Result::ok)
    .unwrap_or(false)
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// One fault window: from the fault until the next fault (or the end of the run).
#[derive(Clone, Debug)]
pub struct Window {
    pub label: String,
    pub start: Instant,
    pub end: Instant,
    /// From SIGKILL (SIGTERM for the upgrade) until every affected agent was gone.
    pub dead_after: Duration,
    /// From the new process's start until its `/healthz` showed a sync (slowest node).
    pub resync: Duration,
    /// While no agent process of the affected nodes existed (from the last one gone until the
    /// new ones were started).
    pub agentless: Option<(Instant, Instant)>,
}

/// What the load saw in one window.
#[derive(Clone, Debug)]
pub struct WindowFigures {
    pub window: Window,
    /// Long-lived connections whose request failed in the window.
    pub broken: Vec<Break>,
    pub new_attempted: usize,
    pub new_failed: Vec<NewConn>,
    /// New connections started while no agent ran, and how many of them failed.
    pub agentless_attempted: usize,
    pub agentless_failed: usize,
    /// Requests answered on long-lived connections, and the slowest of them.
    pub answered: usize,
    pub max_latency: Duration,
}

fn figures(log: &Log, window: Window) -> WindowFigures {
    let inside = |t: Instant| t >= window.start && t < window.end;
    let new: Vec<&NewConn> = log.new.iter().filter(|n| inside(n.started)).collect();
    let answered: Vec<_> = log.answered.iter().filter(|a| inside(a.sent)).collect();
    let agentless: Vec<&&NewConn> = new
        .iter()
        .filter(|n| {
            window
                .agentless
                .is_some_and(|(from, to)| n.started >= from && n.started < to)
        })
        .collect();
    WindowFigures {
        agentless_attempted: agentless.len(),
        agentless_failed: agentless.iter().filter(|n| n.result.is_err()).count(),
        broken: log
            .breaks
            .iter()
            .filter(|b| inside(b.sent))
            .cloned()
            .collect(),
        new_attempted: new.len(),
        new_failed: new
            .into_iter()
            .filter(|n| n.result.is_err())
            .cloned()
            .collect(),
        answered: answered.len(),
        max_latency: answered.iter().map(|a| a.latency).max().unwrap_or_default(),
        window,
    }
}

#[derive(Clone, Debug)]
pub struct RestartOptions {
    pub restarts: usize,
    /// SIGKILL every node's agent at once (else one node's, in turn).
    pub all_nodes: bool,
    /// How long the agents stay dead before the restart.
    pub down_for: Duration,
    /// Load after each resync before the next fault.
    pub settle: Duration,
    /// The newer agent executable to roll out after the restarts (file name `nodeport-agent`);
    /// none: no upgrade.
    pub upgrade_to: Option<PathBuf>,
    pub load: LoadConfig,
}

#[derive(Clone, Debug)]
pub struct RestartReport {
    pub options: RestartOptions,
    /// The load before the first fault, then one window per restart, then one per upgraded node.
    pub windows: Vec<WindowFigures>,
    pub log: Log,
    pub took: Duration,
}

impl RestartReport {
    pub fn broken(&self) -> usize {
        self.windows.iter().map(|w| w.broken.len()).sum()
    }
    pub fn new_failed(&self) -> usize {
        self.windows.iter().map(|w| w.new_failed.len()).sum()
    }
    pub fn new_attempted(&self) -> usize {
        self.windows.iter().map(|w| w.new_attempted).sum()
    }

    pub fn markdown(&self) -> String {
        let o = &self.options;
        let mut s = format!(
            "{} long-lived connections (a request every 50-100 ms each, timeout {:?}), {} new connections/s, \
             through nodePort {NODE_PORT} of {} nodes; {} restart(s) of {} agent(s) (SIGKILL, {:?} down, then the same command), \
             {:?} of load between faults; run took {:.1} s.\n\n\
             | window | agent gone after | resync | long-lived requests answered | slowest answer | established broken | new attempted | new failed | new while no agent ran (failed) |\n\
             |---|---|---|---|---|---|---|---|---|\n",
            o.load.long_conns,
            o.load.request_timeout,
            o.load.new_per_sec,
            o.load.targets.len(),
            o.restarts,
            if o.all_nodes {
                "every node's"
            } else {
                "one node's"
            },
            o.down_for,
            o.settle,
            self.took.as_secs_f64()
        );
        for w in &self.windows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} ms | {} | {} | {} | {} ({}) |",
                w.window.label,
                ms(w.window.dead_after),
                ms(w.window.resync),
                w.answered,
                w.max_latency.as_millis(),
                w.broken.len(),
                w.new_attempted,
                w.new_failed.len(),
                w.agentless_attempted,
                w.agentless_failed
            );
        }
        let _ = writeln!(
            s,
            "| **total** | | | {} | {} ms | **{}** | {} | **{}** | {} ({}) |",
            self.windows.iter().map(|w| w.answered).sum::<usize>(),
            self.windows
                .iter()
                .map(|w| w.max_latency)
                .max()
                .unwrap_or_default()
                .as_millis(),
            self.broken(),
            self.new_attempted(),
            self.new_failed(),
            self.windows
                .iter()
                .map(|w| w.agentless_attempted)
                .sum::<usize>(),
            self.windows
                .iter()
                .map(|w| w.agentless_failed)
                .sum::<usize>()
        );
        for w in &self.windows {
            for b in &w.broken {
                let _ = writeln!(
                    s,
                    "\nbroken in {}: conn {} via {} to {}: {:?} {}",
                    w.window.label, b.conn, b.target, b.pod, b.failure, b.error
                );
            }
            for n in &w.new_failed {
                let _ = writeln!(
                    s,
                    "\nnew connection failed in {}: via {}: {:?}",
                    w.window.label, n.target, n.result
                );
            }
        }
        s
    }
}

fn ms(d: Duration) -> String {
    if d.is_zero() {
        "-".into()
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Copies the lab's agent to `<state dir>/upgrade/nodeport-agent`: another executable file
/// (another path, inode and process image) of the same build, for the upgrade when no newer
/// build is at hand. Removed with the lab.
pub fn agent_copy(lab: &Lab) -> anyhow::Result<PathBuf> {
    let dir = lab.config().state_dir().join("upgrade");
    std::fs::create_dir_all(&dir)?;
    let to = dir.join("nodeport-agent");
    std::fs::copy(&lab.config().agent, &to)
        .with_context(|| format!("copying the agent to {}", to.display()))?;
    Ok(to)
}

fn executable(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Kills agents with SIGKILL and restarts them under load, then rolls out `upgrade_to`.
pub fn restarts(lab: &Lab, o: &RestartOptions) -> anyhow::Result<RestartReport> {
    let began = Instant::now();
    let nodes: Vec<String> = lab.nodes().into_iter().map(|n| n.name).collect();
    for n in &nodes {
        wait_for(
            &format!("{n}'s agent synced"),
            Duration::from_secs(30),
            || agent_synced(n),
        )?;
    }
    let load = Load::start(&lab.config().client_ns(), &o.load)?;
    let mut windows = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        let mut start = Instant::now();
        std::thread::sleep(o.settle);
        windows.push(Window {
            label: "before any fault".into(),
            start,
            end: Instant::now(),
            dead_after: Duration::ZERO,
            resync: Duration::ZERO,
            agentless: None,
        });
        for i in 0..o.restarts {
            let victims: Vec<&String> = if o.all_nodes {
                nodes.iter().collect()
            } else {
                vec![&nodes[i % nodes.len()]]
            };
            start = Instant::now();
            let pids: Vec<i32> = victims
                .iter()
                .map(|n| {
                    lab.agent_pid(n)
                        .with_context(|| format!("{n}'s agent is not running"))
                })
                .collect::<anyhow::Result<_>>()?;
            for pid in &pids {
                // SAFETY: kill(2) on the pid of an agent this lab started (checked by name).
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            wait_for("the killed agents gone", Duration::from_secs(5), || {
                pids.iter().all(|p| !sys::alive(*p))
            })?;
            let dead_after = start.elapsed();
            let gone = Instant::now();
            std::thread::sleep(o.down_for);
            let agentless = Some((gone, Instant::now()));
            let resync = restart_and_wait(lab, &victims, &lab.config().agent)?;
            std::thread::sleep(o.settle);
            windows.push(Window {
                label: format!("restart {}", i + 1),
                start,
                end: Instant::now(),
                dead_after,
                resync,
                agentless,
            });
        }
        if let Some(binary) = &o.upgrade_to {
            for n in &nodes {
                start = Instant::now();
                let pid = lab
                    .agent_pid(n)
                    .with_context(|| format!("{n}'s agent is not running"))?;
                // A DaemonSet's rolling update: SIGTERM, the old pod exits, the new one starts.
                sys::stop(pid, Duration::from_secs(10));
                let dead_after = start.elapsed();
                let agentless = Some((start + dead_after, Instant::now()));
                let resync = restart_and_wait(lab, &[n], binary)?;
                let new = lab.agent_pid(n).and_then(executable);
                if new.as_deref() != Some(binary.as_path()) {
                    bail!(
                        "{n} runs {new:?} after the upgrade, not {}",
                        binary.display()
                    );
                }
                std::thread::sleep(o.settle);
                windows.push(Window {
                    label: format!(
                        "upgrade {}",
                        n.strip_prefix(&format!("{}-", lab.config().prefix))
                            .unwrap_or(n)
                    ),
                    start,
                    end: Instant::now(),
                    dead_after,
                    resync,
                    agentless,
                });
            }
        }
        Ok(())
    })();
    let log = load.stop()?;
    result?;
    // The maps still hold exactly what the slices say.
    lab.wait_synced(Duration::from_secs(10))?;
    if let Some(last) = windows.last_mut() {
        last.end = Instant::now();
    }
    Ok(RestartReport {
        options: o.clone(),
        windows: windows.into_iter().map(|w| figures(&log, w)).collect(),
        log,
        took: began.elapsed(),
    })
}

/// Starts the agents of `nodes` from `binary`; returns how long the slowest took to sync.
fn restart_and_wait(lab: &Lab, nodes: &[&String], binary: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for n in nodes {
        lab.start_agent(n, binary)?;
    }
    let mut slowest = Duration::ZERO;
    for n in nodes {
        wait_for(
            &format!("{n}'s restarted agent synced"),
            Duration::from_secs(30),
            || agent_synced(n),
        )?;
        slowest = slowest.max(started.elapsed());
    }
    Ok(slowest)
}

#[derive(Clone, Debug)]
pub struct ChurnOptions {
    pub duration: Duration,
    /// A pod added and one removed every period.
    pub period: Duration,
    /// Terminating (no new connections, still serving) for this long before deletion; zero
    /// deletes at once, with no terminating phase.
    pub grace: Duration,
    /// Remove pods as a lost sandbox goes (veth first: the pod's FIN or RST never leaves), so
    /// only the dataplane can end the connections to them; else the pod's server exits first and
    /// closes its connections, as an application does on SIGTERM.
    pub cut: bool,
    /// After the last deletion: time for connections to removed pods to end.
    pub linger: Duration,
    pub load: LoadConfig,
}

/// A long-lived connection to a pod that was removed, and how it ended.
#[derive(Clone, Debug)]
pub struct Ended {
    pub pod: String,
    pub failure: Failure,
    /// From the pod's deletion until the client saw the failure.
    pub after: Duration,
}

#[derive(Clone, Debug)]
pub struct ChurnReport {
    pub options: ChurnOptions,
    pub added: usize,
    pub removed: usize,
    /// Long-lived connections that failed although their pod was not deleted (yet).
    pub survivors_broken: Vec<Break>,
    pub removed_ended: Vec<Ended>,
    /// Long-lived connections to removed pods that were still open at the end (never ended).
    pub removed_never_ended: usize,
    /// New connections answered by a pod after it was marked terminating (the agents had not yet
    /// taken its slots away), and the latest of them after the marking: the agents' programming
    /// lag under churn.
    pub new_to_terminating: usize,
    pub terminating_lag: Duration,
    pub long_opened: usize,
    pub answered: usize,
    pub new_attempted: usize,
    pub new_failed: Vec<NewConn>,
    pub took: Duration,
}

impl ChurnReport {
    pub fn markdown(&self) -> String {
        let o = &self.options;
        let mut after: Vec<Duration> = self.removed_ended.iter().map(|e| e.after).collect();
        after.sort();
        let pct = |p: usize| {
            after
                .get((after.len() * p / 100).min(after.len().saturating_sub(1)))
                .map_or("-".into(), |d| format!("{} ms", d.as_millis()))
        };
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for e in &self.removed_ended {
            *kinds.entry(format!("{:?}", e.failure)).or_default() += 1;
        }
        let mut s = format!(
            "{} long-lived connections, {} new connections/s through nodePort {NODE_PORT} of {} nodes; \
             every {:?} one pod added and one removed ({}{}) for {:?}: {} added, {} removed; run took {:.1} s.\n\n\
             | figure | value |\n|---|---|\n\
             | long-lived connections opened | {} |\n\
             | requests answered on them | {} |\n\
             | **broken while their pod was alive (terminating included)** | **{}** |\n\
             | ended because their pod was deleted | {} ({}) |\n\
             | time from deletion to the client's error: median / p90 / max | {} / {} / {} |\n\
             | to a deleted pod, still open at the end (hung) | {} |\n\
             | new connections answered by a pod already terminating / latest, after its marking | {} / {} ms |\n\
             | new connections attempted | {} |\n\
             | **new connections failed** | **{}** |\n",
            o.load.long_conns,
            o.load.new_per_sec,
            o.load.targets.len(),
            o.period,
            if o.grace.is_zero() {
                "deleted at once".to_owned()
            } else {
                format!("terminating for {:?}, then deleted", o.grace)
            },
            if o.cut {
                ", its veth cut before its server exits"
            } else {
                ", its server exits first"
            },
            o.duration,
            self.added,
            self.removed,
            self.took.as_secs_f64(),
            self.long_opened,
            self.answered,
            self.survivors_broken.len(),
            self.removed_ended.len(),
            kinds
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            pct(50),
            pct(90),
            after
                .last()
                .map_or("-".into(), |d| format!("{} ms", d.as_millis())),
            self.removed_never_ended,
            self.new_to_terminating,
            self.terminating_lag.as_millis(),
            self.new_attempted,
            self.new_failed.len(),
        );
        for b in &self.survivors_broken {
            let _ = writeln!(
                s,
                "\nbroken to a live pod: conn {} via {} to {}: {:?} {}",
                b.conn, b.target, b.pod, b.failure, b.error
            );
        }
        for n in &self.new_failed {
            let _ = writeln!(
                s,
                "\nnew connection failed: via {}: {:?}",
                n.target, n.result
            );
        }
        s
    }
}

/// Adds and removes pods of [`DEPLOYMENT`] every period under load.
pub fn churn(lab: &mut Lab, o: &ChurnOptions) -> anyhow::Result<ChurnReport> {
    let began = Instant::now();
    lab.wait_synced(Duration::from_secs(30))?;
    let load = Load::start(&lab.config().client_ns(), &o.load)?;
    let mut deleted: BTreeMap<String, Instant> = BTreeMap::new();
    let mut marked: BTreeMap<String, Instant> = BTreeMap::new();
    let (mut added, mut terminating) = (0, std::collections::VecDeque::new());
    let result = (|| -> anyhow::Result<()> {
        let start = Instant::now();
        let mut tick = 0u32;
        let mut delete_due = |lab: &mut Lab,
                              terminating: &mut std::collections::VecDeque<(String, Instant)>,
                              all: bool|
         -> anyhow::Result<()> {
            while let Some((pod, since)) = terminating.front() {
                if !all && since.elapsed() < o.grace {
                    break;
                }
                if let Some(wait) = (*since + o.grace).checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                // The deletion starts when its server gets SIGTERM (and closes its connections).
                deleted.insert(pod.clone(), Instant::now());
                if o.cut {
                    lab.cut_pod_now(pod)?;
                } else {
                    lab.delete_pod_now(pod)?;
                }
                terminating.pop_front();
            }
            Ok(())
        };
        while start.elapsed() < o.duration {
            if let Some(wait) = (start + o.period * tick).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            tick += 1;
            lab.add_pod("default", DEPLOYMENT)?;
            added += 1;
            let oldest = lab
                .pods()
                .iter()
                .filter(|p| p.deployment == DEPLOYMENT && !p.terminating)
                .min_by_key(|p| p.seq)
                .map(|p| p.name.clone())
                .context("no pod to remove")?;
            marked.insert(oldest.clone(), Instant::now());
            lab.mark_terminating(&oldest)?;
            terminating.push_back((oldest, Instant::now()));
            delete_due(lab, &mut terminating, false)?;
        }
        delete_due(lab, &mut terminating, true)?;
        lab.wait_synced(Duration::from_secs(10))?;
        std::thread::sleep(o.linger);
        Ok(())
    })();
    let log = load.stop()?;
    result?;
    let mut survivors_broken = Vec::new();
    let mut removed_ended = Vec::new();
    for b in &log.breaks {
        match deleted.get(&b.pod) {
            Some(at) if *at <= b.seen => removed_ended.push(Ended {
                pod: b.pod.clone(),
                failure: b.failure,
                after: b.seen - *at,
            }),
            _ => survivors_broken.push(b.clone()),
        }
    }
    // Openings per pod minus breaks per pod: connections still open at the end.
    let mut open: BTreeMap<&str, i64> = BTreeMap::new();
    for o in &log.opened {
        if let Ok(pod) = &o.result {
            *open.entry(pod).or_default() += 1;
        }
    }
    for b in &log.breaks {
        *open.entry(&b.pod).or_default() -= 1;
    }
    let removed_never_ended = open
        .iter()
        .filter(|(pod, _)| deleted.contains_key(**pod))
        .map(|(_, n)| (*n).max(0) as usize)
        .sum();
    let lags: Vec<Duration> = log
        .new
        .iter()
        .chain(&log.opened)
        .filter_map(|n| {
            let pod = n.result.as_ref().ok()?;
            n.started.checked_duration_since(*marked.get(pod)?)
        })
        .collect();
    Ok(ChurnReport {
        new_to_terminating: lags.len(),
        terminating_lag: lags.iter().max().copied().unwrap_or_default(),
        options: o.clone(),
        added,
        removed: deleted.len(),
        survivors_broken,
        removed_ended,
        removed_never_ended,
        long_opened: log.opened.iter().filter(|o| o.result.is_ok()).count(),
        answered: log.answered.len(),
        new_attempted: log.new.len() + log.opened.len(),
        new_failed: log
            .new
            .iter()
            .chain(log.opened.iter().filter(|o| o.result.is_err()))
            .filter(|n| n.result.is_err())
            .cloned()
            .collect(),
        took: began.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;
    use crate::load::Answered;

    #[test]
    fn outcomes_are_attributed_to_the_window_they_started_in() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let target = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), NODE_PORT);
        let conn = |ms, ok: bool| NewConn {
            target,
            started: at(ms),
            took: Duration::from_millis(1),
            result: if ok {
                Ok("p".into())
            } else {
                Err((Failure::Reset, true, "refused".into()))
            },
        };
        let brk = |ms| Break {
            conn: 0,
            target,
            pod: "p".into(),
            opened: t0,
            sent: at(ms),
            seen: at(ms + 5000),
            failure: Failure::Timeout,
            error: "timed out".into(),
            answered: 3,
        };
        let log = Log {
            breaks: vec![brk(50), brk(150)],
            answered: vec![
                Answered {
                    sent: at(110),
                    latency: Duration::from_millis(7),
                },
                Answered {
                    sent: at(120),
                    latency: Duration::from_millis(30),
                },
            ],
            new: vec![
                conn(99, false),
                conn(100, true),
                conn(120, false),
                conn(200, true),
            ],
            opened: Vec::new(),
        };
        let f = figures(
            &log,
            Window {
                label: "restart 1".into(),
                start: at(100),
                end: at(200),
                dead_after: Duration::ZERO,
                resync: Duration::ZERO,
                agentless: Some((at(115), at(130))),
            },
        );
        // [start, end): the break sent at 150 ms, not the one at 50 ms (seen inside, sent before).
        assert_eq!(f.broken.len(), 1);
        assert_eq!(f.broken[0].sent, at(150));
        assert_eq!((f.new_attempted, f.new_failed.len()), (2, 1));
        assert_eq!((f.agentless_attempted, f.agentless_failed), (1, 1));
        assert_eq!((f.answered, f.max_latency), (2, Duration::from_millis(30)));
    }
}
