//! Building the eBPF object and the agent from xtask.
//!
//! `build` mirrors what aya-build does inside nodeport-agent/build.rs (same toolchain, target,
//! `-Z build-std=core` and RUSTFLAGS), so the object it prints is the one the agent embeds, built
//! into the workspace's target directory where it is easy to inspect (llvm-objdump, bpftool).

use std::{
    io::BufReader,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use cargo_metadata::{Artifact, Message};

pub const EBPF_PACKAGE: &str = "nodeport-ebpf";
pub const EBPF_TARGET: &str = "bpfel-unknown-none";

/// The pinned nightly, from the repository's `ebpf-toolchain` file (shared with setup.sh and
/// nodeport-agent/build.rs).
pub fn nightly(root: &Path) -> anyhow::Result<String> {
    let path = root.join("ebpf-toolchain");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let name = text.trim();
    if !name.starts_with("nightly-") || name.contains(char::is_whitespace) {
        bail!(
            "{}: expected one line like nightly-YYYY-MM-DD, found {name:?}",
            path.display()
        );
    }
    Ok(name.to_owned())
}

/// RUSTFLAGS for the BPF target, as aya-build sets them: the `bpf_target_arch` cfg aya-ebpf
/// needs, full debug info, and BTF emitted by bpf-linker (the maps are BTF maps).
pub fn encoded_rustflags() -> String {
    [
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f")
}

/// Builds the eBPF crate's binaries for the BPF target; returns the object's path.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let nightly = nightly(root)?;
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        &nightly,
        "cargo",
        "build",
        "--package",
        EBPF_PACKAGE,
        "--bins",
    ])
    .args(["--release", "--target", EBPF_TARGET, "-Z", "build-std=core"])
    .arg("--message-format=json-render-diagnostics")
    .env("CARGO_ENCODED_RUSTFLAGS", encoded_rustflags())
    .current_dir(root);
    // Whatever toolchain runs xtask must not leak into the nightly build (as in aya-build).
    for var in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    let objects = executables(&mut cmd)?;
    objects
        .into_iter()
        .find(|(name, _)| name == "nodeport")
        .map(|(_, path)| path)
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} produced no `nodeport` binary"))
}

/// Builds the agent with the workspace's own toolchain; returns its binary.
pub fn build_agent(root: &Path) -> anyhow::Result<PathBuf> {
    let [agent] = build_bins(root, [("nodeport-agent", "nodeport-agent")])?;
    Ok(agent)
}

/// Builds what the lab runs, the agent and the pods' echo server; returns (agent, echo).
pub fn build_lab(root: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let [agent, echo] = build_bins(
        root,
        [
            ("nodeport-agent", "nodeport-agent"),
            ("nodeport-lab", "nodeport-echo"),
        ],
    )?;
    Ok((agent, echo))
}

/// Builds `(package, binary)` pairs in one cargo run; returns the binaries' paths in order.
fn build_bins<const N: usize>(
    root: &Path,
    bins: [(&str, &str); N],
) -> anyhow::Result<[PathBuf; N]> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build");
    for (package, bin) in bins {
        cmd.args(["--package", package, "--bin", bin]);
    }
    cmd.arg("--message-format=json-render-diagnostics")
        .current_dir(root);
    let built = executables(&mut cmd)?;
    let mut out = Vec::with_capacity(N);
    for (_, bin) in bins {
        let path = built
            .iter()
            .find(|(n, _)| n == bin)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| anyhow!("the build produced no {bin} binary"))?;
        out.push(path);
    }
    Ok(out.try_into().expect("one path per binary"))
}

/// Runs a cargo build with JSON messages on stdout (diagnostics still go to the terminal) and
/// returns the (target name, path) of every executable it produced.
fn executables(cmd: &mut Command) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut found = Vec::new();
    for message in Message::parse_stream(BufReader::new(stdout)) {
        if let Message::CompilerArtifact(Artifact {
            executable: Some(path),
            target,
            ..
        }) = message.context("reading cargo's JSON messages")?
        {
            found.push((target.name.to_string(), path.into_std_path_buf()));
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn nightly_pin_is_one_line_and_the_only_one() {
        let root = root();
        let nightly = nightly(&root).unwrap();
        // The scripts read the file instead of naming the nightly themselves.
        for script in ["scripts/setup.sh", "scripts/test.sh"] {
            let text = std::fs::read_to_string(root.join(script)).unwrap();
            assert!(
                text.contains("ebpf-toolchain"),
                "{script} does not read ebpf-toolchain"
            );
            assert!(!text.contains(&nightly), "{script} hard-codes {nightly}");
        }
        let build_rs = std::fs::read_to_string(root.join("nodeport-agent/build.rs")).unwrap();
        assert!(build_rs.contains("ebpf-toolchain") && !build_rs.contains(&nightly));
    }

    #[test]
    fn rustflags_match_aya_build() {
        let flags: Vec<_> = encoded_rustflags()
            .split('\x1f')
            .map(str::to_owned)
            .collect();
        assert_eq!(
            flags,
            [
                format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
                "-Cdebuginfo=2".to_owned(),
                "-Clink-arg=--btf".to_owned()
            ]
        );
    }
}
