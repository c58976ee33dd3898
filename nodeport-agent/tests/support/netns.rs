//! Network namespaces for the agent's end-to-end tests: a node (where the agent runs, with an
//! `eth0` veth towards a client namespace) and pods behind veths running a line echo server, so
//! the dataplane can be checked with real TCP connections through the nodePort.
use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Fails (never skips) a kernel test run without root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "kernel test: run as root (bash scripts/test.sh)"
    );
}

/// A network namespace, deleted on drop.
pub struct Ns(pub String);

impl Ns {
    /// `<prefix>-<pid>-<tag>`; a leftover of the same name is deleted first.
    pub fn new(prefix: &str, tag: &str) -> Self {
        let ns = Self(format!("{prefix}-{}-{tag}", std::process::id()));
        let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
        run("ip", &["netns", "add", &ns.0]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    /// Runs `f` on a thread inside the namespace (processes it starts are born there too).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(self.path()).expect("netns file");
        std::thread::spawn(move || {
            // SAFETY: a valid netns fd; only this thread moves.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Deletes namespaces named `<prefix>-<pid>-…` whose process is gone (runs killed before their
/// guards ran).
pub fn sweep_namespaces(prefix: &str) {
    for entry in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// A node namespace with `eth0` (198.18.0.2/24) towards a client namespace (198.18.0.100), and
/// one pod namespace per address, routed from the node over its own veth.
pub struct Topology {
    pub client: Ns,
    pub node: Ns,
    pub pods: Vec<Ns>,
    stop: Arc<AtomicBool>,
}

impl Topology {
    pub fn new(prefix: &str, pods: &[Ipv4Addr]) -> Self {
        sweep_namespaces(prefix);
        let client = Ns::new(prefix, "cl");
        let node = Ns::new(prefix, "node");
        node.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &client.0,
        ]);
        node.ip(&["addr", "add", &format!("{NODE}/24"), "dev", "eth0"]);
        node.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        run(
            "ip",
            &[
                "netns",
                "exec",
                &node.0,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut namespaces = Vec::new();
        for (i, addr) in pods.iter().enumerate() {
            let pod = Ns::new(prefix, &format!("p{i}"));
            let host = format!("vp{i}");
            node.ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &pod.0,
            ]);
            node.ip(&["addr", "add", "10.244.1.1/32", "dev", &host]);
            node.ip(&["link", "set", &host, "up"]);
            node.ip(&["route", "add", &format!("{addr}/32"), "dev", &host]);
            pod.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
            pod.ip(&["route", "add", "default", "via", "10.244.1.1"]);
            // Other pods through the node, as the ptp CNI (kindnet) routes them: the /24 on
            // the veth alone would have the pod ARP for its neighbours, which nobody answers.
            pod.ip(&[
                "route",
                "replace",
                "10.244.1.0/24",
                "via",
                "10.244.1.1",
                "dev",
                "eth0",
            ]);
            serve(&pod, *addr, stop.clone());
            namespaces.push(pod);
        }
        Self {
            client,
            node,
            pods: namespaces,
            stop,
        }
    }

    /// A TCP connection from the client to `node_port` on the node.
    pub fn connect(&self, node_port: u16) -> std::io::Result<BufReader<TcpStream>> {
        self.client.run(move || {
            let s = TcpStream::connect_timeout(
                &SocketAddrV4::new(NODE, node_port).into(),
                Duration::from_secs(2),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(BufReader::new(s))
        })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A pod's echo server on port 8080: for every line, answers "<pod ip> <peer ip:port>".
fn serve(pod: &Ns, addr: Ipv4Addr, stop: Arc<AtomicBool>) {
    let listener = pod.run(move || TcpListener::bind(SocketAddrV4::new(addr, 8080)).unwrap());
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, peer)) => {
                    std::thread::spawn(move || {
                        s.set_nonblocking(false).unwrap();
                        let mut w = s.try_clone().unwrap();
                        for line in BufReader::new(s).lines() {
                            if line.is_err() || writeln!(w, "{addr} {peer}").is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

/// One request on a (kept-alive) connection; returns the pod that answered.
pub fn ask(conn: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    conn.get_mut().write_all(b"hi\n")?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    line.split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| std::io::Error::other(format!("bad answer {line:?}")))
}
