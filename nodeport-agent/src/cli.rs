//! The agent's command line, in the library so the deployment's manifests can be checked against
//! it (deploy/ tests parse the DaemonSet's args with this very definition).

use std::{ops::RangeInclusive, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use nodeport_common::DEFAULT_PIN_ROOT;

use crate::{TcBackend, XdpAttachMode};

#[derive(Debug, Parser)]
#[command(version, about = "eBPF/XDP NodePort dataplane for Kubernetes")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// bpffs directory under which the versioned pin directory (v<N>) lives.
    #[arg(long, env = "NODEPORT_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IngressHook {
    /// By driver: TC on veths (kind), native XDP on NICs, TC if the driver refuses XDP.
    Auto,
    /// XDP (in --xdp-mode), with TC ingress beside it as the fallback.
    Xdp,
    /// TC ingress only.
    Tc,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load and attach the dataplane, follow the cluster (or a manifests
    /// directory) and keep the maps in sync. On exit the dataplane stays loaded.
    Run(Box<RunArgs>),
    /// Load the programs (maps pinned or reused), attach them to interfaces and pin the links, so
    /// the dataplane keeps running after this command exits. Loading again replaces in place.
    Load {
        /// Interface to attach to (repeat for several), in this process's network namespace.
        #[arg(long, required = true)]
        iface: Vec<String>,
        /// XDP mode: native (driver) or generic (skb).
        #[arg(long, value_enum, default_value_t = XdpAttachMode::Native)]
        xdp_mode: XdpAttachMode,
        /// Hook for the ingress program.
        #[arg(long, value_enum, default_value_t = IngressHook::Auto)]
        ingress: IngressHook,
        /// Do not attach np_tc_egress (reverse translation for local backends).
        #[arg(long)]
        no_egress: bool,
        /// How TC programs attach: tcx (Linux 6.6+), netlink clsact, or auto (tcx, else netlink).
        #[arg(long, value_enum, default_value_t = TcBackend::Auto)]
        tc_backend: TcBackend,
        /// cgroup v2 directory whose processes reach nodePorts on this node's own addresses
        /// (socket load balancing; see `run --cgroup`).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Detach everything and remove the pins (links, programs, maps).
    Unload {
        /// Also remove pins of other map layout versions under the pin root.
        #[arg(long)]
        all_versions: bool,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Print the packet counters by name, summed over CPUs.
    Stats {
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Print a decoded table from the pinned maps.
    List {
        #[arg(value_enum)]
        what: ListWhat,
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Node addresses, SNAT ports, map fill and counters.
    Status {
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        pin: PinArgs,
    },
}

/// Every option can also be set by environment variable, for the DaemonSet.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name (the Node object to read addresses from; endpoints here are local).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Interfaces carrying NodePort traffic, comma-separated.
    #[arg(
        long,
        env = "NODEPORT_INTERFACES",
        value_delimiter = ',',
        required = true
    )]
    pub interfaces: Vec<String>,
    /// Read Services, EndpointSlices and Nodes from this directory of YAML files (and follow it)
    /// instead of the Kubernetes API.
    #[arg(long, env = "NODEPORT_MANIFESTS", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API; without it (and without --manifests), in-cluster configuration.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// kube-proxy's --nodeport-addresses: CIDRs selecting which node addresses serve nodePorts
    /// (comma-separated; default: all of the node's addresses).
    #[arg(long, env = "NODEPORT_ADDRESSES", value_delimiter = ',')]
    pub nodeport_addresses: Vec<ipnet::Ipv4Net>,
    /// The cluster's --service-node-port-range.
    #[arg(long, env = "NODEPORT_SERVICE_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = parse_range)]
    pub service_node_port_range: RangeInclusive<u16>,
    /// Source ports for SNAT. Keep it outside net.ipv4.ip_local_port_range (default
    /// 32768-60999) so the node's own connections never collide with translated ones.
    #[arg(long, env = "NODEPORT_SNAT_PORTS", default_value = "61000-65535", value_parser = parse_range)]
    pub snat_ports: RangeInclusive<u16>,
    /// Size of the connection-tracking table (np_ct4): concurrent flows this node tracks. An LRU
    /// map: when full, the least recently used flow is evicted. Pinned maps keep the size they
    /// were created with; changing it needs `nodeport-agent unload` first (docs/RELIABILITY.md).
    #[arg(long, env = "NODEPORT_CONNTRACK_ENTRIES", default_value_t = nodeport_common::capacity::CONNTRACK, value_parser = clap::value_parser!(u32).range(1..))]
    pub conntrack_entries: u32,
    /// Size of the reverse-NAT table (np_rnat4): one entry per tracked flow; keep it equal to
    /// --conntrack-entries.
    #[arg(long, env = "NODEPORT_REV_NAT_ENTRIES", default_value_t = nodeport_common::capacity::REV_NAT, value_parser = clap::value_parser!(u32).range(1..))]
    pub rev_nat_entries: u32,
    #[arg(long, env = "NODEPORT_INGRESS", value_enum, default_value_t = IngressHook::Auto)]
    pub ingress: IngressHook,
    #[arg(long, env = "NODEPORT_XDP_MODE", value_enum, default_value_t = XdpAttachMode::Native)]
    pub xdp_mode: XdpAttachMode,
    #[arg(long, env = "NODEPORT_TC_BACKEND", value_enum, default_value_t = TcBackend::Auto)]
    pub tc_backend: TcBackend,
    /// cgroup v2 directory (the node's root cgroup, e.g. /sys/fs/cgroup) whose processes, the
    /// node's own and its pods', reach nodePorts on this node's own addresses: their connect()
    /// and sendmsg() go to a backend at the syscall (socket load balancing), since packets a node
    /// sends itself never cross an interface's ingress. Without it, only traffic arriving on
    /// --interfaces is served.
    #[arg(long, env = "NODEPORT_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// /healthz, /livez and /metrics (kube-proxy's healthz port).
    #[arg(
        long,
        env = "NODEPORT_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256"
    )]
    pub healthz_bind_address: std::net::SocketAddr,
    /// Full resync period, seconds (kube-proxy's --iptables-sync-period).
    #[arg(long, env = "NODEPORT_SYNC_PERIOD_SECONDS", default_value_t = 30)]
    pub sync_period_seconds: u64,
    /// Shortest time between syncs, milliseconds: changes arriving meanwhile are batched.
    #[arg(long, env = "NODEPORT_MIN_SYNC_PERIOD_MS", default_value_t = 100)]
    pub min_sync_period_ms: u64,
    /// Log format.
    #[arg(long, env = "NODEPORT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub pin: PinArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FROM-TO"))?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: expected 1 <= FROM <= TO"));
    }
    Ok(a..=b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListWhat {
    Services,
    Backends,
    Conntrack,
    Addresses,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn load_defaults_to_auto_ingress_with_egress() {
        let cli = Cli::try_parse_from(["nodeport-agent", "load", "--iface", "eth0"]).unwrap();
        let Command::Load {
            iface,
            xdp_mode,
            ingress,
            no_egress,
            tc_backend,
            cgroup,
            pin,
        } = cli.command
        else {
            panic!("not load");
        };
        assert_eq!(iface, ["eth0"]);
        assert_eq!(cgroup, None, "socket load balancing only where asked");
        assert_eq!(xdp_mode, XdpAttachMode::Native);
        assert_eq!(ingress, IngressHook::Auto);
        assert!(!no_egress);
        assert_eq!(tc_backend, TcBackend::Auto);
        assert_eq!(pin.pin_root, PathBuf::from(DEFAULT_PIN_ROOT));
    }

    #[test]
    fn load_requires_an_interface() {
        assert!(Cli::try_parse_from(["nodeport-agent", "load"]).is_err());
    }

    #[test]
    fn generic_mode_and_pin_root_parse() {
        let cli = Cli::try_parse_from([
            "nodeport-agent",
            "load",
            "--iface",
            "a",
            "--iface",
            "b",
            "--xdp-mode",
            "generic",
            "--pin-root",
            "/sys/fs/bpf/x",
        ])
        .unwrap();
        let Command::Load {
            iface,
            xdp_mode,
            pin,
            ..
        } = cli.command
        else {
            panic!("not load");
        };
        assert_eq!(iface, ["a", "b"]);
        assert_eq!(xdp_mode, XdpAttachMode::Generic);
        assert_eq!(pin.pin_root, PathBuf::from("/sys/fs/bpf/x"));
    }
}
