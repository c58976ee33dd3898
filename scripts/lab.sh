#!/usr/bin/env bash
# The lab: a kind-like cluster (a control plane and two workers) in network namespaces, one
# nodeport-agent per node, the shipped workloads (lab/workloads) as pods, and a report of what the
# dataplane does with requests from a client outside the cluster. It leaves the lab running and
# says how to curl it and how to tear it down (`cargo xtask lab down`). Arguments go to
# `cargo xtask lab` (e.g. `--requests 1000`, or `down`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

exec cargo xtask lab "$@"
