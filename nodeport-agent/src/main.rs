//! `nodeport-agent`: load, inspect and unload the NodePort dataplane. A thin layer over the
//! library; the Kubernetes-driven `run` subcommand will join these.

use std::path::PathBuf;

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
