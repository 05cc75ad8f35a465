#!/usr/bin/env bash
# The cost of writev(2) against write(2)/send(2) for one small write over loopback TCP, on CPU 0
# (the figure behind sidecar/src/net.rs): bench/writev.sh [calls per round, 20000]
set -euo pipefail
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
gcc -O2 -o "$out/writev" "$(dirname "$0")/writev.c"
for run in 1 2 3; do
    echo "run $run"
    taskset -c 0 "$out/writev" "${1:-20000}"
done
