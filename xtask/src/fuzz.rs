//! `cargo xtask fuzz [--packets N] [--seed S] [--streams K]`: the long form of the packet
//! fuzzing (docs/RELIABILITY.md, "Packet fuzzing"): the same test as the short form
//! (`tests/tests/fuzz.rs`), built in release, with 10,000,000 packets by default and a seed that
//! is printed first, so any run can be repeated with `--seed`.
use std::{
    path::Path,
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Packets in all, split over the streams.
    #[arg(long, default_value_t = 10_000_000)]
    packets: u64,
    /// The first stream's seed (stream i uses seed + i); decimal or 0x-hex. Default: the clock.
    #[arg(long)]
    seed: Option<String>,
    /// Parallel streams, each with its own namespace and maps.
    #[arg(long, default_value_t = 2)]
    streams: u64,
}

fn parse_seed(s: &str) -> anyhow::Result<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .with_context(|| format!("--seed {s:?}: expected a decimal or 0x-hex 64-bit number"))
}

pub fn run(root: &Path, args: Args) -> anyhow::Result<()> {
    if args.packets == 0 || args.streams == 0 {
        bail!("--packets and --streams must be at least 1");
    }
    let seed = match &args.seed {
        Some(s) => parse_seed(s)?,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("reading the clock")?
            .as_nanos() as u64,
    };
    eprintln!(
        "[fuzz] {} packets, {} streams, seed {seed} (repeat with --seed {seed})",
        args.packets, args.streams
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "test",
            "--release",
            "-p",
            "nodeport-tests",
            "--test",
            "fuzz",
        ])
        .args(["--", "--nocapture", "--test-threads", "1"])
        .env("NODEPORT_FUZZ_SEED", seed.to_string())
        .env("NODEPORT_FUZZ_PACKETS", args.packets.to_string())
        .env("NODEPORT_FUZZ_STREAMS", args.streams.to_string())
        .current_dir(root)
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!(
            "packet fuzzing failed (seed {seed}): the failing stream's seed, case and replay \
             command are printed above"
        );
    }
    Ok(())
}
