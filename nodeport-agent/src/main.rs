//! `nodeport-agent`: load, inspect and unload the NodePort dataplane. A thin layer over the
//! library; the Kubernetes-driven `run` subcommand will join these.

use std::{ops::RangeInclusive, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use nodeport_agent::{
    AttachPlan, Dataplane, Ingress, PinLayout, Stats, TcBackend, XdpAttachMode, stats, unload,
};
use nodeport_common::DEFAULT_PIN_ROOT;

#[derive(Debug, Parser)]
#[command(version, about = "eBPF/XDP NodePort dataplane for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct PinArgs {
    /// bpffs directory under which the versioned pin directory (v<N>) lives.
    #[arg(long, env = "NODEPORT_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IngressHook {
    /// By driver: TC on veths (kind), native XDP on NICs, TC if the driver refuses XDP.
    Auto,
    /// XDP (in --xdp-mode), with TC ingress beside it as the fallback.
    Xdp,
    /// TC ingress only.
    Tc,
}

#[derive(Debug, Subcommand)]
enum Command {
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
struct RunArgs {
    /// This node's name (the Node object to read addresses from; endpoints here are local).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Interfaces carrying NodePort traffic, comma-separated.
    #[arg(
        long,
        env = "NODEPORT_INTERFACES",
        value_delimiter = ',',
        required = true
    )]
    interfaces: Vec<String>,
    /// Read Services, EndpointSlices and Nodes from this directory of YAML files (and follow it)
    /// instead of the Kubernetes API.
    #[arg(long, env = "NODEPORT_MANIFESTS", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API; without it (and without --manifests), in-cluster configuration.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// kube-proxy's --nodeport-addresses: CIDRs selecting which node addresses serve nodePorts
    /// (comma-separated; default: all of the node's addresses).
    #[arg(long, env = "NODEPORT_ADDRESSES", value_delimiter = ',')]
    nodeport_addresses: Vec<ipnet::Ipv4Net>,
    /// The cluster's --service-node-port-range.
    #[arg(long, env = "NODEPORT_SERVICE_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = parse_range)]
    service_node_port_range: RangeInclusive<u16>,
    /// Source ports for SNAT. Keep it outside net.ipv4.ip_local_port_range (default
    /// 32768-60999) so the node's own connections never collide with translated ones.
    #[arg(long, env = "NODEPORT_SNAT_PORTS", default_value = "61000-65535", value_parser = parse_range)]
    snat_ports: RangeInclusive<u16>,
    #[arg(long, env = "NODEPORT_INGRESS", value_enum, default_value_t = IngressHook::Auto)]
    ingress: IngressHook,
    #[arg(long, env = "NODEPORT_XDP_MODE", value_enum, default_value_t = XdpAttachMode::Native)]
    xdp_mode: XdpAttachMode,
    #[arg(long, env = "NODEPORT_TC_BACKEND", value_enum, default_value_t = TcBackend::Auto)]
    tc_backend: TcBackend,
    /// /healthz, /livez and /metrics (kube-proxy's healthz port).
    #[arg(
        long,
        env = "NODEPORT_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256"
    )]
    healthz_bind_address: std::net::SocketAddr,
    /// Full resync period, seconds (kube-proxy's --iptables-sync-period).
    #[arg(long, env = "NODEPORT_SYNC_PERIOD_SECONDS", default_value_t = 30)]
    sync_period_seconds: u64,
    /// Shortest time between syncs, milliseconds: changes arriving meanwhile are batched.
    #[arg(long, env = "NODEPORT_MIN_SYNC_PERIOD_MS", default_value_t = 100)]
    min_sync_period_ms: u64,
    /// Log format.
    #[arg(long, env = "NODEPORT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    pin: PinArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
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

fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    use nodeport_agent::run::{RunConfig, Source, run};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let (np, snat) = (&args.service_node_port_range, &args.snat_ports);
    anyhow::ensure!(
        snat.end() < np.start() || snat.start() > np.end(),
        "--snat-ports {}-{} overlaps --service-node-port-range {}-{}: a reply could not be told from a new connection",
        snat.start(),
        snat.end(),
        np.start(),
        np.end()
    );
    let cfg = RunConfig {
        node_name: args.node_name,
        interfaces: args.interfaces,
        ingress: match args.ingress {
            IngressHook::Auto => Ingress::Auto,
            IngressHook::Xdp => Ingress::Xdp(args.xdp_mode),
            IngressHook::Tc => Ingress::Tc,
        },
        tc_backend: args.tc_backend,
        source: match args.manifests {
            Some(dir) => Source::Manifests(dir),
            None => Source::Kube(args.kubeconfig),
        },
        nodeport_cidrs: args.nodeport_addresses,
        nodeport_range: args.service_node_port_range,
        pin_root: args.pin.pin_root,
        snat_ports: args.snat_ports,
        health_addr: args.healthz_bind_address,
        sync_period: std::time::Duration::from_secs(args.sync_period_seconds.max(1)),
        min_sync_period: std::time::Duration::from_millis(args.min_sync_period_ms),
        conntrack: nodeport_common::Config {
            snat_port_min: 0,
            snat_port_max: 0,
            flags: 0,
            tcp_syn_timeout_s: 60,
            tcp_established_timeout_s: 21600,
            tcp_close_timeout_s: 10,
            udp_timeout_s: 60,
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(cfg))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ListWhat {
    Services,
    Backends,
    Conntrack,
    Addresses,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn open_tables(pin: PinArgs) -> anyhow::Result<(PinLayout, nodeport_agent::tables::ServiceTables)> {
    let layout = PinLayout::new(pin.pin_root);
    let tables = nodeport_agent::tables::ServiceTables::open(&layout.dir()).with_context(|| {
        format!(
            "opening the maps pinned under {} (is the dataplane loaded?)",
            layout.dir().display()
        )
    })?;
    Ok((layout, tables))
}

fn print_out<T: serde::Serialize>(
    output: Output,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Text => print!("{}", text(value)),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run_agent(*args)?,
        Command::Load {
            iface,
            xdp_mode,
            ingress,
            no_egress,
            tc_backend,
            pin,
        } => {
            let layout = PinLayout::new(pin.pin_root);
            let plan = AttachPlan {
                ingress: match ingress {
                    IngressHook::Auto => Ingress::Auto,
                    IngressHook::Xdp => Ingress::Xdp(xdp_mode),
                    IngressHook::Tc => Ingress::Tc,
                },
                egress: !no_egress,
                tc_backend,
            };
            let mut dataplane = Dataplane::load(&layout).context("loading the dataplane")?;
            println!("loaded; pinned under {}", layout.dir().display());
            for name in &iface {
                for done in dataplane
                    .attach_interface(name, &plan)
                    .with_context(|| format!("attaching to {name}"))?
                {
                    println!("{done}");
                }
            }
        }
        Command::Unload { all_versions, pin } => {
            let layout = PinLayout::new(pin.pin_root);
            let done = unload(&layout, all_versions).context("unloading")?;
            for filter in &done.filters {
                println!("detached netlink filter {filter}");
            }
            for dir in &done.dirs {
                println!("removed {}", dir.display());
            }
            if done.dirs.is_empty() {
                println!("nothing pinned under {}", layout.root().display());
            }
        }
        Command::List { what, output, pin } => {
            use nodeport_agent::inspect;
            let (_, t) = open_tables(pin)?;
            match what {
                ListWhat::Services => print_out(output, &inspect::services(&t)?, |r| {
                    inspect::render_services(r)
                })?,
                ListWhat::Backends => print_out(output, &inspect::backends(&t)?, |r| {
                    inspect::render_backends(r)
                })?,
                ListWhat::Conntrack => print_out(output, &inspect::conntrack(&t)?, |r| {
                    inspect::render_conntrack(r)
                })?,
                ListWhat::Addresses => {
                    let addrs: Vec<String> =
                        t.node_addrs()?.iter().map(ToString::to_string).collect();
                    print_out(output, &addrs, |a| {
                        a.iter().map(|x| format!("{x}\n")).collect()
                    })?
                }
            }
        }
        Command::Status { output, pin } => {
            use nodeport_agent::inspect;
            let (layout, t) = open_tables(pin)?;
            let counters = Stats::read_pinned(&layout)?;
            print_out(
                output,
                &inspect::status(&t, &counters)?,
                inspect::render_status,
            )?;
        }
        Command::Stats { pin } => {
            let layout = PinLayout::new(pin.pin_root);
            let counters = Stats::read_pinned(&layout)
                .with_context(|| format!("reading counters under {}", layout.dir().display()))?;
            print!("{}", stats::render(&counters));
        }
    }
    Ok(())
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
            pin,
        } = cli.command
        else {
            panic!("not load");
        };
        assert_eq!(iface, ["eth0"]);
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
