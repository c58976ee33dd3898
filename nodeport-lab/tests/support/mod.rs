//! What every lab test binary needs: the binaries, root, a lab torn down on drop, and the sweep of
//! labs left by test processes that were killed. Each test file uses its own name prefix.
#![allow(dead_code)] // each test binary uses its own part of it

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use nodeport_lab::{Config, Lab, down, leftovers};

pub const ECHO: &str = env!("CARGO_BIN_EXE_nodeport-echo");

/// The agent binary cargo built beside this test (`cargo test --workspace` builds it), or
/// `NODEPORT_AGENT_BIN`.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NODEPORT_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/nodeport-agent
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("nodeport-agent");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p nodeport-agent`, with --release for a \
         release test) or run `cargo test --workspace` (bash scripts/test.sh), which builds it",
        bin.display()
    );
    bin
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests need root (network namespaces, BPF): run bash scripts/test.sh as root"
    );
}

/// A lab for one test, torn down on drop; what the teardown left behind fails the test.
pub struct TestLab {
    pub lab: Lab,
    pub cfg: Config,
    pub work: PathBuf,
}

impl TestLab {
    /// `nodeport-agent stats` of a node, by counter name: the packet counters (packets) and the
    /// socket programs' counters (calls).
    pub fn counters(&self, node: &str) -> std::collections::BTreeMap<String, u64> {
        let root = self.cfg.pin_root(node);
        let text = nodeport_lab::sys::run(
            self.cfg.agent.to_str().unwrap(),
            &["stats", "--pin-root", root.to_str().unwrap()],
        )
        .unwrap();
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.to_owned(), w.next()?.parse().ok()?))
            })
            .collect()
    }

    /// Packets the node's XDP/TC programs translated (new, established, replies, reselected).
    pub fn translated(&self, node: &str) -> u64 {
        let c = self.counters(node);
        ["new_flow", "established", "reply", "reselected"]
            .iter()
            .map(|k| c.get(*k).copied().unwrap_or(0))
            .sum()
    }

    /// One socket-program counter of a node (`sock_translated`, …).
    pub fn sock(&self, node: &str, counter: &str) -> u64 {
        self.counters(node)[counter]
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(e) = down(&self.cfg) {
            eprintln!("cleanup: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.work);
        let left = leftovers(&self.cfg);
        // A second panic while unwinding would abort the whole test binary.
        if !std::thread::panicking() {
            assert_eq!(left, Vec::<String>::new(), "the lab's teardown left these");
        } else if !left.is_empty() {
            eprintln!("cleanup left {left:?}");
        }
    }
}

/// Removes labs (`<prefix><pid>-<n>…`: namespaces, state, node cgroups) of earlier test processes
/// that died before their guards ran. Once per test binary.
pub fn sweep_stale(prefix: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let entries = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        };
        // A lab killed while `down` ran may have nothing left but its node cgroups.
        let cgroups = nodeport_lab::sys::cgroup2_mount()
            .map(|m| entries(&m))
            .unwrap_or_default();
        let names = nodeport_lab::sys::netns_list()
            .into_iter()
            .chain(entries(Path::new(nodeport_lab::STATE_ROOT)))
            .chain(cgroups);
        let mut stale = BTreeSet::new();
        for name in names {
            let Some((pid, rest)) = name.strip_prefix(prefix).and_then(|r| r.split_once('-'))
            else {
                continue;
            };
            let Some(n) = rest.split('-').next() else {
                continue;
            };
            if pid.parse::<u32>().is_ok_and(|p| p != std::process::id())
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                stale.insert(format!("{prefix}{pid}-{n}"));
            }
        }
        for lab in stale {
            let _ = down(&Config::new(
                &lab,
                PathBuf::new(),
                agent_binary(),
                ECHO.into(),
            ));
        }
    });
}
