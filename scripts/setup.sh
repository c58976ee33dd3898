#!/usr/bin/env bash
# Brings a fresh machine of this project's kind to a working state, idempotently.
# Called by both README commands (scripts/lab.sh and scripts/test.sh). A second run takes seconds:
# every step checks before it acts and reports only what it installs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The stable toolchain is the channel of rust-toolchain.toml; the eBPF nightly is the one line of
# ebpf-toolchain, which nodeport-agent/build.rs and xtask read too: one pin, three readers.
STABLE=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")
NIGHTLY=$(tr -d '[:space:]' <"$ROOT/ebpf-toolchain")
BPF_LINKER_VERSION=0.13.0
if [[ -z "$STABLE" || "$NIGHTLY" != nightly-* ]]; then
  echo "[setup] cannot read the toolchain pins (rust-toolchain.toml: '$STABLE', ebpf-toolchain: '$NIGHTLY')" >&2
  exit 1
fi
APT_PACKAGES=(iproute2 bpftool iptables nftables curl ethtool tcpdump socat iperf3 wrk)

say() { printf '[setup] %s\n' "$*"; }

# `cmd | grep -q` is wrong under pipefail: grep -q exits at the first match, cmd may then die of
# SIGPIPE, and the pipeline "fails" although it matched (the likely cause of one spurious
# bpf-linker rebuild; on `mount` it could stack a second bpffs over the pins). has PATTERN reads
# all of its input instead.
has() { grep -e "$1" >/dev/null; }

export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v rustup >/dev/null 2>&1; then
  say "rustup is missing: this machine kind ships it; install rustup first" >&2
  exit 1
fi

# 1. Pinned toolchains, installed explicitly (RUSTUP_AUTO_INSTALL may be 0).
installed_toolchains=$(rustup toolchain list)
if ! has "^$STABLE" <<<"$installed_toolchains"; then
  say "installing Rust $STABLE (clippy, rustfmt)"
  rustup toolchain install "$STABLE" --profile minimal -c clippy -c rustfmt
fi
if ! has "^$NIGHTLY" <<<"$installed_toolchains"; then
  say "installing Rust $NIGHTLY (rust-src, clippy, rustfmt)"
  rustup toolchain install "$NIGHTLY" --profile minimal -c rust-src -c clippy -c rustfmt
fi
# Components may be missing on a toolchain someone else installed.
for spec in "$STABLE:clippy" "$STABLE:rustfmt" "$NIGHTLY:rust-src" "$NIGHTLY:clippy" "$NIGHTLY:rustfmt"; do
  tc=${spec%%:*} comp=${spec##*:}
  if ! rustup component list --toolchain "$tc" --installed 2>/dev/null | has "^$comp"; then
    say "adding component $comp to $tc"
    rustup component add --toolchain "$tc" "$comp"
  fi
done

# 2. bpf-linker, linked against the pinned nightly's own libLLVM (no system LLVM is new enough).
NL="$(rustc +"$NIGHTLY" --print sysroot)/lib"
linker_ok() {
  command -v bpf-linker >/dev/null 2>&1 &&
    bpf-linker --version 2>/dev/null | has "$BPF_LINKER_VERSION" &&
    ldd "$(command -v bpf-linker)" 2>/dev/null | has "$NL"
}
if ! linker_ok; then
  say "building bpf-linker $BPF_LINKER_VERSION against $NIGHTLY's libLLVM (about a minute)"
  prefix=$(mktemp -d /tmp/llvm-prefix.XXXXXX)
  mkdir -p "$prefix/lib"
  ln -sf "$(ls "$NL"/libLLVM.so.*-rust-*-nightly | head -n1)" "$prefix/lib/libLLVM.so"
  LLVM_PREFIX="$prefix" RUSTFLAGS="-C link-args=-Wl,-rpath,$NL" \
    cargo +"$STABLE" install --locked --force bpf-linker --version "$BPF_LINKER_VERSION"
  rm -rf "$prefix"
fi

# 3. Debian packages the tests and tools use.
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | has "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 4. bpffs, where the agent and `cargo xtask load` pin programs and maps.
if ! mount | has ' on /sys/fs/bpf type bpf'; then
  say "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

say "ready: Rust $STABLE + $NIGHTLY, bpf-linker $BPF_LINKER_VERSION, packages, bpffs"
