#!/usr/bin/env bash
# Observed topology's cost on the data path: bench/topology.sh  (REPS=3 DURATION=5, ~1 min;
# REPS=7 for the published figures)
set -euo pipefail
exec "$(dirname "$0")/run-python.sh" topology.py
