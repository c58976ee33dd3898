//! `nodeport-reliability`: the long forms of the reliability scenarios (docs/RELIABILITY.md) on
//! a lab of their own; `cargo xtask reliability` builds the binaries and runs it. Prints each
//! scenario's figures as Markdown and exits non-zero when a goal is missed.
//!
//! Usage: `nodeport-reliability --agent PATH --echo PATH [--prefix P] [--scenario all|restarts|churn]
//! [--restarts N] [--one-node] [--down-ms MS] [--settle-ms MS] [--upgrade-agent PATH]
//! [--churn-seconds S] [--churn-period-ms MS] [--grace-ms MS] [--long-conns N]
//! [--new-per-sec N] [--keep]`
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use nodeport_lab::{
    Config,
    load::scenarios::{self, ChurnOptions, RestartOptions},
};

const USAGE: &str = "nodeport-reliability --agent PATH --echo PATH [--prefix P] \
[--scenario all|restarts|churn] [--restarts N] [--one-node] [--down-ms MS] [--settle-ms MS] \
[--upgrade-agent PATH] [--churn-seconds S] [--churn-period-ms MS] [--grace-ms MS] \
[--cut] [--long-conns N] [--new-per-sec N] [--keep]";

struct Args {
    agent: PathBuf,
    echo: PathBuf,
    prefix: String,
    scenario: String,
    restarts: usize,
    all_nodes: bool,
    down: Duration,
    settle: Duration,
    upgrade_agent: Option<PathBuf>,
    churn: Duration,
    churn_period: Duration,
    grace: Duration,
    long_conns: usize,
    new_per_sec: u32,
    keep: bool,
    cut: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        agent: PathBuf::new(),
        echo: PathBuf::new(),
        prefix: "np-rel".into(),
        scenario: "all".into(),
        restarts: 20,
        all_nodes: true,
        down: Duration::from_millis(500),
        settle: Duration::from_millis(1000),
        upgrade_agent: None,
        churn: Duration::from_secs(60),
        churn_period: Duration::from_millis(300),
        grace: Duration::from_secs(3),
        long_conns: 30,
        new_per_sec: 50,
        keep: false,
        cut: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        let ms = |v: String| -> anyhow::Result<Duration> {
            Ok(Duration::from_millis(
                v.parse()
                    .with_context(|| format!("{v:?} is not milliseconds"))?,
            ))
        };
        match flag.as_str() {
            "--agent" => a.agent = value()?.into(),
            "--echo" => a.echo = value()?.into(),
            "--prefix" => a.prefix = value()?,
            "--scenario" => a.scenario = value()?,
            "--restarts" => a.restarts = value()?.parse()?,
            "--one-node" => a.all_nodes = false,
            "--down-ms" => a.down = ms(value()?)?,
            "--settle-ms" => a.settle = ms(value()?)?,
            "--upgrade-agent" => a.upgrade_agent = Some(value()?.into()),
            "--churn-seconds" => a.churn = Duration::from_secs(value()?.parse()?),
            "--churn-period-ms" => a.churn_period = ms(value()?)?,
            "--grace-ms" => a.grace = ms(value()?)?,
            "--long-conns" => a.long_conns = value()?.parse()?,
            "--new-per-sec" => a.new_per_sec = value()?.parse()?,
            "--keep" => a.keep = true,
            "--cut" => a.cut = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if !["all", "restarts", "churn"].contains(&a.scenario.as_str()) {
        bail!("--scenario {:?}: all, restarts or churn", a.scenario);
    }
    if a.agent.as_os_str().is_empty() || a.echo.as_os_str().is_empty() {
        bail!("--agent and --echo are required (cargo xtask reliability passes them)");
    }
    Ok(a)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("nodeport-reliability: a goal was missed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("nodeport-reliability: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One lab per scenario (the churn changes the pods), removed afterwards unless `--keep`.
fn with_lab<T>(
    a: &Args,
    name: &str,
    replicas: usize,
    f: impl FnOnce(&mut nodeport_lab::Lab) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let prefix = format!("{}-{name}", a.prefix);
    let work = std::env::temp_dir().join(format!("nodeport-reliability-{prefix}"));
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("workload.yaml"), scenarios::workload(replicas))?;
    let cfg = Config::new(&prefix, work.clone(), a.agent.clone(), a.echo.clone());
    eprintln!("[reliability] lab {prefix}: up");
    let result = nodeport_lab::up(cfg.clone()).and_then(|mut lab| f(&mut lab));
    if a.keep {
        eprintln!("[reliability] lab {prefix} kept (cargo xtask lab down --prefix {prefix})");
    } else {
        nodeport_lab::down(&cfg)?;
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

fn run() -> anyhow::Result<bool> {
    let a = parse()?;
    let mut ok = true;
    if a.scenario != "churn" {
        let r = with_lab(&a, "restarts", 6, |lab| {
            let upgrade_to = match &a.upgrade_agent {
                Some(p) => p.clone(),
                None => scenarios::agent_copy(lab)?,
            };
            eprintln!(
                "[reliability] {} restarts, then an upgrade to {}",
                a.restarts,
                upgrade_to.display()
            );
            scenarios::restarts(
                lab,
                &RestartOptions {
                    restarts: a.restarts,
                    all_nodes: a.all_nodes,
                    down_for: a.down,
                    settle: a.settle,
                    upgrade_to: Some(upgrade_to),
                    load: scenarios::load_config(lab, a.long_conns, a.new_per_sec),
                },
            )
        })?;
        println!("## Restarts and upgrades under load\n\n{}", r.markdown());
        // The dataplane is pinned and forwards while no agent runs: new connections too.
        let goal = r.broken() == 0 && r.new_failed() == 0;
        println!(
            "goal (no established connection broken, no new connection failed): {}\n",
            if goal { "met" } else { "MISSED" }
        );
        ok &= goal;
    }
    if a.scenario != "restarts" {
        let r = with_lab(&a, "churn", 4, |lab| {
            eprintln!(
                "[reliability] churn for {:?}, every {:?}, grace {:?}",
                a.churn, a.churn_period, a.grace
            );
            let load = scenarios::load_config(lab, a.long_conns, a.new_per_sec);
            scenarios::churn(
                lab,
                &ChurnOptions {
                    duration: a.churn,
                    period: a.churn_period,
                    grace: a.grace,
                    cut: a.cut,
                    linger: Duration::from_secs(3),
                    load,
                },
            )
        })?;
        println!("## Backend churn under load\n\n{}", r.markdown());
        let hung = r
            .removed_ended
            .iter()
            .filter(|e| e.failure == nodeport_lab::load::Failure::Timeout)
            .count();
        // With a grace period, new flows must have left a pod before it goes (kube-proxy's
        // contract with graceful deletion); deleted at once, some may fail and are only counted.
        let graceful =
            a.grace.is_zero() || (r.new_failed.is_empty() && r.terminating_lag < a.grace);
        let goal =
            r.survivors_broken.is_empty() && r.removed_never_ended == 0 && hung == 0 && graceful;
        println!(
            "goal (no connection to a surviving pod fails; every one to a removed pod ends with a \
             reset or close, none hangs ({hung} did); with a grace period, no new connection fails): {}\n",
            if goal { "met" } else { "MISSED" }
        );
        ok &= goal;
    }
    Ok(ok)
}
