#!/usr/bin/env bash
# mTLS cost: our sidecar pair in plaintext vs mutual TLS, against two chained HAProxies in
# plaintext vs TLS with client certificates, and full handshakes per second (issue #7).
#   bench/mtls.sh                  # 3 reps x 5 s (~3 min)
#   REPS=1 DURATION=2 bench/mtls.sh
set -euo pipefail
exec "$(dirname "$0")/run-python.sh" mtls.py
