//! `cargo xtask kind up|deploy|e2e|down`: the agent as a DaemonSet on a kind cluster
//! (deploy/kind/cluster.yaml: one control plane, three workers, no kube-proxy).
//!
//! - `up`: `kind create cluster --config deploy/kind/cluster.yaml`, then makes sure every node has
//!   bpffs at /sys/fs/bpf (the agent pins there and never mounts it itself).
//! - `deploy`: `docker build -f Containerfile`, `kind load docker-image`, `kubectl apply -k
//!   deploy/kind/`, a rollout restart (the tag does not change between builds) and waits for it.
//! - `e2e`: applies deploy/kind/example/podinfo.yaml and, as the podinfo walkthrough's
//!   connectivity check, requests every node at the nodePort, from the host through the
//!   extraPortMappings and from inside the cluster (`docker exec` into another node, every
//!   node's InternalIP); any miss fails. Nothing else serves nodePorts in this cluster, so an answer is
//!   the agent's dataplane at work.
//! - `down`: `kind delete cluster`.
//!
//! docker, kind and kubectl must be installed; a missing one is named with how to install it.

use std::{
    ffi::OsStr,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// The image the DaemonSet runs (deploy/base/daemonset.yaml) and `deploy` builds.
pub const IMAGE: &str = "nodeport-agent:dev";
const NAMESPACE: &str = "nodeport-system";
const DAEMONSET: &str = "nodeport-agent";
const EXAMPLE: &str = "deploy/kind/example/podinfo.yaml";
const EXAMPLE_SERVICE: &str = "podinfo";
const CLUSTER_CONFIG: &str = "deploy/kind/cluster.yaml";

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
    /// How long to wait for rollouts and for every node to answer.
    #[arg(long, global = true, default_value_t = 180)]
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Action {
    /// Create the kind cluster of deploy/kind/cluster.yaml (and mount bpffs on its nodes).
    Up,
    /// Build the image, load it into kind, apply deploy/kind/ and wait for the rollout.
    Deploy,
    /// Apply the example NodePort workload and check every node answers at the nodePort.
    E2e,
    /// Delete the kind cluster.
    Down,
}

/// A tool the action needs and how to get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub name: &'static str,
    pub install: &'static str,
}

pub const DOCKER: Tool = Tool {
    name: "docker",
    install: "install Docker Engine (https://docs.docker.com/engine/install/) and make sure `docker info` works for this user",
};
pub const KIND: Tool = Tool {
    name: "kind",
    install: "install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation), e.g. `go install sigs.k8s.io/kind@latest`",
};
pub const KUBECTL: Tool = Tool {
    name: "kubectl",
    install: "install kubectl (https://kubernetes.io/docs/tasks/tools/#kubectl)",
};

impl Action {
    pub fn tools(self) -> &'static [Tool] {
        match self {
            // kind drives docker: both are needed to create or delete a cluster.
            Action::Up | Action::Down => &[DOCKER, KIND],
            Action::Deploy => &[DOCKER, KIND, KUBECTL],
            Action::E2e => &[DOCKER, KUBECTL],
        }
    }
}

/// The executable called `name` in the directories of `path` (a `PATH`-style list), if any.
pub fn find_in_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|f| {
            f.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Fails naming every tool of `tools` missing from `path`, and how to install each.
pub fn require_tools(tools: &[Tool], path: &OsStr) -> anyhow::Result<()> {
    let missing: Vec<&Tool> = tools
        .iter()
        .filter(|t| find_in_path(t.name, path).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = missing
        .iter()
        .map(|t| format!("  {} is not installed (not on PATH): {}", t.name, t.install))
        .collect();
    bail!(
        "cargo xtask kind needs {}:\n{}",
        missing
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", "),
        lines.join("\n")
    )
}

/// The cluster name: the top-level `name:` of the kind config (the API server address in
/// deploy/kind/apiserver.yaml is `<name>-control-plane`).
pub fn cluster_name(config: &str) -> anyhow::Result<String> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("name:"))
        .map(|n| n.trim().trim_matches('"').to_owned())
        .filter(|n| !n.is_empty())
        .context("the kind config has no top-level `name:`")
}

