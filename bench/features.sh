#!/usr/bin/env bash
# Resilience and cache tax: bench/features.sh  (REPS=3 DURATION=5 by default, ~1.5 min)
set -euo pipefail
cd "$(dirname "$0")/.."
bench/install-peers.sh >/dev/null
cargo build --release -q -p sidecar -p control-plane -p mesh-bench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
python3 bench/features.py
