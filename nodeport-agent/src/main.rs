//! `nodeport-agent`: run, load, inspect and unload the NodePort dataplane. A thin layer over the
//! library; the command line itself is `nodeport_agent::cli`.

use anyhow::Context as _;
use clap::Parser as _;
use nodeport_agent::cli::{
    Cli, Command, IngressHook, ListWhat, LogFormat, Output, PinArgs, RunArgs,
};
use nodeport_agent::{AttachPlan, Dataplane, Ingress, PinLayout, Stats, stats, unload};

fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    use nodeport_agent::run::{RunConfig, Source, run};
    nodeport_agent::caps::check()?;
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
        cgroup: args.cgroup,
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
        table_sizes: nodeport_agent::loader::TableSizes {
            conntrack: args.conntrack_entries,
            rev_nat: args.rev_nat_entries,
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(cfg))
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
            cgroup,
            pin,
        } => {
            nodeport_agent::caps::check()?;
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
            if let Some(cgroup) = &cgroup {
                for done in dataplane
                    .attach_cgroup(cgroup)
                    .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?
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
                &inspect::status(&t, &counters, &layout.dir())?,
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
