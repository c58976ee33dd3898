#!/usr/bin/env bash
# The lab: a NodePort service served through the XDP dataplane between network namespaces.
# It lands with its own issue (issue 5); until then this prepares the machine and says so.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

cat >&2 <<'MSG'

the lab is not built yet (issue 5).

What works today: `bash scripts/test.sh` runs every test, and
`cargo xtask load --iface IF` loads the dataplane on an interface (see README.md).
MSG
exit 1
