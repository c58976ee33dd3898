//! `cargo xtask bench`: not built yet.
use std::path::Path;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_root: &Path, _args: Args) -> anyhow::Result<()> {
    anyhow::bail!("cargo xtask bench is not built yet")
}
