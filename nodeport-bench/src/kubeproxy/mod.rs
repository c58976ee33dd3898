//! kube-proxy's own rules for the same Services and EndpointSlices the agent reads, so the
//! benchmark compares the dataplanes on identical input: [`iptables`] mode and [`nftables`] mode.
//!
//! The rules are what kube-proxy 1.33 (pkg/proxy/iptables/proxier.go, pkg/proxy/nftables/
//! proxier.go) writes on a full sync, line for line, with these settings: IPv4 only, masquerade
//! bit 14, `--cluster-cidr` as the local-traffic detector, `masqueradeAll` off,
//! `--nodeport-addresses` the node's addresses (or, with none given, every local address),
//! `nf_conntrack_tcp_be_liberal` off. See [`Options`] for the rest.
pub mod iptables;
pub mod model;
pub mod names;
pub mod nftables;

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

pub struct ProxyInput<'a> {
    pub node_name: &'a str,
    /// The node's addresses that serve nodePorts (kube-proxy --nodeport-addresses; in the lab the node's bridge address).
    pub node_ips: &'a [std::net::Ipv4Addr],
    /// The cluster's pod CIDR (kube-proxy --cluster-cidr), for the masquerade rule of off-cluster traffic.
    pub cluster_cidr: ipnet::Ipv4Net,
    pub services: &'a [k8s_openapi::api::core::v1::Service],
    pub slices: &'a [k8s_openapi::api::discovery::v1::EndpointSlice],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// kube-proxy settings beyond [`ProxyInput`]; `Default` is what kube-proxy does in the lab.
#[derive(Clone, Debug)]
pub struct Options {
    /// The masquerade mark as kube-proxy prints it: `fmt.Sprintf("%#08x", 1<<14)` is
    /// `0x00004000` (its unit tests use `0x4000`; the kernel sees the same value).
    pub masquerade_mark: String,
    /// iptables: kube-proxy created its nfacct counters (`ct_state_invalid_dropped_pkts`,
    /// `localhost_nps_accepted_pkts`) and adds `-m nfacct` matches. Off by default: creating
    /// them takes nfnetlink_acct, which the lab does not set up; kube-proxy then omits them too.
    pub nfacct: bool,
    /// iptables: `net.netfilter.nf_conntrack_tcp_be_liberal` is set, so kube-proxy does not drop
    /// INVALID packets in KUBE-FORWARD.
    pub conntrack_tcp_be_liberal: bool,
    /// nftables: the cluster's ServiceCIDRs, for the "Drop traffic to unallocated ClusterIPs"
    /// rule (none in the lab: no ServiceCIDR objects).
    pub service_cidrs: Vec<ipnet::Ipv4Net>,
    /// iptables: `MASQUERADE --random-fully` (kube-proxy adds it when iptables supports it, as
    /// every iptables since 1.6.2 does; its unit tests' fake iptables does not).
    pub random_fully: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            masquerade_mark: "0x00004000".to_owned(),
            nfacct: false,
            conntrack_tcp_be_liberal: false,
            service_cidrs: Vec::new(),
            random_fully: true,
        }
    }
}

/// Renders the rules for `mode` (iptables-restore input, or an `nft -f` script).
pub fn render(mode: Mode, input: &ProxyInput) -> anyhow::Result<String> {
    render_with(mode, input, &Options::default())
}

/// [`render`] with other kube-proxy settings.
pub fn render_with(mode: Mode, input: &ProxyInput, opts: &Options) -> anyhow::Result<String> {
    let ports = model::service_ports(input.node_name, input.services, input.slices)?;
    Ok(match mode {
        Mode::Iptables => iptables::render(input, &ports, opts),
        Mode::Nftables => nftables::render(input, &ports, opts),
    })
}

/// Installs rendered rules in network namespace `netns` (iptables-restore --noflush / nft -f, via `ip netns exec`), replacing an earlier install of the same mode, and sets the sysctls kube-proxy sets (e.g. net.ipv4.conf.all.route_localnet only where it does; look it up; nf_conntrack settings it applies).
///
/// Sysctls: `route_localnet=1` in iptables mode when the rules serve nodePorts on 127.0.0.0/8
/// (kube-proxy sets it exactly when it writes the localhost rules, i.e. `--nodeport-addresses`
/// matches loopback); the conntrack timeouts of kube-proxy's defaults (`conntrack.
/// tcpEstablishedTimeout` 24h, `tcpCloseWaitTimeout` 1h), which are per network namespace.
/// Not set: `nf_conntrack_max` (kube-proxy raises it to max(32768 per core, 131072)), which
/// only the initial namespace may write, and the hashsize module parameter; both are global.
pub fn install(mode: Mode, netns: &str, rules: &str) -> anyhow::Result<()> {
    install_with(mode, netns, rules, IptablesBackend::System)
}

