//! `nodeport-bench`: client → nodeIP:nodePort → pod in a lab of its own, for the direct path,
//! ours (XDP, TC) and kube-proxy (iptables, nftables), side by side in one run
//! (docs/BENCHMARKS.md). Needs root. `cargo xtask bench` builds and runs it.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use nodeport_bench::{
    dataplane::Dataplane,
    report,
    run::{self, Options},
};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks the NodePort dataplanes against the direct path and kube-proxy")]
struct Args {
    /// One service count, one repetition, 1 s per figure, every dataplane: proves it all runs.
    #[arg(long)]
    quick: bool,
    /// Service counts (each with 5 endpoints), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    services: Vec<usize>,
    /// Repetitions per service count (each runs every dataplane once, in rotating order).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per figure.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Client hosts (addresses) the new connections come from in turn; more than one exposes
    /// PAWS rejections on the pods' TIME_WAIT sockets behind source NAT.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Dataplanes, comma-separated: direct, xdp, tc, iptables, nftables.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,xdp,tc,iptables,nftables"
    )]
    dataplanes: Vec<String>,
    /// Lab prefix.
    #[arg(long, default_value = "np-bench")]
    prefix: String,
    #[arg(long)]
    agent: PathBuf,
    #[arg(long)]
    echo: PathBuf,
    /// Where results.json and section.md go.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
    /// The plot (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// How the plot is linked from the markdown section.
    #[arg(long, default_value = "bench/conn-rate-vs-services.svg")]
    plot_link: String,
    /// The command line to record in the results (default: this one).
    #[arg(long)]
    command: Option<String>,
    /// An earlier run's results.json whose other service counts join this run's report.
    #[arg(long)]
    merge: Option<PathBuf>,
    /// Measure nothing: report these results (a results.json, or the partial.json of a run cut
    /// short), merged with --merge.
    #[arg(long)]
    report_only: Option<PathBuf>,
}

fn read_results(file: &std::path::Path) -> anyhow::Result<run::Results> {
    serde_json::from_slice(
        &std::fs::read(file).with_context(|| format!("reading {}", file.display()))?,
    )
    .with_context(|| format!("parsing {}", file.display()))
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodeport-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (services, reps, duration) = if args.quick {
        (vec![args.services.first().copied().unwrap_or(1)], 1, 1.0)
    } else {
        (args.services.clone(), args.reps, args.duration)
    };
    let opts = Options {
        prefix: args.prefix.clone(),
        agent: args.agent.clone(),
        echo: args.echo.clone(),
        services,
        reps,
        duration: Duration::from_secs_f64(duration),
        workers: args.workers,
        clients: args.clients,
        dataplanes: args
            .dataplanes
            .iter()
            .map(|d| Dataplane::parse(d))
            .collect::<anyhow::Result<_>>()?,
        progress: Some(args.out_dir.join("partial.json")),
    };
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let earlier = args.merge.as_deref().map(read_results).transpose()?;
    let command = args
        .command
        .clone()
        .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let mut results = match &args.report_only {
        Some(file) => read_results(file)?,
        None => run::run(&opts, &command)?,
    };
    if let Some(earlier) = earlier {
        results.merge(earlier);
    }
    let json = args.out_dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    let plot = args
        .plot
        .clone()
        .unwrap_or_else(|| args.out_dir.join("conn-rate-vs-services.svg"));
    if let Some(dir) = plot.parent() {
        std::fs::create_dir_all(dir)?;
    }
    report::plot(&results, &plot)?;
    let section = report::section(&results, &args.plot_link);
    let md = args.out_dir.join("section.md");
    std::fs::write(&md, &section)?;
    println!("{section}");
    eprintln!(
        "[bench] wrote {}, {} and {}",
        json.display(),
        md.display(),
        plot.display()
    );
    Ok(())
}
