//! The benchmark's quick mode end to end, in a lab of its own (`npb<pid>`): every dataplane
//! (direct, ours on XDP and on TC, kube-proxy iptables and nftables) must serve real
//! connections on both paths, and the results must make a table, JSON and a plot. Needs root;
//! fails (never skips) without it. Labs of killed earlier runs are removed first.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use nodeport_bench::{
    dataplane::Dataplane,
    report,
    run::{self, Options, Results},
    scenario::Path as BenchPath,
};
use nodeport_lab::{Config, sys};

/// A binary cargo built beside this test (target/<profile>/), or from an environment variable.
fn binary(name: &str, var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p nodeport-agent -p nodeport-lab --bins`; \
         `cargo test --workspace` does) or set {var}",
        bin.display()
    );
    bin
}

fn sweep_stale() {
    let prefixes: BTreeSet<String> = sys::netns_list()
        .into_iter()
        .chain(
            std::fs::read_dir("/sys/fs/bpf")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        )
        .filter_map(|n| {
            let (prefix, _) = n.split_once('-')?;
            let pid: i32 = prefix.strip_prefix("npb")?.parse().ok()?;
            (!sys::alive(pid)).then(|| prefix.to_owned())
        })
        .collect();
    for p in prefixes {
        let cfg = Config::new(&p, "w".into(), "a".into(), "e".into());
        if let Err(e) = nodeport_lab::down(&cfg) {
            eprintln!("removing stale bench lab {p}: {e:#}");
        }
    }
}

#[test]
fn quick_mode_serves_every_dataplane_and_reports() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the bench needs root (network namespaces, BPF)"
    );
    sweep_stale();
    let prefix = format!("npb{}", std::process::id());
    let opts = Options {
        prefix: prefix.clone(),
        agent: binary("nodeport-agent", "NODEPORT_AGENT_BIN"),
        echo: binary("nodeport-echo", "NODEPORT_ECHO_BIN"),
        services: vec![1],
        reps: 1,
        duration: Duration::from_millis(700),
        workers: 4,
        // Several client addresses: the option's path runs in CI too.
        clients: 3,
        dataplanes: Dataplane::ALL.to_vec(),
        progress: None,
    };
    let results = run::run(&opts, "bench_quick test").expect("the quick bench runs");
    let cfg = Config::new(&prefix, "w".into(), "a".into(), "e".into());
    assert!(
        nodeport_lab::leftovers(&cfg).is_empty(),
        "{:?}",
        nodeport_lab::leftovers(&cfg)
    );

    assert_eq!(results.samples.len(), 5 * 2);
    for dp in Dataplane::ALL {
        for path in BenchPath::ALL {
            let s = results
                .samples
                .iter()
                .find(|s| s.dataplane == dp && s.path == path)
                .unwrap_or_else(|| panic!("no sample of {dp:?} {path:?}"));
            assert_eq!(s.services, 2, "one service means the measured pair");
            assert!(
                s.conn.completed > 0 && s.conn.per_sec > 0.0 && s.conn.p50_us > 0,
                "{dp:?} {path:?}: {:?}",
                s.conn
            );
            assert!(
                s.keep_alive.completed > 0 && s.keep_alive.p99_us > 0,
                "{dp:?} {path:?}: {:?}",
                s.keep_alive
            );
            assert!(
                s.bulk.bytes > 0 && s.bulk.gbit_per_sec > 0.0,
                "{dp:?} {path:?}: {:?}",
                s.bulk
            );
        }
    }

    let dir = std::env::temp_dir().join(format!("{prefix}-out"));
    std::fs::create_dir_all(&dir).unwrap();
    let json = serde_json::to_string(&results).unwrap();
    let back: Results = serde_json::from_str(&json).unwrap();
    assert_eq!(back.samples.len(), results.samples.len());
    let svg = dir.join("plot.svg");
    report::plot(&results, &svg).unwrap();
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.contains("<svg"), "{svg_text}");
    let section = report::section(&results, "plot.svg");
    for dp in Dataplane::ALL {
        assert!(section.contains(dp.label()), "{section}");
        assert!(
            svg_text.contains(dp.label()),
            "{} missing in the plot",
            dp.label()
        );
    }
    assert!(
        section.contains("![New connections per second"),
        "{section}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
