#!/usr/bin/env bash
# Resilience and cache tax: bench/features.sh  (REPS=3 DURATION=5 by default, ~1.5 min)
set -euo pipefail
exec "$(dirname "$0")/run-python.sh" features.py
