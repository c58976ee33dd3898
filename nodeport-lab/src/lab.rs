//! The lab's topology and lifecycle: `up` (idempotent), `apply` (the control plane's
//! reconciliation of workloads into pods and EndpointSlices), `down` (removes everything with the
//! lab's prefix, also after a crash) and `leftovers` (what `down` would still find).
//!
//! ```text
//!  <prefix>-net: bridge br0 ("the docker network", 198.18.0.0/24, in its own namespace)
//!     |                         |                          |                    |
//!  <prefix>-control-plane    <prefix>-worker           <prefix>-worker2      <prefix>-client
//!  eth0 198.18.0.2           eth0 198.18.0.3           eth0 198.18.0.4       eth0 198.18.0.100
//!  pods 10.244.0.0/24        pods 10.244.1.0/24        pods 10.244.2.0/24
//!  nodeport-agent            nodeport-agent            nodeport-agent
//!                            vethXXXX -- <prefix>-pod-<name> (eth0 10.244.1.N, nodeport-echo)
//! ```
//!
//! Each node routes the other nodes' pod CIDRs via their addresses (kindnet). Nothing is created
//! in the root namespace: no address of the lab can be reached from, or leak to, the machine's
//! networks. State lives under `<state root>/<prefix>/` (state.json, the manifests directory every
//! agent reads, pid files and logs); pins under `/sys/fs/bpf/<node name>/`.
//!
//! Each node is also a cgroup v2 directory, `<cgroup2 mount>/<node name>/`, as a kind node
//! container is: its agent runs in it, each pod in `pod-<name>/` below it, and the agent attaches
//! its socket programs there (`--cgroup`), so the node's processes and pods reach nodePorts on the
//! node's own address (their packets never cross the node interface's ingress).
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{
    probe::{Exchange, Failure, Proto},
    sys,
    workload::{self, Frontend, NodeInfo, Pod, Template},
};

/// Where lab state lives by default: `/run/nodeport-lab/<prefix>/` (tmpfs: gone after a reboot,
/// like the namespaces and pins it describes).
pub const STATE_ROOT: &str = "/run/nodeport-lab";
/// The prefix of the user's lab (tests use others).
pub const DEFAULT_PREFIX: &str = "np-lab";
/// The client outside the cluster.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

/// A node's address on the "docker network": the control plane .2, workers .3, .4, …
pub fn node_addr(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 2 + index)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Every name the lab creates starts with `<prefix>-`.
    pub prefix: String,
    pub state_root: PathBuf,
    /// Directory of workload YAML (Deployments, Services).
    pub workloads: PathBuf,
    pub agent: PathBuf,
    pub echo: PathBuf,
    /// Worker nodes besides the control plane.
    pub workers: u8,
    /// Extra arguments for every node's `nodeport-agent run` (e.g. `--conntrack-entries 4096`),
    /// after the lab's own.
    #[serde(default)]
    pub agent_args: Vec<String>,
}

impl Config {
    pub fn new(prefix: &str, workloads: PathBuf, agent: PathBuf, echo: PathBuf) -> Self {
        Self {
            prefix: prefix.to_owned(),
            state_root: PathBuf::from(STATE_ROOT),
            workloads,
            agent,
            echo,
            workers: 2,
            agent_args: Vec::new(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_root.join(&self.prefix)
    }
    fn state_file(&self) -> PathBuf {
        self.state_dir().join("state.json")
    }
    pub fn manifests_dir(&self) -> PathBuf {
        self.state_dir().join("manifests")
    }
    fn pods_dir(&self) -> PathBuf {
        self.state_dir().join("pods")
    }
    fn agents_dir(&self) -> PathBuf {
        self.state_dir().join("agents")
    }
    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.agents_dir().join(format!("{node}.log"))
    }
    pub fn net_ns(&self) -> String {
        format!("{}-net", self.prefix)
    }
    pub fn client_ns(&self) -> String {
        format!("{}-client", self.prefix)
    }
    pub fn pod_ns(&self, pod: &str) -> String {
        format!("{}-pod-{pod}", self.prefix)
    }
    pub fn nodes(&self) -> Vec<NodeInfo> {
        (0..=self.workers)
            .map(|i| {
                let name = match i {
                    0 => format!("{}-control-plane", self.prefix),
                    1 => format!("{}-worker", self.prefix),
                    n => format!("{}-worker{n}", self.prefix),
                };
                NodeInfo::new(name, i, node_addr(i))
            })
            .collect()
    }
    pub fn pin_root(&self, node: &str) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(node)
    }

    /// The node's cgroup: its agent's, its own processes', and the parent of its pods'. Named
    /// like the node, so `owns` recognises it.
    pub fn node_cgroup(&self, node: &str) -> anyhow::Result<PathBuf> {
        Ok(sys::cgroup2_mount()?.join(node))
    }

    /// A pod's cgroup, below its node's (`pod-`: a pod name could otherwise look like one of
    /// the cgroup's own files, `cgroup.procs`, `memory.max`, …).
    pub fn pod_cgroup(&self, node: &str, pod: &str) -> anyhow::Result<PathBuf> {
        Ok(self.node_cgroup(node)?.join(format!("pod-{pod}")))
    }

