//! `cargo xtask <task>`: developer tasks that need more than one cargo invocation.
//!
//! - `build-ebpf`: builds the eBPF object on its own, exactly as nodeport-agent/build.rs does
//!   through aya-build (same nightly, target, flags), and prints its path.
//! - `load` / `unload` / `stats`: build the agent and run that subcommand with the remaining
//!   arguments (`cargo xtask load --iface eth0`).
//! - `test`: `bash scripts/test.sh`, the whole test suite.
//! - `bench-prog`: the per-packet cost benchmark of docs/BENCHMARKS.md.
//! - `lab`: builds the agent and the echo server, brings the lab up (a kind-like cluster in
//!   network namespaces, nodeport-lab) and prints its report; `lab up|apply|report|status|down`.

mod bench;
mod ebpf;
mod fuzz;
mod kind;
mod lab;
mod reliability;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Developer tasks for the NodePort dataplane")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the eBPF object (bpfel-unknown-none, pinned nightly, bpf-linker) and print its path.
    BuildEbpf,
    /// Build the agent and run `nodeport-agent load ARGS…` (e.g. --iface eth0).
    Load(AgentArgs),
    /// Build the agent and run `nodeport-agent unload ARGS…`.
    Unload(AgentArgs),
    /// Build the agent and run `nodeport-agent stats ARGS…`.
    Stats(AgentArgs),
    /// Run every test: `bash scripts/test.sh`.
    Test,
    /// Per-packet program cost (docs/BENCHMARKS.md): runs the `prog_bench` binary of
    /// nodeport-tests in release mode with ARGS….
    BenchProg(AgentArgs),
    /// The lab: without an action, build, bring it up (or update it) and print the report.
    Lab(lab::LabArgs),
    /// Benchmarks against the direct path and kube-proxy (docs/BENCHMARKS.md).
    Bench(bench::Args),
    /// Packet fuzzing through BPF_PROG_TEST_RUN, long form (docs/RELIABILITY.md).
    Fuzz(fuzz::Args),
    /// Restarts, churn and full tables under load, long form (docs/RELIABILITY.md).
    Reliability(reliability::Args),
    /// A kind cluster running the dataplane as a DaemonSet: up, deploy, e2e, down.
    Kind(kind::Args),
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// Passed to the agent's subcommand unchanged.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::BuildEbpf => {
            let object = ebpf::build(&root)?;
            println!("{}", object.display());
        }
        Task::Load(a) => agent(&root, "load", &a.args)?,
        Task::Unload(a) => agent(&root, "unload", &a.args)?,
        Task::Stats(a) => agent(&root, "stats", &a.args)?,
        Task::Test => run(Command::new("bash")
            .arg(root.join("scripts/test.sh"))
            .current_dir(&root))?,
        Task::BenchProg(a) => {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            run(Command::new(cargo)
                .args([
                    "run",
                    "--release",
                    "-p",
                    "nodeport-tests",
                    "--bin",
                    "prog_bench",
                    "--",
                ])
                .args(&a.args)
                .current_dir(&root))?
        }
        Task::Lab(args) => lab::run(&root, args)?,
        Task::Bench(args) => bench::run(&root, args)?,
        Task::Fuzz(args) => fuzz::run(&root, args)?,
        Task::Reliability(args) => reliability::run(&root, args)?,
        Task::Kind(args) => kind::run(&root, args)?,
    }
    Ok(())
}

/// Builds the agent (its build.rs builds and embeds the eBPF object) and runs a subcommand.
fn agent(root: &Path, subcommand: &str, args: &[String]) -> anyhow::Result<()> {
    let binary = ebpf::build_agent(root)?;
    let mut cmd = Command::new(&binary);
    cmd.arg(subcommand).args(args);
    run(&mut cmd).with_context(
        || "loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN): run as root or with sudo -E",
    )
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
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
    fn agent_arguments_pass_through() {
        let cli =
            Cli::try_parse_from(["xtask", "load", "--iface", "eth0", "--xdp-mode", "generic"])
                .unwrap();
        let Task::Load(a) = cli.task else {
            panic!("not load")
        };
        assert_eq!(a.args, ["--iface", "eth0", "--xdp-mode", "generic"]);
    }

    #[test]
    fn lab_actions_parse() {
        let cli = Cli::try_parse_from(["xtask", "lab"]).unwrap();
        assert!(matches!(cli.task, Task::Lab(_)));
        for action in ["up", "apply", "report", "status", "down"] {
            Cli::try_parse_from(["xtask", "lab", action, "--prefix", "x"]).unwrap();
        }
        assert!(Cli::try_parse_from(["xtask", "lab", "sideways"]).is_err());
    }

    #[test]
    fn lab_script_runs_setup_then_the_lab() {
        let script = std::fs::read_to_string(workspace_root().join("scripts/lab.sh")).unwrap();
        let setup = script.find("bash scripts/setup.sh").expect("setup");
        let lab = script.find("exec cargo xtask lab").expect("the lab");
        assert!(setup < lab, "{script}");
    }

    #[test]
    fn ci_entry_point_runs_the_test_script() {
        let ci = std::fs::read_to_string(workspace_root().join(".ci/run")).unwrap();
        assert!(
            ci.lines().any(|l| l.trim() == "exec bash scripts/test.sh"),
            "{ci}"
        );
    }
}
