#!/usr/bin/env python3
"""Observed topology's cost on the data path, in one run: two gateways (one worker thread each,
CPU 0 with the backend; wrk on CPU 1) in front of the bench backend — one counting every call
for its edge reports (the default, reporting every 10 s), one with --edge-report-interval 0 (no
counting, no reports) — interleaved reps, CPU per request of each and the ratio of same-rep
pairs. Run through bench/topology.sh. The control plane's side (1,000 sidecars' reports) is
cp-sim's topology phase (bench/control-plane.sh).
"""
import importlib.util
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("tracing", os.path.join(HERE, "tracing.py"))
tracing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tracing)
# One copy of data-plane.py: the processes tracing's helpers start are in the list dp.main kills.
dp = tracing.dp


def run():
    cp_url = tracing.backend_behind_a_control_plane()
    os.environ["MESH_EDGE_REPORT_INTERVAL"] = "0"
    off_p, off = tracing.gateway(cp_url, "gw-off")
    os.environ["MESH_EDGE_REPORT_INTERVAL"] = "10s"
    on_p, on = tracing.gateway(cp_url, "gw-on")
    for g in (off, on):
        dp.wait_http(f"http://{g['outbound']}/t")
        dp.wrk(f"http://{g['outbound']}/t", 64, secs=2)
    rows = {"reporting off": [], "reporting on": []}
    for rep in range(dp.REPS):
        for name, (p, g) in (("reporting off", (off_p, off)), ("reporting on", (on_p, on))):
            c0 = dp.cpu_seconds(p.pid)
            r = dp.wrk(f"http://{g['outbound']}/t", 64)
            r["cpu_us"] = (dp.cpu_seconds(p.pid) - c0) * 1e6 / max(r["requests"], 1)
            rows[name].append(r)
            print(f"rep {rep + 1} {name:14s} {r['rps']:.0f} rps, {r['cpu_us']:.2f} µs CPU/req, errors {r['errors']}", file=sys.stderr)
    med = lambda k, f: statistics.median(r[f] for r in rows[k])
    ratio = statistics.median(x["cpu_us"] / y["cpu_us"] for x, y in zip(rows["reporting on"], rows["reporting off"]))
    print(f"Reps: {dp.REPS} x {dp.DUR}s, 64 connections, interleaved; medians, ratio of same-rep pairs.\n")
    print("| gateway | rps | CPU µs/req | p50 µs | p99 µs |")
    print("|---|---|---|---|---|")
    for k in rows:
        print(f"| {k} | {med(k, 'rps'):.0f} | {med(k, 'cpu_us'):.2f} | {med(k, 'p50_us'):.0f} | {med(k, 'p99_us'):.0f} |")
    print(f"\nCPU per request, edge counting and reports on / off: {ratio:.3f} (goal <= 1.03)")


if __name__ == "__main__":
    dp.main(run)
