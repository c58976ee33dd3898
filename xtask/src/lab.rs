//! `cargo xtask lab [up|apply|report|status|down]`: the lab of nodeport-lab from the command line.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use nodeport_lab::{Config, DEFAULT_PREFIX, Lab, report};

#[derive(Debug, Args)]
pub struct LabArgs {
    #[command(subcommand)]
    action: Option<LabAction>,
    /// Every namespace, pin directory and state file of the lab is named <prefix>-….
    #[arg(long, global = true, default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// Workload YAML (Deployments, Services); default lab/workloads. `up` and `apply` read it.
    #[arg(long, global = true)]
    workloads: Option<PathBuf>,
    /// Requests per nodePort for the spread in the report.
    #[arg(long, global = true, default_value_t = 300)]
    requests: usize,
    /// Worker nodes besides the control plane.
    #[arg(long, global = true, default_value_t = 2)]
    workers: u8,
}

#[derive(Debug, Subcommand)]
enum LabAction {
    /// Build, then bring the lab up (idempotent: a running lab is updated, dead processes restarted).
    Up,
    /// Read the workloads again and make the running lab match (pods, EndpointSlices).
    Apply,
    /// Print the report of the running lab.
    Report,
    /// Nodes, agents, pods and services of the running lab.
    Status,
    /// Remove every namespace, link, process, pin and state file of the lab (also after a crash).
    Down,
}

fn config(root: &Path, args: &LabArgs, bins: Option<(PathBuf, PathBuf)>) -> Config {
    let (agent, echo) = bins.unwrap_or_else(|| {
        let dir = root.join("target/debug");
        (dir.join("nodeport-agent"), dir.join("nodeport-echo"))
    });
    let workloads = args
        .workloads
        .clone()
        .unwrap_or_else(|| root.join("lab/workloads"));
    let mut c = Config::new(&args.prefix, workloads, agent, echo);
    c.workers = args.workers;
    c
}

pub fn run(root: &Path, args: LabArgs) -> anyhow::Result<()> {
    match args.action {
        None | Some(LabAction::Up) => {
            eprintln!("[lab] building nodeport-agent and nodeport-echo");
            let bins = crate::ebpf::build_lab(root)?;
            let cfg = config(root, &args, Some(bins));
            eprintln!(
                "[lab] bringing up lab {:?} (workloads {})",
                cfg.prefix,
                cfg.workloads.display()
            );
            let lab = nodeport_lab::up(cfg)?;
            if args.action.is_none() {
                eprintln!("[lab] measuring ({} requests per nodePort)", args.requests);
                println!("{}", report::report(&lab, args.requests)?);
            } else {
                print!("{}", report::status(&lab));
            }
            println!("{}", report::usage(&lab));
        }
        Some(LabAction::Apply) => {
            let cfg = config(root, &args, None);
            let mut lab = Lab::open(&cfg)?;
            if let Some(dir) = &args.workloads {
                lab.set_workloads(dir.clone())?;
            }
            let r = lab.apply().context("applying the workloads")?;
            println!(
                "created {} pod(s), deleted {} pod(s){}",
                r.created.len(),
                r.deleted.len(),
                r.pending
                    .iter()
                    .map(|p| format!("\n{p}"))
                    .collect::<String>()
            );
            print!("{}", report::status(&lab));
        }
        Some(LabAction::Report) => {
            let lab = Lab::open(&config(root, &args, None))?;
            println!("{}", report::report(&lab, args.requests)?);
            println!("{}", report::usage(&lab));
        }
        Some(LabAction::Status) => {
            let lab = Lab::open(&config(root, &args, None))?;
            print!("{}", report::status(&lab));
        }
        Some(LabAction::Down) => {
            let cfg = config(root, &args, None);
            nodeport_lab::down(&cfg)?;
            println!("lab {:?} is down: nothing of it is left", cfg.prefix);
        }
    }
    Ok(())
}
