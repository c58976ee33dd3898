//! The capability set in `nodeport_agent::caps::REQUIRED` is the minimal one, shown on the real
//! kernel: the agent binary, limited with `setpriv` to exactly those capabilities, loads,
//! attaches to a veth in a fresh network namespace and pins everything; with any one dropped, the
//! start-up check refuses and names it, and the kernel itself refuses too (the same load through
//! the library, without the check, fails with EPERM or a verifier rejection). Needs root and
//! setpriv (util-linux); fails without them.
//!
//! `setpriv --bounding-set=-all,+x… --inh-caps=-all --ambient-caps=-all` as root: on execve a
//! root process's permitted and effective sets become its bounding set, so the program runs with
//! exactly the listed capabilities (checked through /proc/self/status below). `nsenter --net`
//! rather than `ip netns exec`, which would remount /sys and hide bpffs.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use nodeport_agent::caps::{REQUIRED, Requirement};

const AGENT: &str = env!("CARGO_BIN_EXE_nodeport-agent");
const PREFIX: &str = "np-caps-";
const IFACE: &str = "v0";
const CHILD_PIN_ROOT: &str = "NP_CAPS_CHILD_PIN_ROOT";

fn require_root_and_setpriv() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these kernel tests load BPF programs and create network namespaces: run them as root"
    );
    let found = Command::new("setpriv").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "setpriv (util-linux) is needed to limit the agent's capabilities"
    );
    sweep_leftovers();
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `np-caps-<pid>-<n>` → pid.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes namespaces and pin directories of earlier runs that were killed before their guards
/// ran (their pid is gone).
fn sweep_leftovers() {
    let cgroups = nodeport_agent::cgroup::cgroup2_mount().unwrap_or_default();
    for dir in [Path::new("/run/netns"), Path::new("/sys/fs/bpf"), &cgroups] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|pid| !pid_alive(pid)) {
                if dir == Path::new("/run/netns") {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                } else if dir == cgroups {
                    let _ = std::fs::remove_dir(entry.path());
                } else {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
}

fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with an up veth pair (`v0` carries the programs) and a bpffs directory
/// for the pins; both removed on drop, namespace first: deleting it destroys the veth, which
/// detaches every program attached to it, so removing the pins then frees everything.
struct Sandbox {
    name: String,
    pin_dir: PathBuf,
    /// A cgroup v2 directory for the socket programs (`load --cgroup`).
    cgroup: PathBuf,
}

impl Sandbox {
    fn new() -> Self {
        let name = unique_name();
        let pin_dir = Path::new("/sys/fs/bpf").join(&name);
        let cgroup = nodeport_agent::cgroup::cgroup2_mount()
            .expect("a cgroup2 mount")
            .join(&name);
        std::fs::create_dir(&cgroup).expect("creating a cgroup");
        let sandbox = Self {
            name,
            pin_dir,
            cgroup,
        };
        sh("ip", &["netns", "add", &sandbox.name]);
        sh(
            "ip",
            &[
                "-n",
                &sandbox.name,
                "link",
                "add",
                IFACE,
                "type",
                "veth",
                "peer",
                "name",
                "v1",
            ],
        );
        for dev in [IFACE, "v1"] {
            sh("ip", &["-n", &sandbox.name, "link", "set", dev, "up"]);
        }
        std::fs::create_dir(&sandbox.pin_dir).expect("creating the pin directory on bpffs");
        sandbox
    }

    fn pin_root(&self) -> PathBuf {
        self.pin_dir.join("root")
    }

    /// Runs `program args` in the namespace with exactly `caps` (Kubernetes spelling, `BPF`).
    fn run_with(
        &self,
        caps: &[String],
        program: &str,
        args: &[&str],
        envs: &[(&str, &Path)],
    ) -> Output {
        let bounding: String = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .args([
                "setpriv",
                "--inh-caps=-all",
                "--ambient-caps=-all",
                &format!("--bounding-set={bounding}"),
                "--",
                program,
            ])
            .args(args)
            .env("RUST_BACKTRACE", "0");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().expect("running nsenter")
    }

    fn agent_load(&self, caps: &[String]) -> Output {
        let root = self.pin_root();
        self.run_with(
            caps,
            AGENT,
            &[
                "load",
                "--iface",
                IFACE,
                "--pin-root",
                root.to_str().expect("utf-8 path"),
                "--cgroup",
                self.cgroup.to_str().expect("utf-8 path"),
            ],
            &[],
        )
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        // A cgroup goes once empty (no process ever entered it); its links die with it.
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn names(reqs: impl IntoIterator<Item = Requirement>) -> Vec<String> {
    reqs.into_iter().map(|r| r.kubernetes_name()).collect()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn setpriv_leaves_exactly_the_listed_capabilities() {
    require_root_and_setpriv();
    let sandbox = Sandbox::new();
    let out = sandbox.run_with(
        &names(REQUIRED),
        "grep",
        &["^CapEff:", "/proc/self/status"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let hex = String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("CapEff:")
        .trim()
        .to_owned();
    let effective = u64::from_str_radix(&hex, 16).expect("CapEff is hex");
    let wanted = REQUIRED
        .iter()
        .fold(0u64, |m, r| m | 1u64 << r.capability.index());
    assert_eq!(effective, wanted, "CapEff {hex}");
}

#[test]
fn agent_loads_attaches_and_pins_with_exactly_the_required_capabilities() {
    require_root_and_setpriv();
    let sandbox = Sandbox::new();
    let out = sandbox.agent_load(&names(REQUIRED));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("loaded; pinned under"), "{}", text(&out));

    let dir = nodeport_agent::PinLayout::new(sandbox.pin_root()).dir();
    for prog in nodeport_agent::loader::PROGRAMS {
        assert!(dir.join("progs").join(prog).exists(), "{prog} not pinned");
    }
    // The socket programs are attached to the cgroup too (one pinned link each).
    let cgroup_links: Vec<PathBuf> = std::fs::read_dir(dir.join("cgroup-links"))
        .expect("cgroup links pinned")
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        cgroup_links.len(),
        nodeport_common::program_names::SOCK.len(),
        "{cgroup_links:?}"
    );
    for map in ["np_config", "np_front4", "np_ct4", "np_stats"] {
        assert!(dir.join(map).exists(), "{map} not pinned");
    }
    let links: Vec<String> = std::fs::read_dir(dir.join("links").join(IFACE))
        .expect("links of v0 pinned")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // Auto ingress on a veth is TC: one ingress and one egress attachment (tcx link or netlink
    // marker, depending on the kernel).
    assert!(links.iter().any(|l| l.contains("ingress")), "{links:?}");
    assert!(links.iter().any(|l| l.contains("egress")), "{links:?}");

    // Each pinned link holds the pinned program of its direction, as the kernel reports it.
    let bpftool_id = |what: &str, path: &Path, field: &str| -> u64 {
        let out = Command::new("bpftool")
            .args(["-j", what, "show", "pinned"])
            .arg(path)
            .output()
            .expect("bpftool");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("bpftool {what} show pinned {}: {e}", path.display()));
        json[field].as_u64().expect(field)
    };
    for (link, prog) in [
        ("tcx-ingress", "np_tc_ingress"),
        ("tcx-egress", "np_tc_egress"),
    ] {
        let link = dir.join("links").join(IFACE).join(link);
        assert_eq!(
            bpftool_id("link", &link, "prog_id"),
            bpftool_id("prog", &dir.join("progs").join(prog), "id"),
            "{}",
            link.display()
        );
    }
}

#[test]
fn without_any_one_required_capability_the_agent_refuses_naming_it() {
    require_root_and_setpriv();
    for dropped in REQUIRED {
        let sandbox = Sandbox::new();
        let rest = names(REQUIRED.into_iter().filter(|r| *r != dropped));
        let out = sandbox.agent_load(&rest);
        assert!(
            !out.status.success(),
            "without {}: {}",
            dropped.capability,
            text(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expected = format!(
            "missing capability {}: {}",
            dropped.capability, dropped.needed_for
        );
        assert!(stderr.contains(&expected), "{}", text(&out));
        // Only the dropped one is reported.
        assert_eq!(
            stderr.matches("missing capability").count(),
            1,
            "{}",
            text(&out)
        );
        assert!(
            !sandbox.pin_root().exists(),
            "nothing is pinned when the check fails"
        );
    }
}

/// Not a test on its own: run by `the_kernel_refuses_without_each_required_capability` under
/// setpriv, it loads and attaches through the library, bypassing the start-up check.
#[test]
#[ignore = "a child process of the_kernel_refuses_without_each_required_capability"]
fn child_load_and_attach_without_the_check() {
    let root = std::env::var_os(CHILD_PIN_ROOT).expect("the parent sets the pin root");
    let layout = nodeport_agent::PinLayout::new(PathBuf::from(root));
    let plan = nodeport_agent::AttachPlan {
        ingress: nodeport_agent::Ingress::Auto,
        egress: true,
        tc_backend: nodeport_agent::TcBackend::Auto,
    };
    let result = nodeport_agent::Dataplane::load(&layout)
        .and_then(|mut dp| dp.attach_interface(IFACE, &plan).map(|_| ()));
    if let Err(e) = result {
        let mut chain = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            chain.push_str(&format!(": {s}"));
            source = s.source();
        }
        panic!("CHILD FAILED: {chain}");
    }
    println!("CHILD LOADED AND ATTACHED");
}

#[test]
fn the_kernel_refuses_without_each_required_capability() {
    require_root_and_setpriv();
    let me = std::env::current_exe().expect("the test binary");
    let me = me.to_str().expect("utf-8 path");
    let child = |sandbox: &Sandbox, caps: &[String]| {
        let root = sandbox.pin_root();
        sandbox.run_with(
            caps,
            me,
            &[
                "--exact",
                "child_load_and_attach_without_the_check",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ],
            &[(CHILD_PIN_ROOT, &root)],
        )
    };

    // The child itself works with the full set, so its failures below are the kernel's answer
    // to the missing capability and nothing else.
    let sandbox = Sandbox::new();
    let out = child(&sandbox, &names(REQUIRED));
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("CHILD LOADED AND ATTACHED"),
        "{}",
        text(&out)
    );
    drop(sandbox);

    for dropped in REQUIRED {
        let sandbox = Sandbox::new();
        let rest = names(REQUIRED.into_iter().filter(|r| *r != dropped));
        let out = child(&sandbox, &rest);
        let all = text(&out);
        assert!(
            !out.status.success(),
            "without {}: {all}",
            dropped.capability
        );
        assert!(all.contains("CHILD FAILED"), "{all}");
        assert!(
            all.contains("Operation not permitted")
                || all.contains("Permission denied")
                || all.contains("prohibited"),
            "without {} the kernel should refuse: {all}",
            dropped.capability
        );
        println!(
            "without {}: {}",
            dropped.capability,
            all.lines()
                .find(|l| l.contains("CHILD FAILED"))
                .unwrap_or("")
        );
    }
}
