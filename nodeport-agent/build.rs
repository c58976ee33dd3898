//! Builds the eBPF object (`nodeport-ebpf`'s `nodeport` binary) for the BPF target with the pinned
//! nightly and bpf-linker, and leaves it at `$OUT_DIR/nodeport` for `include_bytes_aligned!`.
//!
//! The nightly comes from the repository's `ebpf-toolchain` file, the same file
//! `scripts/setup.sh` installs from and `cargo xtask build-ebpf` uses: one pin for all three.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

const EBPF_PACKAGE: &str = "nodeport-ebpf";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let toolchain_file = Path::new(&manifest_dir).join("../ebpf-toolchain");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    let nightly = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let nightly = nightly.trim();

    // Locate the eBPF crate through cargo metadata rather than a relative path, as aya-template
    // does, so the build keeps working if the workspace is rearranged.
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", ebpf.manifest_path))?;

    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(nightly),
    )
}
