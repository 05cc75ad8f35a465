#!/usr/bin/env bash
# Event latency, publish → webhook, at steady rates (10 s each, 4 publishers), through the
# publishing sidecar's spool and — for comparison — straight to the bus (the same subscriber).
#   bench/events-latency.sh                  # RATES="300 500 700 1000", DIRECT="1000"
# Used to locate the latency knee noted in BENCHMARKS.md (events section).
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${RATES:-"300 500 700 1000"} DIRECT=${DIRECT:-"1000"}
. bench/lib.sh
CP=127.0.0.1:17870 HOOK=127.0.0.1:17880 PUB=127.0.0.1:17891 SUB=127.0.0.1:17892
"$R/control-plane" --insecure-api --grpc-addr $CP --admin-addr 127.0.0.1:17871 --data-dir "$T/cp" --log warn >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:17871/healthz >/dev/null && break; sleep 0.1; done
printf 'health: { probe_interval: 100ms, probe_timeout: 100ms, healthy_threshold: 1 }\n' > "$T/sub.yaml"
"$R/meshctl" --control-plane "http://$CP" policy set bench-sub -f "$T/sub.yaml" >/dev/null
for s in "bench-pub $PUB" "bench-sub $SUB --subscribe bench=/hook"; do
  set -- $s
  name=$1 admin=$2; shift 2
  "$R/sidecar" --service "$name" --instance-id "$name-1" --app-addr $HOOK --control-plane "http://$CP" \
    --inbound-addr 127.0.0.1:0 --outbound-addr 127.0.0.1:0 --admin-addr "$admin" \
    --data-dir "$T/$name" --log warn "$@" >/dev/null 2>&1 &
  pids+=($!)
done
latency() { # label rate publish-args...
  local label=$1 rate=$2; shift 2
  "$R/bench-events" --hook $HOOK --wait-healthy $SUB --topic bench --events $((rate * 10)) \
    --concurrency 4 --rate "$rate" --wait-delivery 60s "$@" |
    python3 -c "import json,sys; r=json.load(sys.stdin); print(f'$label {$rate:>5}/s: p50 {r[\"delivery_p50_ms\"]:.2f} ms, p99 {r[\"delivery_p99_ms\"]:.2f} ms, lost {r[\"lost\"]}')"
}
for rate in $RATES; do latency "through the spool" "$rate" --publish $PUB; done
for rate in $DIRECT; do latency "straight to the bus" "$rate" --direct-bus "http://$CP"; done
