//! A network namespace that gives `BPF_PROG_TEST_RUN` a real FIB to look up: the programs call
//! `bpf_fib_lookup`, so a fixture's expected output (egress MACs, TTL) comes from routes and
//! static neighbours set here, not from a mock. Removed on drop, also when a test panics.
//!
//! Layout (the "node" is 198.18.0.2; addresses never leave the namespaces):
//! - `f0` 198.18.0.2/24, MAC 02:00:00:00:00:02; neighbours node2 198.18.0.3 (02:..:03) and the
//!   client 198.18.0.100 (02:..:64); route 10.244.2.0/24 via node2 (kindnet style).
//! - `p0` 10.244.1.1/24, the host side of a local pod 10.244.1.10 (02:00:00:00:01:0a).
use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{netns::ip, packet::Mac};

pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const NODE2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
pub const NODE_MAC: Mac = [2, 0, 0, 0, 0, 2];
pub const NODE2_MAC: Mac = [2, 0, 0, 0, 0, 3];
pub const CLIENT_MAC: Mac = [2, 0, 0, 0, 0, 0x64];
pub const POD_GW_MAC: Mac = [2, 0, 0, 0, 1, 1];
pub const LOCAL_POD_MAC: Mac = [2, 0, 0, 0, 1, 0x0a];

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct FixtureNet {
    pub ns: String,
    peer: String,
    pub node_ifindex: u32,
    pub pod_ifindex: u32,
}

impl FixtureNet {
    pub fn create() -> Self {
        crate::require_kernel();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let ns = format!("npfx-{}-{n}", std::process::id());
        let peer = format!("{ns}-p");
        let mut net = Self {
            ns: ns.clone(),
            peer: peer.clone(),
            node_ifindex: 0,
            pod_ifindex: 0,
        };
        // From here on, Drop cleans up whatever was created.
        ip(&["netns", "add", &ns]);
        ip(&["netns", "add", &peer]);
        let x = |args: &[&str]| {
            let mut v = vec!["-n", ns.as_str()];
            v.extend_from_slice(args);
            ip(&v);
        };
        x(&[
            "link", "add", "f0", "type", "veth", "peer", "name", "f1", "netns", &peer,
        ]);
        x(&[
            "link", "add", "p0", "type", "veth", "peer", "name", "p1", "netns", &peer,
        ]);
        x(&["link", "set", "f0", "address", "02:00:00:00:00:02", "up"]);
        x(&["link", "set", "p0", "address", "02:00:00:00:01:01", "up"]);
        x(&["link", "set", "lo", "up"]);
        ip(&["-n", &peer, "link", "set", "f1", "up"]);
        ip(&["-n", &peer, "link", "set", "p1", "up"]);
        x(&["addr", "add", "198.18.0.2/24", "dev", "f0"]);
        x(&["addr", "add", "10.244.1.1/24", "dev", "p0"]);
        for (addr, mac, dev) in [
            ("198.18.0.3", "02:00:00:00:00:03", "f0"),
            ("198.18.0.100", "02:00:00:00:00:64", "f0"),
            ("10.244.1.10", "02:00:00:00:01:0a", "p0"),
        ] {
            x(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        x(&[
            "route",
            "add",
            "10.244.2.0/24",
            "via",
            "198.18.0.3",
            "dev",
            "f0",
        ]);
        let sysctl = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()
            .expect("sysctl");
        assert!(sysctl.success(), "enabling forwarding in {ns}");
        let ifindex = |dev: &str| -> u32 {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "cat",
                    &format!("/sys/class/net/{dev}/ifindex"),
                ])
                .output()
                .expect("reading ifindex");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("ifindex")
        };
        net.node_ifindex = ifindex("f0");
        net.pod_ifindex = ifindex("p0");
        net
    }

    /// Runs `f` on a thread inside the namespace (BPF_PROG_TEST_RUN resolves the ingress
    /// interface and the FIB in the calling thread's namespace).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns into {path}: {}",
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for FixtureNet {
    fn drop(&mut self) {
        for ns in [&self.ns, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
