//! The `nodeport-agent` binary end to end, as `cargo xtask load/stats/unload` runs it: load on a
//! veth in a throwaway namespace (entered with nsenter, which keeps this mount namespace and so
//! /sys/fs/bpf), stats by name, bpftool reading the pinned map, unload leaving nothing.
//! Needs root; fails (never skips) without it.

use std::process::{Command, Output};

use nodeport_common::{Counter, LAYOUT_VERSION};

const AGENT: &str = env!("CARGO_BIN_EXE_nodeport-agent");

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A namespace holding a veth pair, deleted on drop (also on panic).
struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn load_stats_unload_through_the_binary() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test loads BPF programs: run it as root (bash scripts/test.sh)"
    );
    let pid = std::process::id();
    let ns = Ns(format!("npt-{pid}-cli"));
    run("ip", &["netns", "add", &ns.0]);
    run(
        "ip",
        &[
            "-n", &ns.0, "link", "add", "cli0", "type", "veth", "peer", "name", "cli1",
        ],
    );
    run("ip", &["-n", &ns.0, "link", "set", "cli0", "up"]);
    run("ip", &["-n", &ns.0, "link", "set", "cli1", "up"]);
    let root = format!("/sys/fs/bpf/nodeport-test-{pid}-cli");
    let netns = format!("--net=/run/netns/{}", ns.0);
    let in_ns = |args: &[&str]| {
        let mut all = vec![netns.as_str(), AGENT];
        all.extend_from_slice(args);
        run("nsenter", &all)
    };

    // Default ingress is auto: a veth gets TC (XDP_TX on a veth needs an XDP program on its
    // peer, which the agent cannot count on).
    let loaded = in_ns(&["load", "--iface", "cli0", "--pin-root", &root]);
    let text = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        text.contains("np_tc_ingress on cli0 (tcx-ingress): attached"),
        "{text}"
    );
    assert!(!text.contains("np_xdp"), "{text}");
    // Explicit XDP: native XDP, with TC ingress kept beside it as the fallback.
    let loaded = in_ns(&[
        "load",
        "--iface",
        "cli0",
        "--ingress",
        "xdp",
        "--pin-root",
        &root,
    ]);
    let text = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        text.contains("np_xdp on cli0 (xdp-native): attached"),
        "{text}"
    );
    // The second load updates the pinned TC links in place (no moment without a program).
    assert!(
        text.contains("np_tc_ingress on cli0 (tcx-ingress): replaced in place"),
        "{text}"
    );
    assert!(
        text.contains("np_tc_egress on cli0 (tcx-egress): replaced in place"),
        "{text}"
    );

    // The decoded views work on the pinned maps (empty here) in text and JSON.
    let listed = run(
        AGENT,
        &["list", "services", "-o", "json", "--pin-root", &root],
    );
    let services: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    assert_eq!(services, serde_json::json!([]));
    let status = run(AGENT, &["status", "--pin-root", &root]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("np_ct4") && status.contains("drop_no_backend"),
        "{status}"
    );
    let status = run(AGENT, &["status", "-o", "json", "--pin-root", &root]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(status["maps"].as_array().map(Vec::len), Some(4));

    let stats = run(AGENT, &["stats", "--pin-root", &root]);
    let stats = String::from_utf8_lossy(&stats.stdout);
    for counter in Counter::ALL {
        assert!(
            stats
                .lines()
                .any(|l| l.split_whitespace().next() == Some(counter.name())),
            "{} missing from:\n{stats}",
            counter.name()
        );
    }
    let map = format!("{root}/v{LAYOUT_VERSION}/np_stats");
    run("bpftool", &["map", "dump", "pinned", &map]);

    in_ns(&["unload", "--pin-root", &root]);
    assert!(!std::path::Path::new(&root).exists(), "{root} left behind");
    let link = run("ip", &["-n", &ns.0, "-d", "link", "show", "dev", "cli0"]);
    assert!(!String::from_utf8_lossy(&link.stdout).contains("np_xdp"));
}

#[test]
fn stats_without_a_loaded_dataplane_fails_with_the_path() {
    let out = Command::new(AGENT)
        .args([
            "stats",
            "--pin-root",
            "/sys/fs/bpf/nodeport-test-nothing-here",
        ])
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nodeport-test-nothing-here"), "{err}");
}
