#!/usr/bin/env bash
# The Containerfile's builder: installs the pinned toolchains exactly as scripts/setup.sh does
# (steps 1 and 2), reading the same pins from the same files, so the image can never build with
# other toolchains than the workspace: the stable channel of rust-toolchain.toml, the nightly of
# ebpf-toolchain, and bpf-linker (setup.sh's BPF_LINKER_VERSION) built against that nightly's own
# libLLVM. `--print-pins` only prints the three pins (nodeport-agent/tests/deploy.rs checks them).
set -euo pipefail

ROOT="${1:-.}"
if [[ "$ROOT" == --print-pins ]]; then ROOT="${2:-.}"; PRINT=1; else PRINT=0; fi

STABLE=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")
NIGHTLY=$(tr -d '[:space:]' <"$ROOT/ebpf-toolchain")
BPF_LINKER_VERSION=$(sed -n 's/^BPF_LINKER_VERSION=\([0-9.]*\)$/\1/p' "$ROOT/scripts/setup.sh")
if [[ -z "$STABLE" || "$NIGHTLY" != nightly-* || -z "$BPF_LINKER_VERSION" ]]; then
  echo "cannot read the toolchain pins (rust-toolchain.toml: '$STABLE', ebpf-toolchain: '$NIGHTLY', setup.sh BPF_LINKER_VERSION: '$BPF_LINKER_VERSION')" >&2
  exit 1
fi
if ((PRINT)); then
  printf 'stable=%s\nnightly=%s\nbpf-linker=%s\n' "$STABLE" "$NIGHTLY" "$BPF_LINKER_VERSION"
  exit 0
fi

rustup toolchain install "$STABLE" --profile minimal
rustup toolchain install "$NIGHTLY" --profile minimal -c rust-src
# No system LLVM is as new as the nightly's: link bpf-linker against the nightly's libLLVM.so.
NL="$(rustc +"$NIGHTLY" --print sysroot)/lib"
prefix=$(mktemp -d)
mkdir -p "$prefix/lib"
ln -sf "$(ls "$NL"/libLLVM.so.*-rust-*-nightly | head -n1)" "$prefix/lib/libLLVM.so"
LLVM_PREFIX="$prefix" RUSTFLAGS="-C link-args=-Wl,-rpath,$NL" \
  cargo +"$STABLE" install --locked bpf-linker --version "$BPF_LINKER_VERSION"
rm -rf "$prefix"
