#!/usr/bin/env bash
# Evidence run (issue #6): the bus (the control plane) is down for OUTAGE seconds while an app
# publishes RATE events/s through its sidecar; a second sidecar delivers them to a webhook.
#
#   bench/events-outage.sh                        # 60 s outage at 200 events/s
#   OUTAGE=10 RATE=100 bench/events-outage.sh
#
# Timeline: publishing runs for BEFORE + OUTAGE + AFTER seconds at a steady rate; the control
# plane is SIGKILLed BEFORE seconds in and restarted (same data dir) OUTAGE seconds later.
# Reported: events accepted (202) and delivered, lost, duplicates in the bus and at the app, keys
# out of order, and the drain time: from the restart until the last event published before it
# (the backlog) reached the webhook.
# Negative control: the same outage for an app publishing straight to the bus (no spool) —
# every event published while the bus is down is lost.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTAGE=${OUTAGE:-60} RATE=${RATE:-200} BEFORE=${BEFORE:-10} AFTER=${AFTER:-10}
. bench/lib.sh
out=bench/results
mkdir -p "$out"
CP=127.0.0.1:17670 HOOK=127.0.0.1:17680 PUB=127.0.0.1:17691 SUB=127.0.0.1:17692
start_cp() { # (its stderr is kept in $T/cp.log; `Killed` notices below are the planned SIGKILLs)
  "$R/control-plane" --insecure-api --grpc-addr $CP --admin-addr 127.0.0.1:17671 --data-dir "$T/cp" --log warn \
    --restart-grace 120s >/dev/null 2>>"$T/cp.log" &
  cp_pid=$!
  pids+=($cp_pid)
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:17671/healthz >/dev/null && break; sleep 0.1; done
}
start_cp
printf 'health: { probe_interval: 100ms, probe_timeout: 100ms, healthy_threshold: 1 }\n' > "$T/sub.yaml"
"$R/meshctl" --control-plane "http://$CP" policy set bench-sub -f "$T/sub.yaml" >/dev/null
sidecar() { # name admin [extra...]
  local name=$1 admin=$2; shift 2
  "$R/sidecar" --service "$name" --instance-id "$name-1" --app-addr $HOOK --control-plane "http://$CP" \
    --inbound-addr 127.0.0.1:0 --outbound-addr 127.0.0.1:0 --admin-addr "$admin" \
    --data-dir "$T/$name" --log warn "$@" >/dev/null 2>>"$T/$name.log" &
  pids+=($!)
}
sidecar bench-pub $PUB
sidecar bench-sub $SUB --subscribe outage=/hook
for a in $PUB $SUB; do
  for _ in $(seq 1 100); do curl -sf "http://$a/live" >/dev/null && break; sleep 0.1; done
done

run() { # label extra-args...
  local label=$1; shift
  local total=$(( RATE * (BEFORE + OUTAGE + AFTER) ))
  "$R/bench-events" --hook $HOOK --wait-healthy $SUB --topic outage --events "$total" --rate "$RATE" \
    --concurrency 4 --wait-delivery 300s --dump "$T/times-$label.txt" "$@" > "$T/$label.json" &
  local bench=$!
  sleep "$BEFORE"
  kill -9 "$cp_pid"
  echo "$label: control plane killed; down for ${OUTAGE}s" >&2
  sleep "$OUTAGE"
  restart_ms=$(date +%s%3N)
  start_cp
  echo "$label: control plane restarted" >&2
  wait "$bench"
  "$R/meshctl" --control-plane "http://$CP" events replay outage --from-offset 0 --limit 10000 -o json > "$T/bus-$label.json" || true
  local more=10000
  while [ "$(wc -l < "$T/bus-$label.json")" -ge "$more" ]; do
    "$R/meshctl" --control-plane "http://$CP" events replay outage --from-offset "$more" --limit 10000 -o json >> "$T/bus-$label.json"
    more=$(( more + 10000 ))
  done
  python3 - "$T/$label.json" "$T/bus-$label.json" "$restart_ms" "$label" "$T/times-$label.txt" > "$out/events-outage-$label.json" <<'PY'
import json, sys, collections
r = json.load(open(sys.argv[1]))
bus = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
ids = [e["id"] for e in bus]
r["label"] = sys.argv[4]
r["bus_events"] = len(ids)
r["bus_duplicates"] = len(ids) - len(set(ids))
restart_us = int(sys.argv[3]) * 1000
times = [tuple(map(int, l.split())) for l in open(sys.argv[5]) if l.strip()]
# The backlog: events published before the restart; drained when the last of them arrived.
backlog = [at for sent, at in times if sent < restart_us]
r["backlog_events"] = len(backlog)
r["drain_seconds_after_restart"] = max(0, max(backlog, default=restart_us) - restart_us) / 1e6
print(json.dumps(r))
PY
  echo "$label: $(cat "$out/events-outage-$label.json")" >&2
}
run spool --publish $PUB --id-prefix spool
# Negative control: no spool (the bus is published to directly); a fresh id prefix.
run direct --direct-bus "http://$CP" --id-prefix direct

python3 - "$out" "$OUTAGE" "$RATE" <<'PY'
import json, sys
out, outage, rate = sys.argv[1:]
for label in ["spool", "direct"]:
    r = json.load(open(f"{out}/events-outage-{label}.json"))
    what = "through the sidecar spool" if label == "spool" else "negative control, straight to the bus"
    print(f"{outage}s bus outage at {rate} events/s, {what}: published {r['events']}, accepted {r['accepted']}, "
          f"delivered {r.get('delivered')}, lost {r['events'] - r.get('delivered', 0)}, "
          f"duplicates in the bus {r['bus_duplicates']}, duplicate deliveries {r.get('duplicates_delivered')}, "
          f"keys out of order {r.get('keys_out_of_order')}"
          + (f", backlog of {r['backlog_events']} drained {r['drain_seconds_after_restart']:.1f}s after the restart" if label == "spool" else ""))
PY
