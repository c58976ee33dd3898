//! The agent's cost benchmark, small: 100 services, 20 endpoint updates, through both sources
//! (a manifests directory, a fake API server), with the real agent in a network namespace (root
//! needed; fails without it).
use std::path::PathBuf;

use nodeport_bench::agent_cost::{AgentCostOptions, AgentSource, measure, render_markdown};

/// The agent binary cargo built beside this test (`cargo build -p nodeport-agent`, or
/// `cargo test --workspace`), or `$NODEPORT_AGENT_BIN`.
fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NODEPORT_AGENT_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/agent_cost-<hash> -> target/<profile>/nodeport-agent
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("nodeport-agent");
    assert!(
        bin.is_file(),
        "{} is missing: cargo build -p nodeport-agent (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

#[test]
fn agent_cost_small() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "kernel test: run as root");
    let results = measure(&AgentCostOptions {
        agent: agent_bin(),
        service_counts: vec![100],
        endpoints_per_service: 5,
        updates: 20,
        sources: vec![AgentSource::Manifests, AgentSource::Kube],
    })
    .expect("measuring");
    println!("{}", render_markdown(&results));
    let sources: Vec<AgentSource> = results.iter().map(|r| r.source).collect();
    assert_eq!(sources, [AgentSource::Manifests, AgentSource::Kube]);
    for r in &results {
        assert_eq!(r.services, 100);
        assert_eq!(r.updates, 20, "every update observed in the maps");
        assert!(r.first_sync > std::time::Duration::ZERO);
        assert!(r.first_sync < std::time::Duration::from_secs(60), "{r:?}");
        assert!(r.rss_bytes > 1 << 20, "{r:?}");
        assert!(r.peak_rss_bytes >= r.rss_bytes, "{r:?}");
        assert!(r.peak_rss_after_updates_bytes >= r.peak_rss_bytes, "{r:?}");
        assert!(r.update_p50 <= r.update_p99, "{r:?}");
        assert!(r.update_p50 > std::time::Duration::ZERO, "{r:?}");
        // The agent's part was measured (a sync per update) and is part of the whole.
        assert!(r.programming_mean > std::time::Duration::ZERO, "{r:?}");
        assert!(r.programming_mean <= r.update_p99, "{r:?}");
    }
}
