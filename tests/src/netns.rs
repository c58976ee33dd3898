//! Network namespaces for tests: created with `ip netns add` (so they are visible to `ip -n`,
//! `nsenter` and a human debugging a failure), entered from a dedicated thread with setns(2), and
//! deleted on drop, also during a panic's unwinding. Test traffic only ever flows between
//! namespaces created here, on TEST-NET-2 (198.51.100.0/24) addresses.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Output},
    sync::Once,
};

use crate::unique;

const PREFIX: &str = "npt";

/// Runs `ip` with `args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) -> Output {
    run("ip", args)
}

/// Runs a command, panicking with its output on failure.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/setup.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `npt-<pid>-<n>-<tag>` with loopback up.
    pub fn new(tag: &str) -> Self {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        let name = format!("{PREFIX}-{}-{}-{tag}", std::process::id(), unique());
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> args…`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result (a panic
    /// in `f` is re-raised here). Only that thread changes namespace: setns(CLONE_NEWNET) affects
    /// the calling thread alone, and the thread ends with `f`. Sockets and attachments made in `f`
    /// stay in the namespace after it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path())
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path().display()));
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                // SAFETY: a valid namespace fd; setns only changes this thread's namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "cleanup: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cleanup: ip netns del {}: {e}", self.name),
        }
    }
}

/// Deletes namespaces left by test processes that were killed before their guards ran (SIGKILL,
/// a timeout): names carry the pid, so a namespace whose process is gone is an orphan.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&format!("{PREFIX}-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// Two namespaces joined by a veth pair, addressed on TEST-NET-2:
/// `a` (`a_if`, 198.51.100.1/24) <-> `b` (`b_if`, 198.51.100.2/24).
pub struct VethPair {
    pub a: Netns,
    pub b: Netns,
    pub a_if: String,
    pub b_if: String,
}

impl VethPair {
    pub const A_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    pub const B_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

    pub fn new() -> Self {
        let a = Netns::new("a");
        let b = Netns::new("b");
        let n = unique();
        let (a_if, b_if) = (format!("npa{n}"), format!("npb{n}"));
        ip(&[
            "link",
            "add",
            &a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
            "netns",
            b.name(),
        ]);
        a.ip(&["addr", "add", "198.51.100.1/24", "dev", &a_if]);
        b.ip(&["addr", "add", "198.51.100.2/24", "dev", &b_if]);
        a.ip(&["link", "set", &a_if, "up"]);
        b.ip(&["link", "set", &b_if, "up"]);
        Self { a, b, a_if, b_if }
    }

    /// MAC address of `a_if`.
    pub fn a_mac(&self) -> [u8; 6] {
        mac_of(&self.a, &self.a_if)
    }
}

impl Default for VethPair {
    fn default() -> Self {
        Self::new()
    }
}

/// A namespace with one veth pair inside it, for attach/detach tests that need an interface but
/// no traffic (this kernel has no `dummy` driver). `iface` is the end the tests attach to.
pub struct IfaceNs {
    pub ns: Netns,
    pub iface: String,
}

impl IfaceNs {
    pub fn new() -> Self {
        let ns = Netns::new("i");
        let n = unique();
        let (iface, peer) = (format!("npi{n}"), format!("npp{n}"));
        ns.ip(&["link", "add", &iface, "type", "veth", "peer", "name", &peer]);
        ns.ip(&["link", "set", &iface, "up"]);
        ns.ip(&["link", "set", &peer, "up"]);
        Self { ns, iface }
    }
}

impl Default for IfaceNs {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads an interface's MAC address with `ip -br link`.
pub fn mac_of(ns: &Netns, iface: &str) -> [u8; 6] {
    let out = ns.ip(&["-br", "link", "show", "dev", iface]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in {text:?}"));
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("6-byte MAC")
}

/// `ip -d link show dev <iface>` in `ns`, as text: shows attached XDP programs and their mode.
pub fn link_details(ns: &Netns, iface: &str) -> String {
    String::from_utf8_lossy(&ns.ip(&["-d", "link", "show", "dev", iface]).stdout).into_owned()
}