    /// Whether a namespace or pin directory name is one this lab creates. Exact shapes, not a
    /// bare prefix match: `np-lab` must never claim `np-lab-2`'s objects.
    pub fn owns(&self, name: &str) -> bool {
        let Some(rest) = name
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        matches!(rest, "net" | "client" | "control-plane")
            || rest
                .strip_prefix("worker")
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
            || rest.starts_with("pod-")
    }

    fn validate(&self) -> anyhow::Result<()> {
        let ok = !self.prefix.is_empty()
            && self.prefix.len() <= 24
            && self
                .prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && self.prefix.starts_with(|c: char| c.is_ascii_lowercase());
        if !ok {
            bail!(
                "lab prefix {:?}: 1-24 characters a-z, 0-9, '-', starting with a letter",
                self.prefix
            );
        }
        if !(1..=20).contains(&self.workers) {
            bail!("workers: 1 to 20");
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    config: Config,
    seq: u64,
    pods: Vec<Pod>,
}

/// A running lab.
#[derive(Debug)]
pub struct Lab {
    state: State,
}

/// What one `apply` did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    pub created: Vec<String>,
    pub deleted: Vec<String>,
    /// Pods that could not be placed (no node fits), as "ns/deployment: N pending".
    pub pending: Vec<String>,
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab needs root (network namespaces, BPF): run it as root or with sudo -E");
    }
    Ok(())
}

/// Brings the lab up, or, when it already runs, restarts what died and applies the workloads
/// again. On failure everything the lab owns is removed and the error says which step failed.
pub fn up(cfg: Config) -> anyhow::Result<Lab> {
    cfg.validate()?;
    require_root()?;
    if !sys::bpffs_mounted() {
        bail!("bpffs is not mounted on /sys/fs/bpf (scripts/setup.sh mounts it)");
    }
    sys::cgroup2_mount().context("lab up")?;
    for bin in [&cfg.agent, &cfg.echo] {
        if !bin.is_file() {
            bail!(
                "{} does not exist (cargo xtask lab builds it)",
                bin.display()
            );
        }
    }
    let result = (|| {
        if let Some(mut lab) = Lab::open_running(&cfg) {
            lab.state.config = cfg.clone();
            lab.save()?;
            lab.ensure_agents().context("restarting agents")?;
            lab.apply().context("applying the workloads")?;
            return Ok(lab);
        }
        down(&cfg).context("removing a previous lab's leftovers")?;
        let mut lab = Lab {
            state: State {
                config: cfg.clone(),
                seq: 0,
                pods: Vec::new(),
            },
        };
        for dir in [cfg.manifests_dir(), cfg.pods_dir(), cfg.agents_dir()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        lab.save()?;
        lab.create_network()
            .context("creating the network namespaces")?;
        lab.write_manifests().context("writing the manifests")?;
        lab.ensure_agents().context("starting the agents")?;
        lab.apply().context("applying the workloads")?;
        Ok(lab)
    })();
    result.map_err(|e: anyhow::Error| match down(&cfg) {
        Ok(()) => e.context(format!(
            "lab up failed; everything of lab {:?} was removed",
            cfg.prefix
        )),
        Err(d) => e.context(format!("lab up failed, and so did the cleanup: {d:#}")),
    })
}

/// Removes everything of the lab `cfg.prefix`: agents and pods (by pid file, by namespace and by
/// cgroup), pins, namespaces (with their links), the node cgroups, the state directory. Works
/// without a state file (after a crash) and when nothing is there. Fails only if something is
/// left, naming it.
pub fn down(cfg: &Config) -> anyhow::Result<()> {
    // The agent binary: this call's, or the one the lab was started with.
    let state: Option<State> = std::fs::read(cfg.state_file())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let agent = Some(cfg.agent.clone())
        .filter(|a| a.is_file())
        .or_else(|| state.as_ref().map(|s| s.config.agent.clone()));
    // 1. Processes from pid files (checked to be ours), then whatever runs in our namespaces.
    for dir in [cfg.agents_dir(), cfg.pods_dir()] {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid")
                && let Some(pid) = sys::read_pid(&path)
                && (sys::runs(pid, "nodeport-agent") || sys::runs(pid, "nodeport-echo"))
            {
                sys::stop(pid, Duration::from_secs(2));
            }
        }
    }
    let namespaces: Vec<String> = sys::netns_list()
        .into_iter()
        .filter(|n| cfg.owns(n))
        .collect();
    for ns in &namespaces {
        for pid in sys::netns_pids(ns) {
            sys::stop(pid, Duration::from_secs(1));
        }
    }
    // Whatever else runs in the nodes' cgroups (a client started in a pod, say).
    let cgroups = owned_cgroups(cfg);
    for cgroup in &cgroups {
        for pid in sys::cgroup_pids(cgroup) {
            sys::stop(pid, Duration::from_secs(1));
        }
    }
    // 2. Pins: unload inside the node's namespace (netlink filters, if any, are found there).
    for entry in std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !cfg.owns(&name) {
            continue;
        }
        if let Some(agent) = &agent {
            let mut cmd = Command::new(agent);
            cmd.args(["unload", "--all-versions", "--pin-root"])
                .arg(entry.path());
            if sys::netns_exists(&name) {
                let log = std::env::temp_dir().join(format!("{name}-unload.log"));
                if let Ok(pid) = sys::spawn_in_netns(&name, &mut cmd, &log) {
                    while sys::alive(pid) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                let _ = std::fs::remove_file(log);
            } else {
                let _ = cmd.output();
            }
        }
        // Pins whose links were attached in a namespace that goes next go with it.
        let _ = std::fs::remove_dir_all(entry.path());
    }
    // 3. Namespaces: pods first, then nodes, client and the bridge; links go with them.
    let mut ordered = namespaces.clone();
    ordered.sort_by_key(|n| !n.contains("-pod-"));
    for ns in &ordered {
        sys::netns_del(ns);
    }
    // 4. Cgroups, now that their processes are gone (what cannot go is named below).
    for cgroup in &cgroups {
        let _ = sys::cgroup_remove(cgroup, Duration::from_secs(5));
    }
    let _ = std::fs::remove_dir_all(cfg.state_dir());
    let left = leftovers(cfg);
    if !left.is_empty() {
        bail!("lab {:?}: could not remove {}", cfg.prefix, left.join(", "));
    }
    Ok(())
}