pub fn run(root: &Path, args: Args) -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    require_tools(args.action.tools(), &path)?;
    let config = root.join(CLUSTER_CONFIG);
    let name = cluster_name(
        &std::fs::read_to_string(&config)
            .with_context(|| format!("reading {}", config.display()))?,
    )?;
    let timeout = Duration::from_secs(args.timeout_seconds);
    let kubectl = Kubectl {
        context: format!("kind-{name}"),
    };
    preflight(args.action, &name, &kubectl)?;
    match args.action {
        Action::Up => up(root, &name),
        Action::Deploy => deploy(root, &name, &kubectl, timeout),
        Action::E2e => e2e(root, &kubectl, timeout),
        Action::Down => run_cmd(Command::new("kind").args(["delete", "cluster", "--name", &name])),
    }
}

/// What must hold before an action starts, each failure saying what to do: the Docker daemon
/// answers (the CLI alone is not enough), and for `deploy` and `e2e` the cluster exists.
fn preflight(action: Action, name: &str, kubectl: &Kubectl) -> anyhow::Result<()> {
    if action.tools().contains(&DOCKER) {
        output(Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"])).map_err(
            |e| {
                anyhow::anyhow!(
                    "docker is installed but its daemon does not answer ({e:#}): start it \
                     (e.g. `systemctl start docker`) or check DOCKER_HOST and your access to its socket"
                )
            },
        )?;
    }
    if matches!(action, Action::Deploy | Action::E2e) {
        output(
            kubectl
                .cmd()
                .args(["config", "get-contexts", &kubectl.context]),
        )
        .map_err(|_| {
            anyhow::anyhow!(
                "no kubectl context {} (no kind cluster {name}?): run `cargo xtask kind up` first",
                kubectl.context
            )
        })?;
    }
    Ok(())
}

fn up(root: &Path, name: &str) -> anyhow::Result<()> {
    let clusters = output(Command::new("kind").args(["get", "clusters"]))?;
    if clusters.lines().any(|c| c.trim() == name) {
        eprintln!("[kind] cluster {name} exists");
    } else {
        run_cmd(
            Command::new("kind")
                .args(["create", "cluster", "--name", name, "--config"])
                .arg(root.join(CLUSTER_CONFIG)),
        )?;
    }
    // The nodes are privileged containers running systemd, which normally mounts bpffs; make sure,
    // and make it shared so the agent pods' HostToContainer mounts see it.
    for node in output(Command::new("kind").args(["get", "nodes", "--name", name]))?.lines() {
        run_cmd(Command::new("docker").args([
            "exec",
            node.trim(),
            "sh",
            "-c",
            "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; mount --make-shared /sys/fs/bpf",
        ]))?;
    }
    eprintln!("[kind] cluster {name} is up (no kube-proxy); next: cargo xtask kind deploy");
    Ok(())
}

fn deploy(root: &Path, name: &str, kubectl: &Kubectl, timeout: Duration) -> anyhow::Result<()> {
    run_cmd(
        Command::new("docker")
            .args(["build", "-f", "Containerfile", "-t", IMAGE, "."])
            .current_dir(root),
    )?;
    run_cmd(Command::new("kind").args(["load", "docker-image", IMAGE, "--name", name]))?;
    run_cmd(
        kubectl
            .cmd()
            .arg("apply")
            .arg("-k")
            .arg(root.join("deploy/kind")),
    )?;
    // Same tag, new image: restart so every node runs the image just loaded. The dataplane keeps
    // forwarding through the restart (pinned).
    run_cmd(kubectl.cmd().args([
        "-n",
        NAMESPACE,
        "rollout",
        "restart",
        &format!("daemonset/{DAEMONSET}"),
    ]))?;
    run_cmd(kubectl.cmd().args([
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        &format!("daemonset/{DAEMONSET}"),
        &format!("--timeout={}s", timeout.as_secs()),
    ]))?;
    eprintln!("[kind] agent rolled out; next: cargo xtask kind e2e");
    Ok(())
}

