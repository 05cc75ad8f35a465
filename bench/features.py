#!/usr/bin/env python3
"""Resilience and cache tax, one gateway, three routes to the same backend:
  /off    — breaker, concurrency limit and retries off, no cache
  /on     — defaults (breaker, limit 1024, 3 attempts under a 20 % budget) + a cache policy whose
            prefix never matches: everything checked, nothing triggered
  /cached — cache on for every path (60 s): hits after the first request
Cache miss vs hit: /cached with `Cache-Control: no-cache` (bypass: a miss every time) vs without.
Same method as data-plane.py (proxy and backend on CPU 0, wrk on CPU 1, spinners, interleaved
reps, medians). Run through bench/features.sh.
"""
import importlib.util
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("dp", os.path.join(HERE, "data-plane.py"))
dp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp)

POLICIES = {
    "plain-off": "circuit_breaker:\n  consecutive_failures: 0\n  failure_rate_percent: 0\n  max_concurrent_requests: 0\nretry:\n  max_attempts: 1\n",
    "plain-on": "cache:\n  ttl: 60s\n  path_prefixes: [/never]\n",
    "cached": "cache:\n  ttl: 60s\n",
}


def wrk_h(url, header=None):
    args = ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{dp.DUR}s", "--latency"]
    if header:
        args += ["-H", header]
    r = subprocess.run(args + [url], capture_output=True, text=True)
    return dp.parse_wrk(r.stdout)


def run():
    _, be = dp.start([f"{dp.REL}/bench-backend", "127.0.0.1:0"])
    _, cp = dp.start([f"{dp.REL}/control-plane", "--insecure-api", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                      "--data-dir", os.path.join(dp.TMP, "cp"), "--log", "error"], cpu=1)
    cp_url = f"http://{cp['grpc']}"
    for svc, yaml in POLICIES.items():
        path = os.path.join(dp.TMP, f"{svc}.yaml")
        with open(path, "w") as f:
            f.write(yaml)
        subprocess.run([f"{dp.REL}/meshctl", "--control-plane", cp_url, "policy", "set", svc, "-f", path], check=True, capture_output=True)
        dp.start([f"{dp.REL}/bench-register", cp_url, svc, be["http"]], cpu=1)
    gw_p, gw = dp.start([f"{dp.REL}/sidecar", "--mode", "gateway", "--instance-id", "gw", "--control-plane", cp_url,
                         "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--worker-threads", "1",
                         "--data-dir", os.path.join(dp.TMP, "gw"), "--log", "error",
                         "--route", "/off=plain-off,/", "--route", "/on=plain-on,/", "--route", "/cached=cached,/"])
    base = f"http://{gw['outbound']}"
    for p in ("/off", "/on", "/cached"):
        dp.wait_http(base + p)
    targets = {"off": (base + "/off", None), "on": (base + "/on", None),
               "cache miss": (base + "/cached", "Cache-Control: no-cache"), "cache hit": (base + "/cached", None)}
    rows = {k: [] for k in targets}
    for rep in range(dp.REPS):
        for name, (url, header) in targets.items():
            c0 = dp.cpu_seconds(gw_p.pid)
            r = wrk_h(url, header)
            r["cpu_us"] = (dp.cpu_seconds(gw_p.pid) - c0) * 1e6 / max(r["requests"], 1)
            rows[name].append(r)
            print(f"rep {rep + 1} {name:10s} {r['rps']:.0f} rps, {r['cpu_us']:.1f} µs CPU/req, errors {r['errors']}", file=sys.stderr)
    med = lambda k, f: statistics.median(r[f] for r in rows[k])
    ratio = lambda a, b, f: statistics.median(x[f] / y[f] for x, y in zip(rows[a], rows[b]))
    print(f"Reps: {dp.REPS} x {dp.DUR}s, 64 connections, interleaved; medians of same-rep ratios.\n")
    print("| route | rps | proxy CPU µs/req | p50 µs | p99 µs |")
    print("|---|---|---|---|---|")
    for k in targets:
        print(f"| {k} | {med(k, 'rps'):.0f} | {med(k, 'cpu_us'):.1f} | {med(k, 'p50_us'):.0f} | {med(k, 'p99_us'):.0f} |")
    print(f"\nCPU per request, everything on (nothing triggered) / off: {ratio('on', 'off', 'cpu_us'):.2f} (goal <= 1.15)")
    print(f"p50, on / off: {ratio('on', 'off', 'p50_us'):.2f}")
    print(f"Throughput, cache hit / miss: {ratio('cache hit', 'cache miss', 'rps'):.2f} (goal >= 2)")


if __name__ == "__main__":
    dp.main(run)