/// What of the lab `cfg.prefix` exists: namespaces, pin directories, cgroups, processes (in its
/// namespaces or cgroups), the state directory. Empty after a successful `down`.
pub fn leftovers(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for ns in sys::netns_list().into_iter().filter(|n| cfg.owns(n)) {
        for pid in sys::netns_pids(&ns) {
            out.push(format!("process {pid} in {ns}"));
        }
        out.push(format!("netns {ns}"));
    }
    for entry in std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
    {
        if cfg.owns(&entry.file_name().to_string_lossy()) {
            out.push(format!("pins {}", entry.path().display()));
        }
    }
    for cgroup in owned_cgroups(cfg) {
        for pid in sys::cgroup_pids(&cgroup) {
            out.push(format!("process {pid} in cgroup {}", cgroup.display()));
        }
        out.push(format!("cgroup {}", cgroup.display()));
    }
    if cfg.state_dir().exists() {
        out.push(format!("state {}", cfg.state_dir().display()));
    }
    out
}

/// The lab's node cgroups that exist (none without a cgroup v2 mount: then `up` never ran).
fn owned_cgroups(cfg: &Config) -> Vec<PathBuf> {
    let Ok(mount) = sys::cgroup2_mount() else {
        return Vec::new();
    };
    std::fs::read_dir(mount)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| cfg.owns(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect()
}

impl Lab {
    /// The lab as its state file describes it, if every namespace it needs exists.
    fn open_running(cfg: &Config) -> Option<Self> {
        let lab = Self::open(cfg).ok()?;
        let c = &lab.state.config;
        let fixed = [c.net_ns(), c.client_ns()]
            .into_iter()
            .chain(c.nodes().into_iter().map(|n| n.name));
        (lab.state.config.workers == cfg.workers
            && fixed.into_iter().all(|n| sys::netns_exists(&n)))
        .then_some(lab)
    }

    /// Opens a running lab's state (for status, apply, report).
    pub fn open(cfg: &Config) -> anyhow::Result<Self> {
        let bytes = std::fs::read(cfg.state_file()).with_context(|| {
            format!(
                "lab {:?} is not up (no {})",
                cfg.prefix,
                cfg.state_file().display()
            )
        })?;
        let state = serde_json::from_slice(&bytes).context("reading the lab's state")?;
        Ok(Self { state })
    }

    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// Changes the workloads directory (the next `apply` reads it).
    pub fn set_workloads(&mut self, dir: PathBuf) -> anyhow::Result<()> {
        self.state.config.workloads = dir;
        self.save()
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.state.config.nodes()
    }

    pub fn pods(&self) -> &[Pod] {
        &self.state.pods
    }

    pub fn node(&self, name: &str) -> Option<NodeInfo> {
        self.nodes().into_iter().find(|n| n.name == name)
    }

    fn save(&self) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(&self.state)?;
        sys::write_atomic(&self.state.config.state_file(), &text)
    }

    fn create_network(&self) -> anyhow::Result<()> {
        let c = &self.state.config;
        let net = c.net_ns();
        sys::netns_add(&net, false)?;
        sys::ip_in(&net, &["link", "add", "br0", "type", "bridge"])?;
        sys::ip_in(&net, &["link", "set", "br0", "up"])?;
        let join = |ns: &str, port: &str, addr: Ipv4Addr| -> anyhow::Result<()> {
            sys::ip_in(
                &net,
                &[
                    "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            )?;
            sys::ip_in(&net, &["link", "set", port, "master", "br0", "up"])?;
            sys::ip_in(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            sys::ip_in(ns, &["link", "set", "eth0", "up"])?;
            Ok(())
        };
        let nodes = c.nodes();
        for n in &nodes {
            sys::netns_add(&n.name, true)?;
            join(&n.name, &format!("port{}", n.index), n.addr)?;
        }
        for n in &nodes {
            for other in nodes.iter().filter(|o| o.index != n.index) {
                sys::ip_in(
                    &n.name,
                    &[
                        "route",
                        "add",
                        &other.pod_cidr(),
                        "via",
                        &other.addr.to_string(),
                    ],
                )?;
            }
        }
        let client = c.client_ns();
        sys::netns_add(&client, false)?;
        join(&client, "portcl", CLIENT_ADDR)?;
        // The bridge port towards the client computes checksums in software, as a NIC on the way
        // to a real client would, so the client's stack verifies every translated reply.
        sys::exec_in(&net, &["ethtool", "-K", "portcl", "tx", "off"])?;
        Ok(())
    }

    /// Starts the agent of every node whose agent is not running.
    fn ensure_agents(&self) -> anyhow::Result<()> {
        let c = &self.state.config;
        for n in c.nodes() {
            if self.agent_pid(&n.name).is_none() {
                self.start_agent(&n.name, &c.agent)?;
            }
        }
        Ok(())
    }

    /// The pid of `node`'s running agent (from its pid file, checked to run nodeport-agent).
    pub fn agent_pid(&self, node: &str) -> Option<i32> {
        let pid_file = self.state.config.agents_dir().join(format!("{node}.pid"));
        sys::read_pid(&pid_file).filter(|p| sys::alive(*p) && sys::runs(*p, "nodeport-agent"))
    }

    /// Starts `node`'s agent from `binary` with the lab's arguments (as a DaemonSet would start
    /// a new image with the same spec) and records its pid. The file name must be
    /// `nodeport-agent`: pid files are only trusted for processes of that name.
    pub fn start_agent(&self, node: &str, binary: &std::path::Path) -> anyhow::Result<i32> {
        let c = &self.state.config;
        let cgroup = c.node_cgroup(node)?;
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let mut cmd = Command::new(binary);
        cmd.args(["run", "--node-name", node, "--interfaces", "eth0"])
            .arg("--manifests")
            .arg(c.manifests_dir())
            .arg("--pin-root")
            .arg(c.pin_root(node))
            .arg("--cgroup")
            .arg(&cgroup)
            .args(["--min-sync-period-ms", "50"])
            .args(&c.agent_args);
        // kube-proxy's default port on every address, unless the test asks for another
        // (clap refuses an option given twice).
        let own_healthz = c.agent_args.iter().any(|a| a.starts_with("--healthz-bind"));
        if !own_healthz {
            cmd.args(["--healthz-bind-address", "0.0.0.0:10256"]);
        }
        let pid = sys::spawn_in(node, Some(&cgroup), &mut cmd, &c.agent_log(node))?;
        std::fs::write(
            c.agents_dir().join(format!("{node}.pid")),
            format!("{pid}\n"),
        )?;
        Ok(pid)
    }

    fn templates(
        &self,
    ) -> anyhow::Result<(Vec<Template>, Vec<k8s_openapi::api::core::v1::Service>)> {
        let w = workload::load_dir(&self.state.config.workloads)?;
        let templates = w
            .deployments
            .iter()
            .map(Template::from_deployment)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let services = workload::normalize_services(&w.services)?;
        Ok((templates, services))
    }

    /// The Services as the lab's apiserver holds them (defaults filled in).
    pub fn services(&self) -> anyhow::Result<Vec<k8s_openapi::api::core::v1::Service>> {
        Ok(self.templates()?.1)
    }

    /// Reads the workloads again and makes the lab match them, like the Deployment, scheduler,
    /// kubelet and EndpointSlice controllers together: creates missing pods (and waits until
    /// they serve), writes the slices, waits until every agent programmed them; pods to remove
    /// are first marked terminating (no new connections) and deleted once every agent stopped
    /// sending new flows to them.
    pub fn apply(&mut self) -> anyhow::Result<ApplyReport> {
        let (templates, _) = self.templates()?;
        let nodes = self.nodes();
        let mut report = ApplyReport::default();
        // Pods whose namespace vanished are gone; pods whose server died are restarted.
        let c = self.state.config.clone();
        self.state
            .pods
            .retain(|p| sys::netns_exists(&c.pod_ns(&p.name)));
        for pod in self.state.pods.clone() {
            if !self.pod_alive(&pod) {
                self.start_echo(&pod)?;
            }
        }

        let mut remove: BTreeSet<String> = BTreeSet::new();
        let mut create: Vec<(Template, String)> = Vec::new();
        for t in &templates {
            let eligible: Vec<&NodeInfo> = nodes.iter().filter(|n| t.fits(n)).collect();
            let mut current: Vec<&Pod> = self
                .state
                .pods
                .iter()
                .filter(|p| p.namespace == t.namespace && p.deployment == t.deployment)
                .collect();
            current.sort_by_key(|p| p.seq);
            let (mut keep, stale): (Vec<&Pod>, Vec<&Pod>) = current.into_iter().partition(|p| {
                !p.terminating
                    && p.template_hash == t.hash
                    && eligible.iter().any(|n| n.name == p.node)
            });
            remove.extend(stale.iter().map(|p| p.name.clone()));
            while keep.len() > t.replicas {
                remove.insert(keep.pop().expect("non-empty").name.clone());
            }
            let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
            for p in &keep {
                *per_node.entry(p.node.as_str()).or_default() += 1;
            }
            // Spread: fewest pods of this deployment, then fewest pods at all (kept or planned).
            let pods = &self.state.pods;
            let total = |node: &str, create: &[(Template, String)]| {
                pods.iter()
                    .filter(|p| p.node == node && !remove.contains(&p.name))
                    .count()
                    + create.iter().filter(|(_, n)| n == node).count()
            };
            let missing = t.replicas - keep.len();
            if missing > 0 && eligible.is_empty() {
                report.pending.push(format!(
                    "{}/{}: {missing} pod(s) pending, no node fits (nodeName, nodeSelector, taints)",
                    t.namespace, t.deployment
                ));
                continue;
            }
            for _ in 0..missing {
                let node = eligible
                    .iter()
                    .min_by_key(|n| {
                        (
                            per_node.get(n.name.as_str()).copied().unwrap_or(0),
                            total(&n.name, &create),
                            n.index,
                        )
                    })
                    .expect("eligible is not empty");
                *per_node.entry(node.name.as_str()).or_default() += 1;
                create.push((t.clone(), node.name.clone()));
            }
        }
        let known: BTreeSet<(String, String)> = templates
            .iter()
            .map(|t| (t.namespace.clone(), t.deployment.clone()))
            .collect();
        for p in &self.state.pods {
            if !known.contains(&(p.namespace.clone(), p.deployment.clone())) {
                remove.insert(p.name.clone());
            }
        }

        // New pods first (a rolling update never has fewer than it had), all serving before
        // their slices name them.
        let mut ready_files = Vec::new();
        for (t, node) in &create {
            let pod = self.create_pod(t, node).with_context(|| {
                format!(
                    "creating a pod of {}/{} on {node}",
                    t.namespace, t.deployment
                )
            })?;
            ready_files.push((pod.name.clone(), self.ready_file(&pod.name)));
            report.created.push(pod.name);
        }
        for (name, file) in ready_files {
            wait_until(Duration::from_secs(10), || file.exists()).with_context(|| {
                format!(
                    "pod {name} never served (see {})",
                    c.pods_dir().join(format!("{name}.log")).display()
                )
            })?;
        }
        if !remove.is_empty() {
            for p in self
                .state
                .pods
                .iter_mut()
                .filter(|p| remove.contains(&p.name))
            {
                p.terminating = true;
            }
            self.save()?;
            self.write_manifests()?;
            self.wait_synced(Duration::from_secs(30))?;
            // Connections in flight to them end (each request is short); then they go.
            std::thread::sleep(Duration::from_millis(200));
            for pod in self.state.pods.iter().filter(|p| remove.contains(&p.name)) {
                self.delete_pod(pod);
                report.deleted.push(pod.name.clone());
            }
            self.state.pods.retain(|p| !remove.contains(&p.name));
            self.save()?;
        }
        self.write_manifests()?;
        self.wait_synced(Duration::from_secs(30))?;
        Ok(report)
    }

    fn ready_file(&self, pod: &str) -> PathBuf {
        self.state.config.pods_dir().join(format!("{pod}.ready"))
    }

    fn pod_alive(&self, pod: &Pod) -> bool {
        let pid_file = self
            .state
            .config
            .pods_dir()
            .join(format!("{}.pid", pod.name));
        sys::read_pid(&pid_file).is_some_and(|p| sys::alive(p) && sys::runs(p, "nodeport-echo"))
    }

    fn create_pod(&mut self, t: &Template, node_name: &str) -> anyhow::Result<Pod> {
        let c = self.state.config.clone();
        let node = self.node(node_name).context("unknown node")?;
        let used: BTreeSet<Ipv4Addr> = self
            .state
            .pods
            .iter()
            .filter(|p| p.node == node.name)
            .map(|p| p.ip)
            .collect();
        let ip = (2..=254)
            .map(|h| Ipv4Addr::new(10, 244, node.index, h))
            .find(|a| !used.contains(a))
            .with_context(|| format!("{}'s pod CIDR is full", node.name))?;
        self.state.seq += 1;
        let seq = self.state.seq;
        let name = format!(
            "{}-{}-{}",
            t.deployment,
            t.hash,
            workload::short_hash(&format!("{}/{seq}", c.prefix), 5)
        );
        let host_if = format!("veth{}", workload::short_hash(&name, 8));
        let pod = Pod {
            name: name.clone(),
            namespace: t.namespace.clone(),
            deployment: t.deployment.clone(),
            template_hash: t.hash.clone(),
            node: node.name.clone(),
            ip,
            labels: t.labels.clone(),
            ports: t.ports.clone(),
            host_if: host_if.clone(),
            seq,
            terminating: false,
        };
        // Recorded before anything exists, so a crash midway leaves nothing `down` cannot find
        // (it also finds everything by name).
        self.state.pods.push(pod.clone());
        self.save()?;
        let ns = c.pod_ns(&name);
        sys::netns_add(&ns, false)?;
        sys::ip_in(
            &node.name,
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        let gw = node.gateway().to_string();
        sys::ip_in(
            &node.name,
            &["addr", "add", &format!("{gw}/32"), "dev", &host_if],
        )?;
        sys::ip_in(&node.name, &["link", "set", &host_if, "up"])?;
        sys::ip_in(
            &node.name,
            &["route", "replace", &format!("{ip}/32"), "dev", &host_if],
        )?;
        sys::ip_in(&ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        sys::ip_in(&ns, &["link", "set", "eth0", "up"])?;
        sys::ip_in(&ns, &["route", "add", "default", "via", &gw])?;
        // The pod's neighbours through the node too, as kind's ptp CNI routes them: with the /24
        // on-link the pod would ARP for a pod of its node, and nothing on the veth answers. (A
        // node's own address at a nodePort reaches such a pod once socket load balancing
        // rewrites the connect().)
        sys::ip_in(
            &ns,
            &[
                "route",
                "replace",
                &node.pod_cidr(),
                "via",
                &gw,
                "dev",
                "eth0",
            ],
        )?;
        self.start_echo(&pod)?;
        Ok(pod)
    }

    fn start_echo(&self, pod: &Pod) -> anyhow::Result<()> {
        let c = &self.state.config;
        let ready = self.ready_file(&pod.name);
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(&c.echo);
        cmd.args(["--node", &pod.node, "--pod", &pod.name])
            .args(["--pod-ip", &pod.ip.to_string()])
            .arg("--ready-file")
            .arg(&ready);
        let mut seen = BTreeSet::new();
        for p in &pod.ports {
            if seen.insert((p.port, p.protocol.clone())) {
                let flag = if p.protocol == "UDP" {
                    "--udp"
                } else {
                    "--tcp"
                };
                cmd.args([flag, &p.port.to_string()]);
            }
        }
        let log = c.pods_dir().join(format!("{}.log", pod.name));
        let cgroup = c.pod_cgroup(&pod.node, &pod.name)?;
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let pid = sys::spawn_in(&c.pod_ns(&pod.name), Some(&cgroup), &mut cmd, &log)?;
        std::fs::write(
            c.pods_dir().join(format!("{}.pid", pod.name)),
            format!("{pid}\n"),
        )?;
        Ok(())
    }

    fn delete_pod(&self, pod: &Pod) {
        let c = &self.state.config;
        let name = &pod.name;
        let pid_file = c.pods_dir().join(format!("{name}.pid"));
        if let Some(pid) = sys::read_pid(&pid_file).filter(|p| sys::runs(*p, "nodeport-echo")) {
            sys::stop(pid, Duration::from_secs(1));
        }
        // The veth pair (and the node's route to the pod) goes now: a deleted namespace's
        // devices go later, asynchronously, and the address may be reused at once.
        let _ = sys::ip_in(&pod.node, &["link", "del", &pod.host_if]);
        sys::netns_del(&c.pod_ns(name));
        if let Ok(cgroup) = c.pod_cgroup(&pod.node, name) {
            for pid in sys::cgroup_pids(&cgroup) {
                sys::stop(pid, Duration::from_secs(1));
            }
            // Cleanup: what stays is named by `down`'s leftover check.
            let _ = sys::cgroup_remove(&cgroup, Duration::from_secs(2));
        }
        for ext in ["pid", "ready", "log"] {
            let _ = std::fs::remove_file(c.pods_dir().join(format!("{name}.{ext}")));
        }
    }

    /// Adds one pod of Deployment `namespace/deployment` now, on the node that fits with the
    /// fewest of its pods, and rewrites the slices once it serves; does not wait for the agents.
    /// For churn faster than `apply` (which waits for every agent at each step).
    pub fn add_pod(&mut self, namespace: &str, deployment: &str) -> anyhow::Result<Pod> {
        let (templates, _) = self.templates()?;
        let t = templates
            .into_iter()
            .find(|t| t.namespace == namespace && t.deployment == deployment)
            .with_context(|| format!("no Deployment {namespace}/{deployment} in the workloads"))?;
        let node = self
            .nodes()
            .into_iter()
            .filter(|n| t.fits(n))
            .min_by_key(|n| {
                let pods = self.state.pods.iter().filter(|p| p.node == n.name);
                pods.filter(|p| p.deployment == deployment && !p.terminating)
                    .count()
            })
            .with_context(|| format!("no node fits {namespace}/{deployment}"))?;
        let pod = self.create_pod(&t, &node.name)?;
        let ready = self.ready_file(&pod.name);
        wait_until(Duration::from_secs(10), || ready.exists())
            .with_context(|| format!("pod {} never served", pod.name))?;
        self.write_manifests()?;
        Ok(pod)
    }

    /// Graceful deletion's first step: the pod's endpoint becomes terminating in the slices (no
    /// new connections), the pod keeps serving. Does not wait for the agents.
    pub fn mark_terminating(&mut self, pod: &str) -> anyhow::Result<()> {
        let p = self
            .state
            .pods
            .iter_mut()
            .find(|p| p.name == pod)
            .with_context(|| format!("no pod {pod}"))?;
        p.terminating = true;
        self.save()?;
        self.write_manifests()
    }

    /// Deletes a pod now (its server, veth and namespace) and rewrites the slices without it;
    /// does not wait for the agents.
    pub fn delete_pod_now(&mut self, pod: &str) -> anyhow::Result<()> {
        let p = self
            .state
            .pods
            .iter()
            .find(|p| p.name == pod)
            .with_context(|| format!("no pod {pod}"))?
            .clone();
        self.delete_pod(&p);
        self.state.pods.retain(|p| p.name != pod);
        self.save()?;
        self.write_manifests()
    }

    /// Deletes a pod as a lost sandbox would go: its veth first, so nothing it sends on the way
    /// out (FIN, RST) reaches anyone, then its server and namespace; rewrites the slices without
    /// it; does not wait for the agents.
    pub fn cut_pod_now(&mut self, pod: &str) -> anyhow::Result<()> {
        let p = self
            .state
            .pods
            .iter()
            .find(|p| p.name == pod)
            .with_context(|| format!("no pod {pod}"))?
            .clone();
        sys::ip_in(&p.node, &["link", "del", &p.host_if])?;
        self.delete_pod_now(pod)
    }

    /// Writes the Node objects and, per Service, the Service and its EndpointSlices into the
    /// manifests directory every agent reads (each file whole, by rename); removes files of
    /// Services that are gone.
    fn write_manifests(&self) -> anyhow::Result<()> {
        let c = &self.state.config;
        let dir = c.manifests_dir();
        let mut text = String::new();
        for n in c.nodes() {
            text.push_str("---\n");
            text.push_str(&serde_yaml_ng::to_string(&n.manifest())?);
        }
        let mut wanted = BTreeSet::from(["00-nodes.yaml".to_owned()]);
        sys::write_atomic(&dir.join("00-nodes.yaml"), &text)?;
        for svc in self.services()? {
            let file = format!(
                "svc-{}-{}.yaml",
                svc.metadata.namespace.as_deref().unwrap_or("default"),
                svc.metadata.name.as_deref().unwrap_or_default()
            );
            let mut text = format!("---\n{}", serde_yaml_ng::to_string(&svc)?);
            for slice in workload::endpoint_slices(&svc, &self.state.pods) {
                text.push_str("---\n");
                text.push_str(&serde_yaml_ng::to_string(&slice)?);
            }
            let path = dir.join(&file);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                sys::write_atomic(&path, &text)?;
            }
            wanted.insert(file);
        }
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && !wanted.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// `nodeport-agent list WHAT [-o json] --pin-root <node's root>`.
    pub fn agent_list(&self, node: &str, what: &str, json: bool) -> anyhow::Result<String> {
        let c = &self.state.config;
        let mut args = vec!["list", what];
        if json {
            args.extend(["-o", "json"]);
        }
        let root = c.pin_root(node);
        args.extend(["--pin-root", root.to_str().context("pin root")?]);
        sys::run(c.agent.to_str().context("agent path")?, &args)
    }

    /// Each node's frontends and the backend addresses its maps hold.
    pub fn programmed(&self, node: &str) -> anyhow::Result<BTreeMap<Frontend, BTreeSet<String>>> {
        let json: serde_json::Value =
            serde_json::from_str(&self.agent_list(node, "services", true)?)?;
        let mut out = BTreeMap::new();
        for s in json.as_array().into_iter().flatten() {
            let key = (
                s["node_port"].as_u64().unwrap_or_default() as u16,
                s["protocol"].as_str().unwrap_or_default().to_owned(),
            );
            let backends = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b["address"].as_str().map(str::to_owned))
                .collect();
            out.insert(key, backends);
        }
        Ok(out)
    }

    /// Waits until every node's agent has programmed exactly what the lab's slices say.
    pub fn wait_synced(&self, timeout: Duration) -> anyhow::Result<()> {
        let services = self.services()?;
        let deadline = Instant::now() + timeout;
        for n in self.nodes() {
            let want = workload::expected_backends(&services, &self.state.pods, &n.name);
            loop {
                let have = self.programmed(&n.name);
                if have.as_ref().is_ok_and(|h| *h == want) {
                    break;
                }
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(self.state.config.agent_log(&n.name))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    bail!(
                        "the agent of {} did not program the services within {timeout:?}:\n  want {want:?}\n  have {have:?}\n  its log ends:\n    {}",
                        n.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n    ")
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// One HTTP GET from the client namespace to `addr:port` (a new connection).
    pub fn get(&self, addr: Ipv4Addr, port: u16, timeout: Duration) -> anyhow::Result<Answer> {
        sys::in_netns(&self.state.config.client_ns(), || {
            http_get(addr, port, timeout)
        })?
    }

    /// One UDP datagram from the client namespace to `addr:port`, and its answer.
    pub fn udp(&self, addr: Ipv4Addr, port: u16, timeout: Duration) -> anyhow::Result<Answer> {
        sys::in_netns(&self.state.config.client_ns(), || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(timeout))?;
            s.send_to(b"hello", SocketAddrV4::new(addr, port))?;
            let mut buf = [0u8; 2048];
            let n = s.recv(&mut buf)?;
            Ok(serde_json::from_slice(&buf[..n])?)
        })?
    }

    /// Runs `f` in the client namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        sys::in_netns(&self.state.config.client_ns(), f)
    }

    /// One exchange with `target` by a process inside pod `pod` (its network namespace and
    /// cgroup, as `kubectl exec` runs one): `nodeport-echo get`.
    pub fn exec_in_pod(
        &self,
        pod: &str,
        target: SocketAddrV4,
        proto: Proto,
        timeout: Duration,
    ) -> Result<Exchange, ClientError> {
        let c = &self.state.config;
        let place = format!("pod {pod}");
        let fail = |failure| ClientError {
            client: place.clone(),
            target,
            proto,
            failure,
        };
        let p = self
            .state
            .pods
            .iter()
            .find(|p| p.name == pod)
            .ok_or_else(|| fail(Failure::Other("no such pod in the lab".into())))?;
        let cgroup = c
            .pod_cgroup(&p.node, pod)
            .map_err(|e| fail(Failure::Other(format!("{e:#}"))))?;
        self.exec_client(&place, &c.pod_ns(pod), &cgroup, target, proto, timeout)
    }

    /// One exchange with `target` by a process on node `node` (its network namespace and
    /// cgroup, outside every pod), as `docker exec <kind node>` runs one.
    pub fn exec_on_node(
        &self,
        node: &str,
        target: SocketAddrV4,
        proto: Proto,
        timeout: Duration,
    ) -> Result<Exchange, ClientError> {
        let place = format!("node {node}");
        let cgroup = self
            .state
            .config
            .node_cgroup(node)
            .map_err(|e| ClientError {
                client: place.clone(),
                target,
                proto,
                failure: Failure::Other(format!("{e:#}")),
            })?;
        self.exec_client(&place, node, &cgroup, target, proto, timeout)
    }

    fn exec_client(
        &self,
        place: &str,
        ns: &str,
        cgroup: &std::path::Path,
        target: SocketAddrV4,
        proto: Proto,
        timeout: Duration,
    ) -> Result<Exchange, ClientError> {
        let fail = |failure| ClientError {
            client: place.to_owned(),
            target,
            proto,
            failure,
        };
        let mut cmd = Command::new(&self.state.config.echo);
        cmd.arg("get")
            .arg(target.to_string())
            .args(proto.flag())
            .args(["--timeout-ms", &timeout.as_millis().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = sys::spawn_entering(ns, Some(cgroup), &mut cmd, false)
            .map_err(|e| fail(Failure::Other(format!("{e:#}"))))?;
        // Connect, then read: each bounded by `timeout` inside the client.
        let deadline = Instant::now() + timeout * 2 + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(Failure::Other(format!(
                    "nodeport-echo get still running after {:?}: killed",
                    timeout * 2 + Duration::from_secs(5)
                ))));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = child
            .wait_with_output()
            .map_err(|e| fail(Failure::Other(format!("nodeport-echo get: {e}"))))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(fail(Failure::from_exit_code(out.status.code(), &stderr)));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            fail(Failure::Other(format!(
                "nodeport-echo get printed {:?}: {e}",
                String::from_utf8_lossy(&out.stdout)
            )))
        })
    }
}

/// A client exchange that failed: who tried what, and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientError {
    /// "pod <name>" or "node <name>".
    pub client: String,
    pub target: SocketAddrV4,
    pub proto: Proto,
    pub failure: Failure,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} over {}: {}",
            self.client, self.target, self.proto, self.failure
        )
    }
}

