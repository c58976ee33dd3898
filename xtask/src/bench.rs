//! `cargo xtask bench [--quick] [--services 1,1000,10000] [--reps N] [--duration S]`: builds the
//! agent, the lab's echo server and the bench in release, then runs `nodeport-bench` (as root)
//! in a lab of its own (`np-bench-*`): client → nodeIP:nodePort → pod for the direct path, ours
//! (XDP, TC) and kube-proxy (iptables, nftables). Writes target/bench/{results.json,section.md}
//! and the plot; a full run puts the plot in docs/bench/ (docs/BENCHMARKS.md), then measures the
//! agent's own cost (target/bench/agent-cost.md).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// One service count, one repetition, ~1 s per figure, every dataplane: proves it all runs
    /// (CI). The plot stays in target/bench.
    #[arg(long)]
    quick: bool,
    /// Service counts, comma-separated.
    #[arg(long, default_value = "1,1000,10000")]
    services: String,
    /// Repetitions per service count.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per figure.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Client hosts (addresses) the new connections come from in turn.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Dataplanes, comma-separated (direct, xdp, tc, iptables, nftables).
    #[arg(long, default_value = "direct,xdp,tc,iptables,nftables")]
    dataplanes: String,
    /// An earlier run's results.json whose other service counts join this run's report (for
    /// service counts measured with other repetitions; copy it out of target/bench first).
    #[arg(long)]
    merge: Option<PathBuf>,
}

pub fn run(root: &Path, args: Args) -> anyhow::Result<()> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("[bench] building nodeport-agent, nodeport-echo and nodeport-bench (release)");
    let status = Command::new(cargo)
        .args(["build", "--release"])
        .args(["-p", "nodeport-agent", "--bin", "nodeport-agent"])
        .args(["-p", "nodeport-lab", "--bin", "nodeport-echo"])
        .args(["-p", "nodeport-bench", "--bin", "nodeport-bench"])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the bench's binaries failed: {status}");
    }
    let release = target.join("release");
    let out_dir = target.join("bench");
    let mut recorded = String::from("cargo xtask bench");
    if args.quick {
        recorded.push_str(" --quick");
    } else {
        recorded.push_str(&format!(
            " --services {} --reps {} --duration {}",
            args.services, args.reps, args.duration
        ));
        if args.clients > 1 {
            recorded.push_str(&format!(" --clients {}", args.clients));
        }
    }
    if let Some(earlier) = &args.merge {
        recorded.push_str(&format!(" --merge {}", earlier.display()));
    }
    let mut cmd = Command::new(release.join("nodeport-bench"));
    cmd.arg("--agent")
        .arg(release.join("nodeport-agent"))
        .arg("--echo")
        .arg(release.join("nodeport-echo"))
        .arg("--out-dir")
        .arg(&out_dir)
        .args(["--services", &args.services])
        .args(["--reps", &args.reps.to_string()])
        .args(["--duration", &args.duration.to_string()])
        .args(["--dataplanes", &args.dataplanes])
        .args(["--clients", &args.clients.to_string()])
        .args(["--command", &recorded])
        .current_dir(root);
    if let Some(earlier) = &args.merge {
        cmd.arg("--merge").arg(earlier);
    }
    if args.quick {
        cmd.arg("--quick");
    } else {
        cmd.arg("--plot")
            .arg(root.join("docs/bench/conn-rate-vs-services.svg"));
    }
    let status = cmd.status().context("running nodeport-bench")?;
    if !status.success() {
        bail!("nodeport-bench failed ({status}); it needs root (network namespaces, BPF)");
    }
    eprintln!(
        "[bench] the section for docs/BENCHMARKS.md is {}",
        out_dir.join("section.md").display()
    );
    if !args.quick {
        agent_cost(root, &release, &out_dir, &args.services)?;
    }
    Ok(())
}

/// The agent's own cost (`nodeport-bench/src/agent_cost.rs`, the `agent-cost` binary) at the
/// same service counts from 1,000 up, its table written to target/bench/agent-cost.md for the
/// "The agent's cost" section of docs/BENCHMARKS.md.
fn agent_cost(root: &Path, release: &Path, out_dir: &Path, services: &str) -> anyhow::Result<()> {
    let counts: Vec<&str> = services
        .split(',')
        .filter(|c| c.trim().parse::<usize>().is_ok_and(|n| n >= 1000))
        .collect();
    if counts.is_empty() {
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "nodeport-bench",
            "--bin",
            "agent-cost",
        ])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building agent-cost failed: {status}");
    }
    eprintln!("[bench] the agent's cost at {} services", counts.join(", "));
    let out = Command::new(release.join("agent-cost"))
        .args(["--services", &counts.join(",")])
        .arg("--agent")
        .arg(release.join("nodeport-agent"))
        .current_dir(root)
        .output()
        .context("running agent-cost")?;
    if !out.status.success() {
        bail!(
            "agent-cost failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let table = String::from_utf8_lossy(&out.stdout);
    print!("{table}");
    std::fs::write(out_dir.join("agent-cost.md"), table.as_bytes())?;
    Ok(())
}