/// A node and where to reach its nodePort.
#[derive(Debug)]
struct Target {
    node: String,
    internal_ip: String,
    /// The extraPortMappings address on the host, if the node maps the nodePort.
    host: Option<SocketAddr>,
}

fn e2e(root: &Path, kubectl: &Kubectl, timeout: Duration) -> anyhow::Result<()> {
    run_cmd(kubectl.cmd().arg("apply").arg("-f").arg(root.join(EXAMPLE)))?;
    run_cmd(kubectl.cmd().args([
        "rollout",
        "status",
        "deployment/podinfo",
        &format!("--timeout={}s", timeout.as_secs()),
    ]))?;
    let node_port: u16 = output(kubectl.cmd().args([
        "get",
        "service",
        EXAMPLE_SERVICE,
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]))?
    .trim()
    .parse()
    .context("the example Service's nodePort")?;
    let nodes = output(kubectl.cmd().args([
        "get",
        "nodes",
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}"#,
    ]))?;
    let mut targets = Vec::new();
    for line in nodes.lines().filter(|l| !l.trim().is_empty()) {
        let (node, ip) = line
            .split_once(' ')
            .with_context(|| format!("node line {line:?}"))?;
        // `docker port` prints the host side of the node container's mapping.
        let host = output(Command::new("docker").args(["port", node, &format!("{node_port}/tcp")]))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.trim().parse().ok()));
        targets.push(Target {
            node: node.to_owned(),
            internal_ip: ip.trim().to_owned(),
            host,
        });
    }
    ensure!(
        targets.len() >= 2,
        "expected several nodes, got {targets:?}"
    );

    let mut misses = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        // From the next node: a connection a node opens to its own address leaves through `lo`,
        // where no program is attached (kube-proxy's OUTPUT-chain rules have no counterpart in
        // an XDP/TC dataplane), so every node is checked from a neighbour, as a client would.
        let from = targets[(i + 1) % targets.len()].node.clone();
        let url = format!("http://{}:{node_port}/", t.internal_ip);
        let inside = retry(timeout, || {
            let code = output(Command::new("docker").args([
                "exec",
                &from,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                &url,
            ]))?;
            ensure!(code.trim() == "200", "HTTP {}", code.trim());
            Ok(())
        });
        report(
            &mut misses,
            &format!("{} from {from} at {url}", t.node),
            inside,
        );
        match t.host {
            Some(addr) => {
                let outside = retry(timeout, || http_get_ok(addr));
                report(
                    &mut misses,
                    &format!("{} from this host at http://{addr}/", t.node),
                    outside,
                );
            }
            None => {
                report(
                    &mut misses,
                    &format!("{} from this host", t.node),
                    Err(anyhow::anyhow!(
                        "no extraPortMapping for nodePort {node_port} ({CLUSTER_CONFIG})"
                    )),
                );
            }
        }
    }
    // What the agents programmed, for the record.
    let _ = run_cmd(kubectl.cmd().args([
        "-n",
        NAMESPACE,
        "exec",
        &format!("daemonset/{DAEMONSET}"),
        "--",
        "nodeport-agent",
        "list",
        "services",
    ]));
    ensure!(
        misses.is_empty(),
        "{} of {} checks failed:\n  {}",
        misses.len(),
        targets.len() * 2,
        misses.join("\n  ")
    );
    eprintln!("[kind] every node answered at nodePort {node_port}, from inside and outside");
    Ok(())
}

fn report(misses: &mut Vec<String>, what: &str, result: anyhow::Result<()>) {
    match result {
        Ok(()) => println!("Successfully connected to {what}"),
        Err(e) => {
            println!("Failed to connect to {what}: {e:#}");
            misses.push(format!("{what}: {e:#}"));
        }
    }
}

/// Retries `f` once a second until it succeeds or `timeout` passes (endpoints and maps may lag
/// the rollout by a moment); the last error otherwise.
fn retry(timeout: Duration, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() >= timeout => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// `GET /` over a fresh TCP connection; Ok on HTTP 200.
fn http_get_ok(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: nodeport\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head)?;
    let status = String::from_utf8_lossy(&head[..n]);
    let code = status.split_whitespace().nth(1).unwrap_or("");
    ensure!(code == "200", "HTTP {code:?}");
    Ok(())
}