/// Which iptables runs kube-proxy's iptables mode.
///
/// kube-proxy runs the `iptables-restore` of its image, whose iptables-wrapper picks the backend
/// the host already uses (nf_tables on current distributions, and when the host has no rules).
/// The backend matters for installing large rule sets: measured here (kernel 6.18, iptables
/// 1.8.9, 2 endpoints per service), `iptables-nft-restore --noflush` takes 2.0 s for 1,000
/// services, 8.9 s for 2,000, 46 s for 4,000 and about 11 minutes for 10,000 (it grows with the
/// square of the chain count), while `iptables-legacy-restore` takes 0.3-0.7 s for all of these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IptablesBackend {
    /// `iptables-restore`: the host's default (nf_tables here).
    #[default]
    System,
    /// `iptables-nft-restore`: x_tables rules translated into nf_tables.
    Nft,
    /// `iptables-legacy-restore`: the x_tables kernel interface.
    Legacy,
}

impl IptablesBackend {
    fn restore(self) -> &'static str {
        match self {
            IptablesBackend::System => "iptables-restore",
            IptablesBackend::Nft => "iptables-nft-restore",
            IptablesBackend::Legacy => "iptables-legacy-restore",
        }
    }
}

/// [`install`] with an explicit iptables backend (ignored in nftables mode).
pub fn install_with(
    mode: Mode,
    netns: &str,
    rules: &str,
    backend: IptablesBackend,
) -> anyhow::Result<()> {
    remove(mode, netns)?;
    match mode {
        Mode::Iptables => {
            exec_stdin(netns, &[backend.restore(), "-w", "--noflush"], rules)?;
            if rules.contains(iptables::LOCALNET_FIREWALL_COMMENT) {
                sysctl(netns, "net.ipv4.conf.all.route_localnet", "1")?;
            }
        }
        Mode::Nftables => {
            exec_stdin(netns, &["nft", "-f", "-"], rules)?;
        }
    }
    // The conntrack sysctls exist once the rules above loaded nf_conntrack.
    sysctl(
        netns,
        "net.netfilter.nf_conntrack_tcp_timeout_established",
        "86400",
    )?;
    sysctl(
        netns,
        "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
        "3600",
    )?;
    Ok(())
}

/// Removes everything `install` added in `netns` (chains/table), leaving other rules.
pub fn remove(mode: Mode, netns: &str) -> anyhow::Result<()> {
    match mode {
        // Whichever backend installed them.
        Mode::Iptables => iptables::remove(netns),
        // "add" first so that "delete" cannot fail on a table that is not there.
        Mode::Nftables => exec_stdin(
            netns,
            &["nft", "-f", "-"],
            "add table ip kube-proxy\ndelete table ip kube-proxy\n",
        )
        .map(drop),
    }
}

fn sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    exec_stdin(netns, &["sysctl", "-qw", &format!("{key}={value}")], "").map(drop)
}

/// Runs `cmd` in `netns` (`ip netns exec`) with `input` on stdin; its stdout, or an error with
/// its stderr (for iptables-restore and nft, the failing line).
fn exec_stdin(netns: &str, cmd: &[&str], input: &str) -> anyhow::Result<String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}` in netns {netns}", cmd.join(" ")))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    // A writer thread: a large ruleset must not deadlock against a full stderr pipe.
    let output = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(input.as_bytes()));
        let output = child.wait_with_output();
        (writer.join(), output)
    });
    let out = output
        .1
        .with_context(|| format!("waiting for `{}`", cmd.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` in netns {netns} failed ({}): {}",
            cmd.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    match output.0 {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("writing to `{}`: {e}", cmd.join(" ")),
        Err(_) => bail!("writer thread for `{}` panicked", cmd.join(" ")),
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The nodePort addresses kube-proxy matches: None means every local address (no
/// `--nodeport-addresses`, `MatchAll`).
fn nodeport_ips(input: &ProxyInput) -> Option<Vec<Ipv4Addr>> {
    (!input.node_ips.is_empty()).then(|| input.node_ips.to_vec())
}
