//! The dataplanes under test, and switching one lab between them: every node runs exactly one
//! of them at a time (or none, for the direct path).
use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nodeport_lab::{Config, Lab, sys};
use serde::{Deserialize, Serialize};

use crate::{
    kubeproxy::{self, Mode, ProxyInput},
    scenario::{NODE_PORT_RANGE, Scenario},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataplane {
    /// No NAT: the client connects to the pod addresses, routed via their nodes.
    Direct,
    /// Our agents, ingress program on XDP (native, on the nodes' veths).
    OursXdp,
    /// Our agents, ingress program on TC (the fallback, and the default on veths).
    OursTc,
    /// The rules kube-proxy's iptables mode writes for the same objects.
    KubeProxyIptables,
    /// The rules kube-proxy's nftables mode writes for the same objects.
    KubeProxyNftables,
}

impl Dataplane {
    pub const ALL: [Dataplane; 5] = [
        Dataplane::Direct,
        Dataplane::OursXdp,
        Dataplane::OursTc,
        Dataplane::KubeProxyIptables,
        Dataplane::KubeProxyNftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Dataplane::Direct => "direct (no NAT)",
            Dataplane::OursXdp => "ours, XDP",
            Dataplane::OursTc => "ours, TC",
            Dataplane::KubeProxyIptables => "kube-proxy iptables",
            Dataplane::KubeProxyNftables => "kube-proxy nftables",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Dataplane::Direct => "direct",
            Dataplane::OursXdp => "xdp",
            Dataplane::OursTc => "tc",
            Dataplane::KubeProxyIptables => "iptables",
            Dataplane::KubeProxyNftables => "nftables",
        }
    }

    pub fn parse(key: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.key() == key)
            .with_context(|| {
                format!("dataplane {key:?}: one of direct, xdp, tc, iptables, nftables")
            })
    }

    fn kube_proxy_mode(self) -> Option<Mode> {
        match self {
            Dataplane::KubeProxyIptables => Some(Mode::Iptables),
            Dataplane::KubeProxyNftables => Some(Mode::Nftables),
            _ => None,
        }
    }
}

/// Runs a command to completion in network namespace `ns` (only the network namespace changes:
/// `ip netns exec` would remount /sys and hide bpffs).
pub fn run_in_netns(ns: &str, cmd: &mut Command) -> anyhow::Result<Output> {
    let netns = File::open(sys::netns_path(ns)).with_context(|| format!("netns {ns}"))?;
    let fd = netns.as_raw_fd();
    // SAFETY: setns is async-signal-safe; fd stays open until output() returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?} in {ns}"))?;
    drop(netns);
    Ok(out)
}

fn agents_dir(cfg: &Config) -> std::path::PathBuf {
    cfg.state_dir().join("agents")
}

