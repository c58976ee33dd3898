#!/usr/bin/env bash
# Every test of the project, as CI runs it (.ci/run): setup, formatting, lints for the host crates
# and for the eBPF crate on its BPF target, then all unit and kernel tests. Kernel tests load the
# real programs, so this needs root; without it they fail (they never skip). Exits non-zero on
# the first failing step; within the test step every test binary runs (--no-fail-fast) and each
# test is listed by name.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

NIGHTLY=$(tr -d '[:space:]' <ebpf-toolchain)
# The RUSTFLAGS aya-build uses for the eBPF crate (nodeport-agent/build.rs, cargo xtask build-ebpf).
BPF_RUSTFLAGS=$(printf '%s\x1f%s\x1f%s' "--cfg=bpf_target_arch=\"$(uname -m)\"" -Cdebuginfo=2 -Clink-arg=--btf)

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --all --check"
cargo fmt --all --check

# nodeport-ebpf is a no_std BPF crate: it is linted on its own target below, not for the host.
step "clippy, host crates"
cargo clippy --workspace --exclude nodeport-ebpf --all-targets -- -D warnings

step "clippy, nodeport-ebpf on bpfel-unknown-none ($NIGHTLY)"
CARGO_ENCODED_RUSTFLAGS="$BPF_RUSTFLAGS" \
  cargo +"$NIGHTLY" clippy -p nodeport-ebpf --release --target bpfel-unknown-none -Z build-std=core \
  -- -D warnings

# Every kernel test makes its own namespaces and pin root, so they run in parallel.
step "cargo test (unit and kernel tests)"
cargo test --workspace --exclude nodeport-ebpf --no-fail-fast

step "all tests passed"
