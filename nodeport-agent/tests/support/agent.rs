//! The real `nodeport-agent run` binary in a node namespace, its log, its pins and what its maps
//! hold.
use std::{
    collections::BTreeMap,
    fs::File,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nodeport_agent::{PinLayout, tables::ServiceTables};

use super::netns::Ns;

pub const AGENT: &str = env!("CARGO_BIN_EXE_nodeport-agent");

/// A running agent, killed on drop; its pins are unloaded by [`Pins`].
pub struct Agent {
    child: Child,
    pub log: PathBuf,
}

impl Agent {
    /// `nodeport-agent run` in `node` with `source_args` (`--manifests DIR` or `--kubeconfig F`),
    /// interface eth0, node name node-a; stderr appended to `log`.
    pub fn start(node: &Ns, source_args: &[&str], pin_root: &str, log: &Path) -> Self {
        let child = Command::new("nsenter")
            .args([&format!("--net={}", node.path()), AGENT, "run"])
            .args(["--node-name", "node-a", "--interfaces", "eth0"])
            .args(source_args)
            .args(["--pin-root", pin_root, "--min-sync-period-ms", "50"])
            .args(["--healthz-bind-address", "127.0.0.1:10256"])
            .stdout(Stdio::null())
            .stderr(File::options().create(true).append(true).open(log).unwrap())
            .spawn()
            .expect("starting the agent");
        Self {
            child,
            log: log.to_owned(),
        }
    }

    /// The log so far, without terminal colour codes (the agent colours its log even into a
    /// file).
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pin root under /sys/fs/bpf and a work directory, unloaded and removed on drop.
pub struct Pins {
    pub root: String,
    pub work: PathBuf,
}

impl Pins {
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}-{}", std::process::id());
        sweep_pins(prefix);
        let work = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        Self {
            root: format!("/sys/fs/bpf/{name}"),
            work,
        }
    }

    /// Frontend nodePort → its backends (address:port), TCP and UDP alike; empty if the maps are
    /// not there yet.
    pub fn services(&self) -> BTreeMap<u16, Vec<SocketAddrV4>> {
        let Ok(t) = ServiceTables::open(&PinLayout::new(&self.root).dir()) else {
            return BTreeMap::new();
        };
        let backends: BTreeMap<u32, SocketAddrV4> = t
            .backends()
            .unwrap_or_default()
            .into_iter()
            .map(|(id, b)| (id, b.addr))
            .collect();
        t.services()
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let mut addrs: Vec<SocketAddrV4> = s
                    .backends
                    .iter()
                    .filter_map(|id| backends.get(id).copied())
                    .collect();
                addrs.sort();
                (s.node_port, addrs)
            })
            .collect()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Command::new(AGENT)
            .args(["unload", "--pin-root", &self.root])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Unloads pin roots `/sys/fs/bpf/<prefix>-<pid>` of runs whose process is gone.
fn sweep_pins(prefix: &str) {
    for entry in std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let root = format!("/sys/fs/bpf/{name}");
            let _ = Command::new(AGENT)
                .args(["unload", "--pin-root", &root])
                .output();
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

/// Polls `ok` every 20 ms until it holds; panics with the agent's log after `timeout`. Returns how
/// long it took.
pub fn wait_for(
    what: &str,
    agent: &Agent,
    timeout: Duration,
    mut ok: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// Removes `ESC [ … letter` sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
