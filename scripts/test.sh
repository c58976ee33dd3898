#!/usr/bin/env bash
# Every test of the project, as CI runs it (.ci/run): setup, formatting, lints for the host crates
# and for the eBPF crate on its BPF target, then all unit and kernel tests. Kernel tests load the
# real programs, so this needs root; without it they fail (they never skip). Every test is listed
# by name; the exit status is non-zero if anything failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

NIGHTLY=$(tr -d '[:space:]' <ebpf-toolchain)
# The RUSTFLAGS aya-build uses for the eBPF crate (nodeport-agent/build.rs, cargo xtask build-ebpf).
BPF_RUSTFLAGS=$(printf '%s\x1f%s\x1f%s' "--cfg=bpf_target_arch=\"$(uname -m)\"" -Cdebuginfo=2 -Clink-arg=--btf)

# Every step runs even after one fails, so one CI run reports everything; the script exits 1 at
# the end if any step failed.
failed=()
step() {
  local name=$1
  shift
  printf '\n==> %s\n' "$name"
  if ! "$@"; then
    failed+=("$name")
    printf '==> FAILED: %s\n' "$name"
  fi
}

step "cargo fmt --all --check" cargo fmt --all --check

# nodeport-ebpf is a no_std BPF crate: it is linted on its own target below, not for the host
# (its panic handler clashes with std's).
step "clippy, host crates" \
  cargo clippy --workspace --exclude nodeport-ebpf --all-targets -- -D warnings

step "clippy, nodeport-ebpf on bpfel-unknown-none ($NIGHTLY)" \
  env CARGO_ENCODED_RUSTFLAGS="$BPF_RUSTFLAGS" \
  cargo +"$NIGHTLY" clippy -p nodeport-ebpf --release --target bpfel-unknown-none -Z build-std=core \
  -- -D warnings

# Every kernel test makes its own namespaces and pin root, so test threads run in parallel.
step "cargo test (unit and kernel tests)" \
  cargo test --workspace --exclude nodeport-ebpf --no-fail-fast

if ((${#failed[@]})); then
  printf '\n==> %d step(s) failed:\n' "${#failed[@]}"
  printf '    %s\n' "${failed[@]}"
  exit 1
fi
printf '\n==> all steps passed\n'
