#!/usr/bin/env bash
# What every Python benchmark needs first: the peers (wrk, nginx, HAProxy, h2load) installed,
# the release binaries built, the file-descriptor limit raised; then bench/<script> runs.
#   bench/run-python.sh mtls.py      (each bench/<name>.sh calls this with its script)
set -euo pipefail
cd "$(dirname "$0")/.."
bench/install-peers.sh >/dev/null
cargo build --release -q -p sidecar -p control-plane -p meshctl -p mesh-bench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 "bench/$1"