impl std::error::Error for ClientError {}

/// What a pod answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub node: String,
    pub pod: String,
    pub pod_ip: String,
    pub port: u16,
    pub proto: String,
    pub client: String,
    pub client_port: u16,
}

/// A GET on a new connection (call it from inside the client namespace); the error says whether
/// the connection failed (refused, timed out) or the exchange did.
pub fn http_get(addr: Ipv4Addr, port: u16, timeout: Duration) -> anyhow::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&SocketAddrV4::new(addr, port).into(), timeout)
        .map_err(|e| anyhow::Error::new(e).context(format!("connecting to {addr}:{port}")))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    (|| -> anyhow::Result<Answer> {
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: {addr}:{port}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("answer {head:?}");
        }
        Ok(serde_json::from_str(body.trim())?)
    })()
    .with_context(|| format!("HTTP exchange with {addr}:{port} after connecting"))
}

fn wait_until(timeout: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Whether an error chain holds a connection failure (refused, timed out, unreachable) rather
/// than a failure after connecting.
pub fn is_connect_failure(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.to_string().starts_with("connecting to"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owns_only_the_lab_s_own_names() {
        let c = Config::new("np-lab", "w".into(), "a".into(), "e".into());
        for yes in [
            "np-lab-net",
            "np-lab-client",
            "np-lab-control-plane",
            "np-lab-worker",
            "np-lab-worker2",
            "np-lab-pod-myapp-x",
        ] {
            assert!(c.owns(yes), "{yes}");
        }
        for no in [
            "np-lab",
            "np-lab-2-net",
            "np-lab-2-worker",
            "np-labx-net",
            "nodeport",
            "np-lab-workerx",
        ] {
            assert!(!c.owns(no), "{no}");
        }
        assert_eq!(c.nodes()[2].name, "np-lab-worker2");
        assert_eq!(c.nodes()[2].addr, Ipv4Addr::new(198, 18, 0, 4));
    }

    #[test]
    fn prefixes_are_checked() {
        let mut c = Config::new("np-lab", "w".into(), "a".into(), "e".into());
        assert!(c.validate().is_ok());
        c.prefix = "../x".into();
        assert!(c.validate().is_err());
    }
}
