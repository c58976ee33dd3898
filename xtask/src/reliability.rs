//! `cargo xtask reliability`: the long forms of docs/RELIABILITY.md's fault tests. `restarts` and
//! `churn` build the agent, the echo server and `nodeport-reliability`, and run the latter on labs
//! of its own (prefix `np-rel-…`), which it removes afterwards; `api-faults` and `full-tables` run
//! those test binaries in their long form (the test command runs their short form).
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which scenario: all, restarts, churn, api-faults or full-tables.
    #[arg(long, default_value = "all", value_parser = ["all", "restarts", "churn", "api-faults", "full-tables"])]
    scenario: String,
    /// api-faults: rounds of every API fault.
    #[arg(long, default_value_t = 3)]
    fault_rounds: u32,
    /// api-faults: how long each fault lasts, seconds.
    #[arg(long, default_value_t = 10)]
    fault_seconds: u32,
    /// SIGKILL-and-restart cycles of the agents.
    #[arg(long, default_value_t = 20)]
    restarts: usize,
    /// Kill one node's agent per cycle (in turn) instead of every node's.
    #[arg(long)]
    one_node: bool,
    /// How long the killed agents stay dead.
    #[arg(long, default_value_t = 500)]
    down_ms: u64,
    /// Load between two faults.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// The newer agent to roll out after the restarts (its file name must be nodeport-agent);
    /// default: a copy of the built agent under another path.
    #[arg(long)]
    upgrade_agent: Option<std::path::PathBuf>,
    /// How long pods are added and removed.
    #[arg(long, default_value_t = 60)]
    churn_seconds: u64,
    /// One pod added and one removed every this many milliseconds.
    #[arg(long, default_value_t = 300)]
    churn_period_ms: u64,
    /// Terminating time before a removed pod is deleted (0: deleted at once).
    #[arg(long, default_value_t = 3000)]
    grace_ms: u64,
    /// Delete pods veth first, so only the dataplane can end connections to them.
    #[arg(long)]
    cut: bool,
    /// Long-lived connections kept open.
    #[arg(long, default_value_t = 30)]
    long_conns: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 50)]
    new_per_sec: u32,
    /// Leave the labs up for inspection.
    #[arg(long)]
    keep: bool,
}

pub fn run(root: &Path, a: Args) -> anyhow::Result<()> {
    let all = a.scenario == "all";
    if all || a.scenario == "restarts" || a.scenario == "churn" {
        lab_scenarios(root, &a)?;
    }
    if all || a.scenario == "api-faults" {
        eprintln!(
            "[reliability] API faults, {} rounds of {} s each",
            a.fault_rounds, a.fault_seconds
        );
        cargo_test(
            root,
            &["-p", "nodeport-agent", "--test", "api_faults"],
            &[
                ("NODEPORT_FAULT_ROUNDS", a.fault_rounds.to_string()),
                ("NODEPORT_FAULT_SECONDS", a.fault_seconds.to_string()),
            ],
        )?;
    }
    if all || a.scenario == "full-tables" {
        eprintln!("[reliability] full tables at the default capacities");
        let (_agent, _echo) = crate::ebpf::build_lab(root)?;
        cargo_test(
            root,
            &["-p", "nodeport-lab", "--test", "full_tables"],
            &[("NODEPORT_FULL_TABLES", "long".to_owned())],
        )?;
    }
    Ok(())
}

/// `cargo test ARGS -- --nocapture --test-threads 1` with `env`, as the long form of a test file.
fn cargo_test(root: &Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("test")
        .args(args)
        .args(["--", "--nocapture", "--test-threads", "1"])
        .current_dir(root);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().context("running cargo test")?;
    if !status.success() {
        bail!("{args:?} (long form) failed: {status}");
    }
    Ok(())
}

fn lab_scenarios(root: &Path, a: &Args) -> anyhow::Result<()> {
    eprintln!("[reliability] building nodeport-agent, nodeport-echo and nodeport-reliability");
    let (agent, echo) = crate::ebpf::build_lab(root)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "-p",
            "nodeport-lab",
            "--bin",
            "nodeport-reliability",
        ])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building nodeport-reliability failed: {status}");
    }
    let driver = echo.with_file_name("nodeport-reliability");
    let mut cmd = Command::new(&driver);
    cmd.arg("--agent")
        .arg(&agent)
        .arg("--echo")
        .arg(&echo)
        .args(["--scenario", &a.scenario])
        .args(["--restarts", &a.restarts.to_string()])
        .args(["--down-ms", &a.down_ms.to_string()])
        .args(["--settle-ms", &a.settle_ms.to_string()])
        .args(["--churn-seconds", &a.churn_seconds.to_string()])
        .args(["--churn-period-ms", &a.churn_period_ms.to_string()])
        .args(["--grace-ms", &a.grace_ms.to_string()])
        .args(["--long-conns", &a.long_conns.to_string()])
        .args(["--new-per-sec", &a.new_per_sec.to_string()]);
    if let Some(p) = &a.upgrade_agent {
        cmd.arg("--upgrade-agent").arg(p);
    }
    for (on, flag) in [
        (a.one_node, "--one-node"),
        (a.cut, "--cut"),
        (a.keep, "--keep"),
    ] {
        if on {
            cmd.arg(flag);
        }
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", driver.display()))?;
    if !status.success() {
        bail!(
            "the reliability scenarios failed ({status}): the lab needs root, and a missed goal is printed above"
        );
    }
    Ok(())
}