/// Stops every agent of the lab and unloads its programs, so the nodes forward like plain
/// routers.
pub fn stop_agents(lab: &Lab) -> anyhow::Result<()> {
    let cfg = lab.config();
    for n in lab.nodes() {
        let pid_file = agents_dir(cfg).join(format!("{}.pid", n.name));
        if let Some(pid) = sys::read_pid(&pid_file).filter(|p| sys::runs(*p, "nodeport-agent")) {
            sys::stop(pid, Duration::from_secs(3));
        }
        let _ = std::fs::remove_file(&pid_file);
        let root = cfg.pin_root(&n.name);
        if root.exists() {
            let out = run_in_netns(
                &n.name,
                Command::new(&cfg.agent)
                    .args(["unload", "--all-versions", "--pin-root"])
                    .arg(&root),
            )?;
            if !out.status.success() {
                bail!(
                    "unloading the dataplane of {}: {}",
                    n.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
    Ok(())
}

/// Native XDP on a veth transmits (`XDP_TX`, `XDP_REDIRECT`) only into a peer that runs an XDP
/// program itself (docs/ARCHITECTURE.md): the nodes' peers are the bridge ports, so for the XDP
/// measurement they get one, our own program with no services configured (it passes every frame,
/// at ~100 ns each; see the per-packet table). That cost is charged to the XDP dataplane alone.
fn xdp_peers(lab: &Lab, attach: bool) -> anyhow::Result<()> {
    let cfg = lab.config();
    let net = cfg.net_ns();
    let root = cfg.pin_root(&net);
    let mut cmd = Command::new(&cfg.agent);
    if attach {
        cmd.args(["load", "--ingress", "xdp", "--no-egress"]);
        for n in lab.nodes() {
            cmd.args(["--iface", &format!("port{}", n.index)]);
        }
    } else {
        cmd.args(["unload", "--all-versions"]);
    }
    cmd.arg("--pin-root").arg(&root);
    let out = run_in_netns(&net, &mut cmd)?;
    if !out.status.success() {
        bail!(
            "{} XDP on the bridge ports: {}",
            if attach { "attaching" } else { "detaching" },
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts an agent on every node with the ingress program on `ingress` ("xdp" or "tc").
pub fn start_agents(lab: &Lab, ingress: &str) -> anyhow::Result<()> {
    let cfg = lab.config();
    std::fs::create_dir_all(agents_dir(cfg))?;
    for n in lab.nodes() {
        let mut cmd = Command::new(&cfg.agent);
        cmd.args(["run", "--node-name", &n.name, "--interfaces", "eth0"])
            .arg("--manifests")
            .arg(cfg.manifests_dir())
            .arg("--pin-root")
            .arg(cfg.pin_root(&n.name))
            .args(["--healthz-bind-address", "0.0.0.0:10256"])
            .args(["--min-sync-period-ms", "50"])
            .args(["--ingress", ingress])
            .args([
                "--service-node-port-range",
                &format!("{}-{}", NODE_PORT_RANGE.0, NODE_PORT_RANGE.1),
            ]);
        let pid = sys::spawn_in_netns(&n.name, &mut cmd, &cfg.agent_log(&n.name))?;
        std::fs::write(
            agents_dir(cfg).join(format!("{}.pid", n.name)),
            format!("{pid}\n"),
        )?;
    }
    Ok(())
}

/// Waits until every node's maps hold every frontend of `scenario`, the measured ones with all
/// their endpoints.
pub fn wait_programmed(lab: &Lab, scenario: &Scenario, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let measured = [&scenario.same_node, &scenario.other_node];
    for n in lab.nodes() {
        loop {
            let have = lab.programmed(&n.name);
            let complete = have.as_ref().is_ok_and(|h| {
                h.len() == scenario.frontends()
                    && measured.iter().all(|m| {
                        [m.http_node_port, m.bulk_node_port].iter().all(|p| {
                            h.get(&(*p, "TCP".to_owned()))
                                .is_some_and(|b| b.len() == m.pod_ips.len())
                        })
                    })
            });
            if complete {
                break;
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(lab.config().agent_log(&n.name)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                bail!(
                    "the agent of {} did not program {} frontends within {timeout:?} (it holds {}); its log ends:\n  {}",
                    n.name,
                    scenario.frontends(),
                    have.map(|h| h.len().to_string())
                        .unwrap_or_else(|e| format!("nothing readable: {e:#}")),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(())
}

/// Leaves `from` (nothing of it stays on any node).
pub fn leave(lab: &Lab, from: Dataplane) -> anyhow::Result<()> {
    match from {
        Dataplane::Direct => Ok(()),
        Dataplane::OursXdp => {
            stop_agents(lab)?;
            xdp_peers(lab, false)
        }
        Dataplane::OursTc => stop_agents(lab),
        Dataplane::KubeProxyIptables | Dataplane::KubeProxyNftables => {
            let mode = from.kube_proxy_mode().expect("a kube-proxy mode");
            for n in lab.nodes().into_iter().filter(|n| !n.control_plane) {
                kubeproxy::remove(mode, &n.name)
                    .with_context(|| format!("removing {} rules of {}", from.label(), n.name))?;
            }
            Ok(())
        }
    }
}

/// Makes the nodes run `to` for `scenario`'s objects.
pub fn enter(lab: &Lab, to: Dataplane, scenario: &Scenario) -> anyhow::Result<()> {
    match to {
        Dataplane::Direct => Ok(()),
        Dataplane::OursXdp | Dataplane::OursTc => {
            if to == Dataplane::OursXdp {
                xdp_peers(lab, true)?;
            }
            start_agents(
                lab,
                if to == Dataplane::OursXdp {
                    "xdp"
                } else {
                    "tc"
                },
            )?;
            wait_programmed(lab, scenario, Duration::from_secs(300))
        }
        Dataplane::KubeProxyIptables | Dataplane::KubeProxyNftables => {
            let mode = to.kube_proxy_mode().expect("a kube-proxy mode");
            let cluster_cidr: ipnet::Ipv4Net = "10.244.0.0/16".parse().expect("a CIDR");
            // The workers, which the measured traffic crosses (the control plane is on no path;
            // an iptables-restore of 10,000 services takes minutes), in parallel.
            let workers: Vec<_> = lab
                .nodes()
                .into_iter()
                .filter(|n| !n.control_plane)
                .collect();
            std::thread::scope(|s| {
                let installs: Vec<_> = workers
                    .iter()
                    .map(|n| {
                        s.spawn(move || -> anyhow::Result<()> {
                            let input = ProxyInput {
                                node_name: &n.name,
                                node_ips: &[n.addr],
                                cluster_cidr,
                                services: &scenario.services,
                                slices: &scenario.slices,
                            };
                            let rules = kubeproxy::render(mode, &input).with_context(|| {
                                format!("rendering {} rules for {}", to.label(), n.name)
                            })?;
                            kubeproxy::install_with(mode, &n.name, &rules, iptables_backend()?)
                                .with_context(|| {
                                    format!("installing {} rules on {}", to.label(), n.name)
                                })
                        })
                    })
                    .collect();
                installs
                    .into_iter()
                    .try_for_each(|h| h.join().expect("install thread panicked"))
            })
        }
    }
}

/// Which `iptables-restore` loads kube-proxy's iptables rules: `NODEPORT_BENCH_IPTABLES` =
/// `system` (default: `iptables-restore`, the nf_tables backend on this machine), `nft` or
/// `legacy`. The nf_tables backend needs more than 10 minutes per node to load the rules of
/// 10,000 services here (iptables 1.8.9); the legacy x_tables backend loads them in seconds, and
/// its per-packet rule walk is what kube-proxy's iptables mode costs on nodes that use it.
fn iptables_backend() -> anyhow::Result<kubeproxy::IptablesBackend> {
    use kubeproxy::IptablesBackend;
    match std::env::var("NODEPORT_BENCH_IPTABLES").as_deref() {
        Err(_) | Ok("system") => Ok(IptablesBackend::System),
        Ok("nft") => Ok(IptablesBackend::Nft),
        Ok("legacy") => Ok(IptablesBackend::Legacy),
        Ok(other) => {
            anyhow::bail!("NODEPORT_BENCH_IPTABLES={other:?}: expected system, nft or legacy")
        }
    }
}

/// Writes the scenario's objects where the agents read them.
pub fn write_manifests(lab: &Lab, scenario: &Scenario) -> anyhow::Result<()> {
    let path = lab.config().manifests_dir().join("bench-services.yaml");
    sys::write_atomic(&path, &scenario.manifest_yaml()?)
}

/// The agent binary's path is checked early, with a clear message.
pub fn check_binary(path: &Path, what: &str) -> anyhow::Result<()> {
    if !path.is_file() {
        bail!(
            "{what} binary {} does not exist (cargo xtask bench builds it)",
            path.display()
        );
    }
    Ok(())
}
