#!/usr/bin/env bash
# Data-plane benchmark: direct vs our sidecar vs nginx vs HAProxy, and the two-hop mesh path.
#   bench/data-plane.sh                  # 3 reps x 5 s per target (~8 min)
#   REPS=1 DURATION=2 bench/data-plane.sh
# Installs the peers (wrk, nginx-light, haproxy, h2load) with apt when missing (root).
set -euo pipefail
exec "$(dirname "$0")/run-python.sh" data-plane.py
