#!/usr/bin/env bash
# The cost of tracing on the mesh path: bench/tracing.sh  (REPS=3 DURATION=5 by default, ~3 min; REPS=5 for the published figures)
set -euo pipefail
exec "$(dirname "$0")/run-python.sh" tracing.py
