//! Short forms of the reliability scenarios (docs/RELIABILITY.md): agent restarts and an upgrade
//! under load, and backend churn under load, each on its own lab. The long forms run through
//! `cargo xtask reliability`.
//!
//! Each test brings up its own lab with its own prefix (`nprt<pid>-<n>`) and tears it down in a
//! Drop guard, also when it fails; labs of killed earlier runs are removed first. They need root
//! and fail (never skip) without it.
use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nodeport_lab::{
    Config,
    load::scenarios::{self, ChurnOptions, RestartOptions},
};

mod support;
use support::{ECHO, TestLab, agent_binary, require_root, sweep_stale};

const PREFIX: &str = "nprt";

fn lab_with(replicas: usize) -> TestLab {
    require_root();
    sweep_stale(PREFIX);
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("{PREFIX}{}-{n}", std::process::id());
    let work = std::env::temp_dir().join(format!("nodeport-reliability-{prefix}"));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("workload.yaml"), scenarios::workload(replicas)).unwrap();
    let cfg = Config::new(&prefix, work.clone(), agent_binary(), ECHO.into());
    let started = Instant::now();
    let lab = nodeport_lab::up(cfg.clone()).unwrap_or_else(|e| {
        let _ = std::fs::remove_dir_all(&work);
        panic!("lab up: {e:#}")
    });
    eprintln!("lab {prefix} up in {:?}", started.elapsed());
    TestLab { lab, cfg, work }
}

/// The pinned dataplane forwards while the agents are dead and a restarted agent adopts its maps
/// and conntrack without disturbing them: no established connection breaks and no new
/// connection fails across 3 SIGKILL-and-restart cycles of every agent and a rolling upgrade to
/// another executable.
#[test]
fn agent_restarts_and_an_upgrade_under_load_break_no_connection() {
    let t = lab_with(6);
    let upgrade = scenarios::agent_copy(&t.lab).unwrap();
    let o = RestartOptions {
        restarts: 3,
        all_nodes: true,
        down_for: Duration::from_millis(500),
        settle: Duration::from_millis(1000),
        upgrade_to: Some(upgrade),
        load: scenarios::load_config(&t.lab, 24, 40),
    };
    let r = scenarios::restarts(&t.lab, &o).unwrap_or_else(|e| panic!("restarts: {e:#}"));
    eprintln!("{}", r.markdown());
    assert_eq!(
        r.windows.len(),
        1 + 3 + 3,
        "baseline, 3 restarts, 3 upgrades"
    );
    for w in &r.windows[1..] {
        assert!(
            !w.window.resync.is_zero() && w.new_attempted > 0 && w.answered > 0,
            "{}: no load or no resync measured",
            w.window.label
        );
    }
    // New connections were made while no agent process existed at all, and all were answered.
    for w in &r.windows[1..4] {
        assert!(
            w.agentless_attempted >= 5,
            "{}: only {} new connections while the agents were dead",
            w.window.label,
            w.agentless_attempted
        );
    }
    assert_eq!(r.broken(), 0, "established connections broke");
    assert_eq!(r.new_failed(), 0, "new connections failed");
}

/// Pods added and removed every 300 ms (terminating for 5 s, then deleted): no connection to a
/// pod that was not deleted fails, the agents stop new connections to a terminating pod before it
/// is deleted, so no new connection fails, and every connection to a deleted pod ends within 3 s
/// of the deletion.
#[test]
fn backend_churn_under_load_fails_no_connection_to_a_surviving_pod() {
    let mut t = lab_with(4);
    let o = ChurnOptions {
        duration: Duration::from_secs(5),
        period: Duration::from_millis(300),
        grace: Duration::from_secs(5),
        cut: false,
        linger: Duration::from_secs(3),
        load: scenarios::load_config(&t.lab, 24, 40),
    };
    let r = scenarios::churn(&mut t.lab, &o).unwrap_or_else(|e| panic!("churn: {e:#}"));
    eprintln!("{}", r.markdown());
    assert!(r.removed >= 10, "only {} pods removed", r.removed);
    assert!(
        r.survivors_broken.is_empty(),
        "connections to live pods broke"
    );
    // The agents must stop sending new flows to a terminating endpoint before its pod goes:
    // kube-proxy's contract with kubelet's graceful deletion.
    assert!(
        r.terminating_lag < o.grace,
        "the agents still sent new connections to pods {:?} after they turned terminating \
         (their grace was {:?}): the maps lag behind the EndpointSlices under churn",
        r.terminating_lag,
        o.grace
    );
    assert!(r.new_failed.is_empty(), "new connections failed");
    assert!(
        !r.removed_ended.is_empty(),
        "no connection was ever to a removed pod"
    );
    assert_eq!(r.removed_never_ended, 0, "connections to deleted pods hung");
    for e in &r.removed_ended {
        assert!(
            e.after < Duration::from_secs(3),
            "a connection to deleted pod {} ended only {:?} later ({:?})",
            e.pod,
            e.after,
            e.failure
        );
    }
}
