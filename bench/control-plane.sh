#!/usr/bin/env bash
# Control-plane benchmark: a simulator of N sidecars (discovery watch + policy stream each,
# ACKing every push) against the real control-plane binary over gRPC on loopback.
#
#   bench/control-plane.sh            # N = 1000 and 10000, 3 reps each
#   REPS=1 SIZES="1000" bench/control-plane.sh
#
# Method (../shared/design/performance.md): the control plane is pinned to CPU 0 and the
# simulator to CPU 1; an idle-priority spinner keeps each core awake; medians over reps.
# Raw JSON per rep goes to bench/results/, the summary to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
SIZES=${SIZES:-"1000 10000"}

cargo build --release -q -p control-plane -p mesh-bench

spinners=()
for cpu in 0 1; do
  taskset -c "$cpu" chrt -i 0 sh -c 'while :; do :; done' &
  spinners+=($!)
done
trap 'kill "${spinners[@]}" 2>/dev/null || true' EXIT

out=bench/results
mkdir -p "$out"
for n in $SIZES; do
  for rep in $(seq 1 "$REPS"); do
    echo "N=$n rep $rep/$REPS" >&2
    taskset -c 1 target/release/cp-sim --cp-cpu 0 --streams "$n" --connections 32 \
      --instances 10000 --rounds 10 --heartbeat-streams 64 --heartbeat-secs 5 \
      > "$out/control-plane-n$n-rep$rep.json"
  done
done

python3 - "$out" $SIZES <<'PY'
import json, statistics, sys, glob
out, sizes = sys.argv[1], sys.argv[2:]
def med(runs, k): return statistics.median(r[k] for r in runs)
res = {}
print("| N sidecars | policy p50 ms | policy p99 ms | worst last ms | discovery p99 ms | bytes/stream | bytes/instance | heartbeats per CPU-s | idle RSS MB |")
print("|---|---|---|---|---|---|---|---|---|")
for n in sizes:
    runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/control-plane-n{n}-rep*.json"))]
    p50 = statistics.median(statistics.median(r2["p50_ms"] for r2 in r["policy_rounds"]) for r in runs)
    res[n] = med(runs, "policy_p99_ms_median")
    print(f"| {n} | {p50:.1f} | {res[n]:.1f} | {max(r['policy_last_ms_worst'] for r in runs):.1f} | "
          f"{med(runs, 'discovery_p99_ms'):.1f} | {med(runs, 'rss_bytes_per_stream'):.0f} | "
          f"{med(runs, 'rss_bytes_per_instance'):.0f} | {med(runs, 'heartbeats_per_cpu_sec'):.0f} | "
          f"{med(runs, 'idle_rss_bytes')/1e6:.1f} |")
if len(sizes) == 2:
    a, b = sizes
    print(f"\np99(N={b}) / p99(N={a}) = {res[b]/res[a]:.2f}")
PY
