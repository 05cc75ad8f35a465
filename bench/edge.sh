#!/usr/bin/env bash
# The public edge against nginx with the same features: bench/edge.sh  (REPS=3 DURATION=5, ~3 min)
set -euo pipefail
exec "$(dirname "$0")/run-python.sh" edge.py
