//! `agent-cost --services 1000,10000 [--source manifests|kube|both] [--endpoints 5] [--updates 200]
//! [--agent PATH]`: the agent's
//! cost (docs/BENCHMARKS.md, "The agent's cost"), printed as a markdown table. The agent binary
//! defaults to the `nodeport-agent` beside this one (`cargo build --release -p nodeport-agent`).
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use nodeport_bench::agent_cost::{AgentCostOptions, AgentSource, measure, render_markdown};

fn main() -> anyhow::Result<()> {
    let mut opts = AgentCostOptions {
        agent: std::env::current_exe()?
            .parent()
            .context("no directory for this executable")?
            .join("nodeport-agent"),
        service_counts: vec![1000, 10_000],
        endpoints_per_service: 5,
        updates: 200,
        sources: vec![AgentSource::Manifests, AgentSource::Kube],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--services" => {
                opts.service_counts = value()?
                    .split(',')
                    .map(|n| n.trim().parse().with_context(|| format!("bad count {n:?}")))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--endpoints" => opts.endpoints_per_service = value()?.parse()?,
            "--updates" => opts.updates = value()?.parse()?,
            "--agent" => opts.agent = PathBuf::from(value()?),
            "--source" => opts.sources = AgentSource::parse_list(&value()?)?,
            other => bail!(
                "unknown argument {other:?}; usage: agent-cost [--services N,M] [--source manifests|kube|both] [--endpoints N] [--updates N] [--agent PATH]"
            ),
        }
    }
    let results = measure(&opts)?;
    print!("{}", render_markdown(&results));
    Ok(())
}
