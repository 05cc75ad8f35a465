#!/usr/bin/env python3
"""The cost of tracing on the mesh path, in one run: a gateway (one worker thread, on CPU 0 with
the backend; wrk on CPU 1) in front of the bench backend, with spans off (no exporter) and
exporting over OTLP/gRPC to a collector at a sampling share of 0, 1 % and 100 % (the gateway
service's policy, `tracing.sampling`, set live between runs). Reported: the gateway's CPU per
request and its ratio to spans off (medians of same-rep ratios, interleaved reps), spans the
collector received; then RSS with the collector down (the exporter's endpoint a closed port) at
100 %, before and after two load runs: the queue is bounded, so RSS must level off.
Run through bench/tracing.sh.
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("dp", os.path.join(HERE, "data-plane.py"))
dp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp)

SHARES = {"spans off": None, "sampling 0": 0.0, "sampling 1 %": 0.01, "sampling 100 %": 1.0}


def gateway(cp_url, name, otlp=None):
    args = [f"{dp.REL}/sidecar", "--mode", "gateway", "--instance-id", name, "--control-plane", cp_url,
            "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--worker-threads", "1",
            "--data-dir", os.path.join(dp.TMP, name), "--log", "error", "--access-log", "off", "--route", "/t=traced,/"]
    if otlp:
        args += ["--otlp-endpoint", otlp]
    p, info = dp.start(args)
    return p, info


def set_sampling(cp_url, share, admins):
    path = os.path.join(dp.TMP, "gateway.yaml")
    with open(path, "w") as f:
        f.write(f"tracing:\n  sampling: {share}\n")
    subprocess.run([f"{dp.REL}/meshctl", "--control-plane", cp_url, "policy", "set", "gateway", "-f", path], check=True, capture_output=True)
    for admin in admins:
        for _ in range(200):
            cfg = json.load(urllib.request.urlopen(f"http://{admin}/config"))
            if abs(cfg["tracing"]["sampling"] - share) < 1e-9:
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"gateway {admin} never applied sampling {share}")


def collector_spans(proc, last):
    """The collector's count once it stopped changing (it prints each second while it changes;
    the gateways export every second)."""
    import select
    spans = last
    while select.select([proc.stdout], [], [], 3)[0]:
        line = proc.stdout.readline()
        if not line:
            break
        spans = json.loads(line)["spans"]
    return spans


def backend_behind_a_control_plane():
    """The bench backend registered as service `traced` with a control plane (CPU 1): its URL."""
    _, be = dp.start([f"{dp.REL}/bench-backend", "127.0.0.1:0"])
    _, cp = dp.start([f"{dp.REL}/control-plane", "--insecure-api", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                      "--data-dir", os.path.join(dp.TMP, "cp"), "--log", "error"], cpu=1)
    cp_url = f"http://{cp['grpc']}"
    dp.start([f"{dp.REL}/bench-register", cp_url, "traced", be["http"]], cpu=1)
    return cp_url


def run():
    cp_url = backend_behind_a_control_plane()
    col_p, col = dp.start([f"{dp.REL}/bench-collector"], cpu=1)
    # Export every second (not the default 5 s), so each run's spans are counted with it.
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "1000"
    off_p, off = gateway(cp_url, "gw-off")
    on_p, on = gateway(cp_url, "gw-on", f"http://{col['grpc']}")
    down_p, down = gateway(cp_url, "gw-down", f"http://127.0.0.1:{dp.free_port()}")
    admins = [g["admin"] for g in (off, on, down)]
    for g in (off, on, down):
        dp.wait_http(f"http://{g['outbound']}/t")
    rows = {k: [] for k in SHARES}
    spans = {k: [] for k in SHARES}
    last_spans = 0
    # Warm-up (not counted): connections, allocator and caches of every gateway.
    for g in (off, on):
        dp.wrk(f"http://{g['outbound']}/t", 64, secs=2)
    for rep in range(dp.REPS):
        for name, share in SHARES.items():
            set_sampling(cp_url, 1.0 if share is None else share, admins)
            p, g = (off_p, off) if share is None else (on_p, on)
            c0 = dp.cpu_seconds(p.pid)
            r = dp.wrk(f"http://{g['outbound']}/t", 64)
            r["cpu_us"] = (dp.cpu_seconds(p.pid) - c0) * 1e6 / max(r["requests"], 1)
            rows[name].append(r)
            seen = collector_spans(col_p, last_spans)
            # Two spans per sampled request: the gateway's server span and its attempt.
            expected = 2 * r["requests"] * (share or 0)
            spans[name].append((seen - last_spans) / expected if expected else float(seen - last_spans))
            last_spans = seen
            print(f"rep {rep + 1} {name:15s} {r['rps']:.0f} rps, {r['cpu_us']:.2f} µs CPU/req, errors {r['errors']}", file=sys.stderr)
    med = lambda k, f: statistics.median(r[f] for r in rows[k])
    ratio = lambda a, f: statistics.median(x[f] / y[f] for x, y in zip(rows[a], rows["spans off"]))
    print(f"Reps: {dp.REPS} x {dp.DUR}s, 64 connections, interleaved; medians, ratios of same-rep pairs.\n")
    print("| gateway | rps | CPU µs/req | CPU / spans off | p50 µs | p99 µs | spans received / sampled |")
    print("|---|---|---|---|---|---|---|")
    for k in SHARES:
        print(f"| {k} | {med(k, 'rps'):.0f} | {med(k, 'cpu_us'):.2f} | {ratio(k, 'cpu_us'):.3f} | {med(k, 'p50_us'):.0f} | {med(k, 'p99_us'):.0f} | {statistics.median(spans[k]):.2f} |")
    print(f"\nCPU per request at 1 % / spans off: {ratio('sampling 1 %', 'cpu_us'):.3f} (goal <= 1.05)")
    print(f"CPU per request at 100 % / spans off: {ratio('sampling 100 %', 'cpu_us'):.3f} (goal <= 1.25)")

    # The collector down, everything sampled: the queue is bounded, spans beyond it are dropped.
    set_sampling(cp_url, 1.0, admins)
    url = f"http://{down['outbound']}/t"
    before = dp.rss_mb(down_p.pid)
    first = dp.wrk(url, 64)
    after_one = dp.rss_mb(down_p.pid)
    second = dp.wrk(url, 64)
    after_two = dp.rss_mb(down_p.pid)
    print(f"\nCollector down, sampling 100 %: RSS {before:.1f} MB before, {after_one:.1f} MB after "
          f"{first['requests']} requests, {after_two:.1f} MB after {first['requests'] + second['requests']} "
          f"(errors {first['errors'] + second['errors']})")


if __name__ == "__main__":
    dp.main(run)
