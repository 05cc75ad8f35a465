#!/usr/bin/env bash
# mTLS cost: our sidecar pair in plaintext vs mutual TLS, against two chained HAProxies in
# plaintext vs TLS with client certificates, and full handshakes per second (issue #7).
#   bench/mtls.sh                  # 3 reps x 5 s (~3 min)
#   REPS=1 DURATION=2 bench/mtls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bench/install-peers.sh >/dev/null
cargo build --release -q -p sidecar -p control-plane -p mesh-bench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 bench/mtls.py
