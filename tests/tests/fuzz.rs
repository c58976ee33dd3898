//! Packet fuzzing through BPF_PROG_TEST_RUN against an independent model (docs/RELIABILITY.md,
//! "Packet fuzzing"). The short form, part of the test command: a fixed seed and a seed taken
//! from the clock (printed), one stream each, in parallel, 1,000,000 packets in all. The long
//! form is `cargo xtask fuzz`, which sets the environment below on a release build.
//!
//! - NODEPORT_FUZZ_SEED: the first stream's seed (stream i uses seed + i); replays a failure.
//! - NODEPORT_FUZZ_PACKETS: packets in all, split over the streams (default 1,000,000).
//! - NODEPORT_FUZZ_STREAMS: parallel streams, each with its own namespace and maps (default 2).
use std::time::{SystemTime, UNIX_EPOCH};

use nodeport_tests::fuzz;

/// "npfuzz01": the fixed seed of the short form.
const FIXED_SEED: u64 = 0x6e70_6675_7a7a_3031;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

#[test]
fn fuzz_programs_against_the_model() {
    nodeport_tests::require_kernel();
    let packets = env_u64("NODEPORT_FUZZ_PACKETS").unwrap_or(1_000_000);
    let streams = env_u64("NODEPORT_FUZZ_STREAMS").unwrap_or(2).max(1);
    let seeds: Vec<u64> = match env_u64("NODEPORT_FUZZ_SEED") {
        Some(s) => (0..streams).map(|i| s.wrapping_add(i)).collect(),
        None => {
            let clock = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            let mut seeds = vec![FIXED_SEED, clock];
            seeds.extend((2..streams).map(|i| clock.wrapping_add(i)));
            seeds.truncate(streams as usize);
            seeds
        }
    };
    let per_stream = packets.div_ceil(streams);
    println!(
        "packet fuzzing: {packets} packets over {} streams, seeds {}",
        seeds.len(),
        seeds
            .iter()
            .map(|s| format!("{s:#018x} ({s})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = seeds
            .iter()
            .map(|&seed| s.spawn(move || fuzz::run(seed, per_stream)))
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut failures = Vec::new();
    let mut total = 0;
    for r in results {
        match r {
            Ok(Ok(report)) => {
                println!("{report}");
                assert_eq!(report.packets, per_stream, "a stream stopped early");
                assert!(
                    report.by_outcome.get("translated").copied().unwrap_or(0) > per_stream / 10,
                    "too few translated packets for the fuzzing to mean anything: {report}"
                );
                if per_stream >= 100_000 {
                    assert!(
                        report.local_port_remaps > 0,
                        "no DNAT-only flow needed a source-port remap, so the clash path \
                         (docs/RELIABILITY.md, finding 2) went unchecked: {report}"
                    );
                }
                total += report.packets;
            }
            Ok(Err(failure)) => failures.push(failure.to_string()),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        total >= packets,
        "{total} packets checked, {packets} asked for"
    );
}
