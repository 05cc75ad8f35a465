#!/usr/bin/env bash
# Sidecar builds side by side on the mesh path (plaintext and mTLS) against two chained
# HAProxies, in one run (see bench/variants.py).
#   bench/variants.sh                                   # this tree's sidecar only
#   VARIANTS="before=/tmp/old/sidecar,after=target/release/sidecar" bench/variants.sh
# An older commit's sidecar: git worktree add /tmp/old <rev> &&
#   (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target cargo build --release -p sidecar)
set -euo pipefail
exec "$(dirname "$0")/run-python.sh" variants.py
