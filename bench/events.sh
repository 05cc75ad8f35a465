#!/usr/bin/env bash
# Event path benchmark: app → sidecar spool (fsync) → control-plane bus → subscriber sidecar →
# webhook, all release binaries on loopback.
#
#   bench/events.sh                 # spool append (group commit) + end to end, 3 reps
#   REPS=1 bench/events.sh
#   BUS=nats NATS_URL=nats://127.0.0.1:24222 bench/events.sh   # the bus on NATS JetStream
#
# Spool append: events/s accepted (202 = fsync'd) by one sidecar at 1 and 16 concurrent
# publishers, 1 and 10 events per request, and events per group commit (fsync), read from the
# sidecar's mesh_sidecar_spool_commits. End to end: 20,000 events published by 16 publishers
# (one key each, in order), 10 per request; events/s from the first publish to the last
# delivery; then latency publish → webhook at a steady 100 and 1,000 events/s. Everything shares the machine's two cores (no pinning: four processes).
# Raw JSON per run goes to bench/results/, the summary to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
BUS=${BUS:-embedded}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
. bench/lib.sh
out=bench/results
mkdir -p "$out"

CP=127.0.0.1:17570 HOOK=127.0.0.1:17580 PUB=127.0.0.1:17591 SUB=127.0.0.1:17592
"$R/control-plane" --insecure-api --grpc-addr $CP --admin-addr 127.0.0.1:17571 --data-dir "$T/cp" --log warn \
  --bus "$BUS" --nats-url "$NATS_URL" >/dev/null &
pids+=($!)
sidecar() { # name admin [extra...]
  local name=$1 admin=$2; shift 2
  "$R/sidecar" --service "$name" --instance-id "$name-1" --app-addr $HOOK --control-plane "http://$CP" \
    --inbound-addr 127.0.0.1:0 --outbound-addr 127.0.0.1:0 --admin-addr "$admin" \
    --data-dir "$T/$name" --log warn "$@" >/dev/null &
  pids+=($!)
}
# The subscriber probes its app (the hook) every 100 ms, so delivery starts as soon as a run's
# hook is up.
printf 'health: { probe_interval: 100ms, probe_timeout: 100ms, healthy_threshold: 1 }\n' > "$T/sub.yaml"
for _ in $(seq 1 100); do "$R/meshctl" --control-plane "http://$CP" policy set bench-sub -f "$T/sub.yaml" >/dev/null 2>&1 && break; sleep 0.1; done
sidecar bench-pub $PUB
sidecar bench-sub $SUB --subscribe bench=/hook
for a in $PUB $SUB; do
  for _ in $(seq 1 100); do curl -sf "http://$a/live" >/dev/null && break; sleep 0.1; done
done
commits() { curl -s "http://$PUB/metrics" | awk '/^mesh_sidecar_spool_commits /{print $2}'; }

for rep in $(seq 1 "$REPS"); do
  for cfg in "1 1" "16 1" "16 10"; do
    set -- $cfg
    c0=$(commits)
    # A topic nobody subscribes to: only the append path (and the forwarder) run.
    "$R/bench-events" --hook 127.0.0.1:0 --publish $PUB --topic spool-bench --events 5000 \
      --concurrency "$1" --batch "$2" > "$T/run.json"
    c1=$(commits)
    python3 - "$T/run.json" "$c0" "$c1" > "$out/events-spool-c$1-b$2-rep$rep.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); r["commits"] = int(sys.argv[3]) - int(sys.argv[2])
r["events_per_commit"] = r["accepted"] / max(r["commits"], 1); print(json.dumps(r))
PY
    echo "rep $rep spool c=$1 b=$2: $(cat "$out/events-spool-c$1-b$2-rep$rep.json")" >&2
  done
  # End to end; the hook is the subscriber sidecar's app.
  "$R/bench-events" --hook $HOOK --wait-healthy $SUB --publish $PUB --topic bench --events 20000 \
    --concurrency 16 --batch 10 --wait-delivery 300s > "$out/events-e2e-rep$rep.json"
  echo "rep $rep e2e: $(cat "$out/events-e2e-rep$rep.json")" >&2
  # Latency at steady rates below capacity (10 s each).
  for rate in 100 1000; do
    "$R/bench-events" --hook $HOOK --wait-healthy $SUB --publish $PUB --topic bench \
      --events $((rate * 10)) --concurrency 4 --rate $rate --wait-delivery 120s \
      > "$out/events-steady$rate-rep$rep.json"
    echo "rep $rep steady $rate/s: $(cat "$out/events-steady$rate-rep$rep.json")" >&2
  done
done

python3 - "$out" "$REPS" "$BUS" <<'PY'
import json, statistics, sys
out, reps, bus = sys.argv[1], int(sys.argv[2]), sys.argv[3]
load = lambda name: [json.load(open(f"{out}/{name}-rep{r}.json")) for r in range(1, reps + 1)]
med = lambda runs, k: statistics.median(r[k] for r in runs)
print(f"bus: {bus}, medians of {reps} reps")
print("spool append (202 after fsync):")
for c, b in [(1, 1), (16, 1), (16, 10)]:
    runs = load(f"events-spool-c{c}-b{b}")
    print(f"  {c:>2} publishers x {b:>2} events/request: {med(runs, 'accepted_per_second'):8.0f} events/s, "
          f"{med(runs, 'events_per_commit'):5.1f} events per fsync, p50 {med(runs, 'publish_p50_us')/1000:.2f} ms, "
          f"p99 {med(runs, 'publish_p99_us')/1000:.2f} ms")
runs = load("events-e2e")
print(f"end to end (20000 events, 16 x 10): {med(runs, 'end_to_end_per_second'):.0f} events/s delivered, "
      f"latency p50 {med(runs, 'delivery_p50_ms'):.1f} ms p99 {med(runs, 'delivery_p99_ms'):.1f} ms, "
      f"lost {max(r['lost'] for r in runs)}, keys out of order {max(r['keys_out_of_order'] for r in runs)}, "
      f"duplicates delivered {max(r['duplicates_delivered'] for r in runs)}")
for rate in [100, 1000]:
    runs = load(f"events-steady{rate}")
    print(f"steady {rate} events/s (10 s, 4 publishers): latency publish -> webhook p50 {med(runs, 'delivery_p50_ms'):.1f} ms "
          f"p99 {med(runs, 'delivery_p99_ms'):.1f} ms, lost {max(r['lost'] for r in runs)}, "
          f"keys out of order {max(r['keys_out_of_order'] for r in runs)}")
PY
