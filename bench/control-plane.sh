#!/usr/bin/env bash
# Control-plane benchmark: a simulator of N sidecars (discovery watch + policy stream each,
# ACKing every push) against the real control-plane binary over gRPC on loopback.
#
#   bench/control-plane.sh            # N = 1000 and 10000, 3 reps each, plaintext and TLS
#   REPS=1 SIZES="1000" bench/control-plane.sh
#
# Each rep runs the control plane twice, interleaved: with --insecure-api (plaintext) and with
# its default TLS API (the simulator then connects as meshctl does: TLS trusting the mesh root,
# the admin token on every call), so the TLS / plaintext ratios come from the same command.
#
# Method (../shared/design/performance.md): the control plane is pinned to CPU 0 and the
# simulator to CPU 1; an idle-priority spinner keeps each core awake; medians over reps.
# Raw JSON per rep goes to bench/results/, the summary to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
SIZES=${SIZES:-"1000 10000"}

cargo build --release -q -p control-plane -p meshctl -p mesh-bench

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
    for mode in plain tls; do
      flag=(); [ "$mode" = tls ] && flag=(--tls)
      taskset -c 1 target/release/cp-sim --cp-cpu 0 --streams "$n" --connections 32 \
        --instances 10000 --rounds 10 --heartbeat-streams 64 --heartbeat-secs 5 "${flag[@]}" \
        > "$out/control-plane-$mode-n$n-rep$rep.json"
    done
  done
done

python3 - "$out" $SIZES <<'PY'
import json, statistics, sys, glob
out, sizes = sys.argv[1], sys.argv[2:]
def med(runs, k): return statistics.median(r[k] for r in runs)
def load(mode, n): return [json.load(open(f)) for f in sorted(glob.glob(f"{out}/control-plane-{mode}-n{n}-rep*.json"))]
res = {}
print("| API | N sidecars | policy p50 ms | policy p99 ms | worst last ms | discovery p99 ms | bytes/stream | bytes/instance | registrations/s | heartbeats per CPU-s | idle RSS MB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for mode in ("plain", "tls"):
    for n in sizes:
        runs = load(mode, n)
        p50 = statistics.median(statistics.median(r2["p50_ms"] for r2 in r["policy_rounds"]) for r in runs)
        res[mode, n] = {k: med(runs, k) for k in ("policy_p99_ms_median", "heartbeats_per_cpu_sec", "rss_bytes_per_stream", "registrations_per_sec")}
        print(f"| {mode} | {n} | {p50:.1f} | {res[mode, n]['policy_p99_ms_median']:.1f} | {max(r['policy_last_ms_worst'] for r in runs):.1f} | "
              f"{med(runs, 'discovery_p99_ms'):.1f} | {med(runs, 'rss_bytes_per_stream'):.0f} | "
              f"{med(runs, 'rss_bytes_per_instance'):.0f} | {med(runs, 'registrations_per_sec'):.0f} | {med(runs, 'heartbeats_per_cpu_sec'):.0f} | "
              f"{med(runs, 'idle_rss_bytes')/1e6:.1f} |")
print()
for n in sizes:
    t, p = res["tls", n], res["plain", n]
    print(f"N={n}: TLS / plaintext — policy p99 x{t['policy_p99_ms_median']/p['policy_p99_ms_median']:.2f}, "
          f"heartbeats per CPU-s x{t['heartbeats_per_cpu_sec']/p['heartbeats_per_cpu_sec']:.2f}, "
          f"bytes/stream x{t['rss_bytes_per_stream']/p['rss_bytes_per_stream']:.2f}, "
          f"registrations/s x{t['registrations_per_sec']/p['registrations_per_sec']:.2f}")
if len(sizes) == 2:
    a, b = sizes
    for mode in ("plain", "tls"):
        print(f"{mode}: p99(N={b}) / p99(N={a}) = {res[mode, b]['policy_p99_ms_median']/res[mode, a]['policy_p99_ms_median']:.2f}")
PY
