#!/usr/bin/env bash
# Control plane on etcd: the control-plane benchmark's simulator (bench/control-plane.sh) against
# three replicas sharing one etcd, side by side with one control plane on its embedded store.
#
#   bench/control-plane-ha.sh                  # N = 10000 simulated sidecars, 3 reps each
#   REPS=1 N=1000 bench/control-plane-ha.sh
#   REPS=1 N=100000 REPLICAS=1 CONNS=1000 REPORT_ROUNDS=0 bench/control-plane-ha.sh   # the stretch: one replica, 100,000 sidecars (no failover)
#
# Starts its own etcd (one member: on a two-core machine a three-member cluster would only
# measure etcd's own replication on the same cores) and nats-server (the bus --store etcd needs)
# under a temporary directory. The control planes and etcd are pinned to CPU 0, the simulator to
# CPU 1, as in bench/control-plane.sh. The simulator's sidecars spread over the replicas; after
# the policy rounds it SIGKILLs the first replica and times how long each of its sidecars takes
# to be served by another (a 100-200 ms reconnect delay included, as a sidecar's backoff).
# Raw JSON per rep goes to bench/results/, the summary to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
N=${N:-10000}
REPLICAS=${REPLICAS:-3}
# HTTP/2 connections the simulated sidecars share (one more on etcd, so they spread over 3 replicas).
CONNS=${CONNS:-32}
# Topology reports per sidecar (0 skips the phase: at 100,000 sidecars its aggregation outlasts
# the simulator's call timeout on two cores).
REPORT_ROUNDS=${REPORT_ROUNDS:-2}

cargo build --release -q -p control-plane -p mesh-bench
ETCD=$(command -v etcd || echo /usr/bin/etcd)
NATS=$(command -v nats-server || ls /usr/sbin/nats-server /usr/bin/nats-server 2>/dev/null | head -1)
[ -x "$ETCD" ] && [ -x "$NATS" ] || { echo "needs etcd and nats-server: bash scripts/test-deps installs both" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
taskset -c 0 "$ETCD" --name b --data-dir "$work/etcd" --listen-client-urls http://127.0.0.1:23791 \
  --advertise-client-urls http://127.0.0.1:23791 --listen-peer-urls http://127.0.0.1:23801 \
  --initial-advertise-peer-urls http://127.0.0.1:23801 --initial-cluster b=http://127.0.0.1:23801 \
  --quota-backend-bytes 8589934592 > "$work/etcd.log" 2>&1 &
pids+=($!)
taskset -c 0 "$NATS" -a 127.0.0.1 -p 24223 -js -sd "$work/nats" > "$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  curl -sf http://127.0.0.1:23791/health >/dev/null 2>&1 && grep -q "Server is ready" "$work/nats.log" && break
  sleep 0.1
done
for cpu in 0 1; do
  taskset -c "$cpu" chrt -i 0 sh -c 'while :; do :; done' &
  pids+=($!)
done

out=bench/results
mkdir -p "$out"
for rep in $(seq 1 "$REPS"); do
  echo "N=$N rep $rep/$REPS: embedded" >&2
  taskset -c 1 target/release/cp-sim --cp-cpu 0 --streams "$N" --connections "$CONNS" --instances 10000 \
    --rounds 10 --heartbeat-streams 64 --heartbeat-secs 5 --report-rounds "$REPORT_ROUNDS" \
    > "$out/cp-ha-embedded-n$N-rep$rep.json"
  echo "N=$N rep $rep/$REPS: $REPLICAS replicas on etcd" >&2
  taskset -c 1 target/release/cp-sim --cp-cpu 0 --streams "$N" --connections "$((CONNS + 1))" --instances 10000 \
    --rounds 10 --heartbeat-streams 64 --heartbeat-secs 5 --report-rounds "$REPORT_ROUNDS" \
    --replicas "$REPLICAS" --etcd-endpoints http://127.0.0.1:23791 --nats-url nats://127.0.0.1:24223 \
    > "$out/cp-ha-etcd-n$N-rep$rep.json"
done

python3 - "$out" "$N" "$REPLICAS" <<'PY'
import json, statistics, sys, glob
out, n, replicas = sys.argv[1], sys.argv[2], sys.argv[3]
def load(kind): return [json.load(open(f)) for f in sorted(glob.glob(f"{out}/cp-ha-{kind}-n{n}-rep*.json"))]
def med(runs, k): return statistics.median(r[k] for r in runs)
print(f"| store | N sidecars | policy p50 ms | policy p99 ms | worst last ms | discovery p99 ms | registrations/s | heartbeats per CPU-s | failover p50 / p99 / last ms |")
print("|---|---|---|---|---|---|---|---|---|")
for kind, label in (("embedded", "embedded, 1 control plane"), ("etcd", f"etcd, {replicas} replicas")):
    runs = load(kind)
    p50 = statistics.median(statistics.median(x["p50_ms"] for x in r["policy_rounds"]) for r in runs)
    fo = "—" if "failover_p50_ms" not in runs[0] else f"{med(runs, 'failover_p50_ms'):.0f} / {med(runs, 'failover_p99_ms'):.0f} / {max(r['failover_last_ms'] for r in runs):.0f}"
    print(f"| {label} | {n} | {p50:.1f} | {med(runs, 'policy_p99_ms_median'):.1f} | {max(r['policy_last_ms_worst'] for r in runs):.1f} | "
          f"{med(runs, 'discovery_p99_ms'):.1f} | {med(runs, 'registrations_per_sec'):.0f} | {med(runs, 'heartbeats_per_cpu_sec'):.0f} | {fo} |")
e, h = load("embedded"), load("etcd")
print()
print(f"etcd / embedded: policy p99 x{med(h, 'policy_p99_ms_median')/med(e, 'policy_p99_ms_median'):.2f}, "
      f"registrations/s x{med(h, 'registrations_per_sec')/med(e, 'registrations_per_sec'):.2f}, "
      f"heartbeats per CPU-s x{med(h, 'heartbeats_per_cpu_sec')/med(e, 'heartbeats_per_cpu_sec'):.2f}")
PY