struct Kubectl {
    context: String,
}

impl Kubectl {
    fn cmd(&self) -> Command {
        let mut c = Command::new("kubectl");
        c.args(["--context", &self.context]);
        c
    }
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("[kind] {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Wrap::try_parse_from(std::iter::once("kind").chain(argv.iter().copied())).map(|w| w.args)
    }

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn actions_parse() {
        for (word, action) in [
            ("up", Action::Up),
            ("deploy", Action::Deploy),
            ("e2e", Action::E2e),
            ("down", Action::Down),
        ] {
            let args = parse(&[word]).unwrap();
            assert_eq!(args.action, action);
            assert_eq!(args.timeout_seconds, 180);
        }
        assert_eq!(
            parse(&["e2e", "--timeout-seconds", "30"])
                .unwrap()
                .timeout_seconds,
            30
        );
        assert!(parse(&[]).is_err(), "an action is required");
        assert!(parse(&["sideways"]).is_err());
    }

    /// A directory holding fake executables (and one non-executable file) named `present`.
    fn fake_path(present: &[&str], not_executable: &[&str]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "xtask-kind-{}-{}",
            std::process::id(),
            present.join("-")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (names, mode) in [(present, 0o755), (not_executable, 0o644)] {
            for n in names {
                let f = dir.join(n);
                std::fs::write(&f, "#!/bin/sh\n").unwrap();
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        dir
    }

    #[test]
    fn missing_tools_are_named_with_how_to_install_them() {
        let dir = fake_path(&["docker"], &["kubectl"]);
        let path = std::env::join_paths([Path::new("/nonexistent"), &dir]).unwrap();
        assert!(find_in_path("docker", &path).is_some());
        assert!(find_in_path("kubectl", &path).is_none(), "not executable");
        let err = require_tools(Action::Deploy.tools(), &path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs kind, kubectl"), "{err}");
        assert!(err.contains("kind is not installed"), "{err}");
        assert!(err.contains("https://kind.sigs.k8s.io"), "{err}");
        assert!(err.contains("kubectl is not installed"), "{err}");
        assert!(!err.contains("docker is not installed"), "{err}");
        // Up needs docker and kind only.
        let err = require_tools(Action::Up.tools(), &path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs kind:"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn all_tools_present_passes() {
        let dir = fake_path(&["docker", "kind", "kubectl"], &[]);
        for action in [Action::Up, Action::Deploy, Action::E2e, Action::Down] {
            require_tools(action.tools(), dir.as_os_str()).unwrap();
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_empty_path_names_every_tool() {
        let err = require_tools(Action::Deploy.tools(), OsStr::new(""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs docker, kind, kubectl"), "{err}");
    }

    #[test]
    fn names_and_paths_agree_with_deploy() {
        let config = std::fs::read_to_string(root().join(CLUSTER_CONFIG)).unwrap();
        let name = cluster_name(&config).unwrap();
        assert_eq!(name, "nodeport", "the walkthroughs' cluster name");
        let apiserver = std::fs::read_to_string(root().join("deploy/kind/apiserver.yaml")).unwrap();
        assert!(
            apiserver.contains(&format!(
                "KUBERNETES_SERVICE_HOST: \"{name}-control-plane\""
            )),
            "{apiserver}"
        );
        let ds = std::fs::read_to_string(root().join("deploy/base/daemonset.yaml")).unwrap();
        assert!(
            ds.contains(&format!("image: {IMAGE}\n")),
            "the DaemonSet runs {IMAGE}"
        );
        assert!(ds.contains(&format!("name: {DAEMONSET}\n  namespace: {NAMESPACE}\n")));
        let example = std::fs::read_to_string(root().join(EXAMPLE)).unwrap();
        assert!(example.contains(&format!(
            "kind: Service\nmetadata:\n  name: {EXAMPLE_SERVICE}\n"
        )));
        assert!(example.contains("name: podinfo\n  namespace: default\n"));
        assert!(root().join("Containerfile").is_file());
        assert!(cluster_name("kind: Cluster\n").is_err());
    }
}
