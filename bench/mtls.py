#!/usr/bin/env python3
"""mTLS cost (issue #7): the mesh path (client → outbound proxy → inbound proxy → backend) in
plaintext and with mutual TLS between the two hops, for our sidecars and for two chained
HAProxies (TLS with client certificates from the same mesh CA), plus full mTLS handshakes per
second against each inbound side.

Method as bench/data-plane.py: proxies and backend on CPU 0 with one worker each, load on CPU 1,
idle spinners, targets interleaved per rep, medians. Run through bench/mtls.sh.

One-connection latency swings between runs here by more than the differences it should show
(HAProxy's own p50 read 64-72 us in one run, 80-104 us in another), so both scenarios are also
measured in short alternating slices: SLICES rounds (20) of HAProxy TLS, ours mTLS, HAProxy TLS
again, 1 s each at one connection, 2 s at 64. Each round's ratio is ours / the mean of the two
HAProxy slices around it, which cancels drift slower than a few seconds; the second HAProxy
slice against the first is the control, the method's own noise.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys

spec = importlib.util.spec_from_file_location("dp", os.path.join(os.path.dirname(__file__), "data-plane.py"))
dp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp)
REL, TMP = dp.REL, dp.TMP
SLICES = int(os.environ.get("SLICES", "20"))


def run():
    backend, cp_url, certs, token = dp.mesh_ca("mesh", "haproxy-client", "bench-client")

    in_plain_p, _, out_plain_p, out_plain = dp.sidecar_pair(cp_url, backend, "plain")
    # The mTLS pair: the inbound sidecar is service `mtls`; the outbound one (a gateway) has the
    # gateway identity. Both get their certificates from the control plane's CA.
    in_tls_p, in_tls, out_tls_p, out_tls = dp.sidecar_pair(cp_url, backend, "mtls", tokens=(token("mtls"), token("gateway")))
    plain, tls = dp.haproxy_chain("plain", backend), dp.haproxy_chain("tls", backend, certs)

    targets = {
        "direct": (f"http://{backend}/", []),
        "haproxy x2": (plain["url"], plain["pids"]),
        "haproxy x2 TLS": (tls["url"], tls["pids"]),
        "ours x2": (f"http://{out_plain['outbound']}/", [out_plain_p.pid, in_plain_p.pid]),
        "ours x2 mTLS": (f"http://{out_tls['outbound']}/", [out_tls_p.pid, in_tls_p.pid]),
    }
    for url, _ in targets.values():
        dp.wait_http(url)
    scenarios = [("mesh h1 ping-pong", 1), ("mesh h1 throughput (64 conns)", 64)]
    results = []
    for rep in range(dp.REPS):
        results += dp.interleave(rep, scenarios, targets)
        # Full handshakes (no resumption) against each inbound side, 8 loops on CPU 1.
        sides = [("ours", in_tls["inbound"], "mtls", in_tls_p.pid), ("haproxy", tls["inbound"], "mesh", tls["inbound_pid"])]
        for t, addr, expect, pid in sides:
            before = dp.cpu_seconds(pid)
            out = subprocess.run(["taskset", "-c", "1", f"{REL}/bench-tls", "handshakes", "--target", addr, "--dir", certs,
                                  "--client", "bench-client", "--expect", expect, "--secs", str(dp.DUR)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out)
            cpu = dp.cpu_seconds(pid) - before
            r.update({"rep": rep, "scenario": "handshakes", "target": t, "cpu_us_per_handshake": cpu * 1e6 / max(r["handshakes"], 1)})
            results.append(r)
            print(f"rep {rep + 1} handshakes {t:10s} {r['handshakes_per_second']:.0f}/s failed {r['failed']}", file=sys.stderr)
    slices = {conns: alternate(targets["haproxy x2 TLS"], targets["ours x2 mTLS"], conns, secs)
              for conns, secs in ((1, 1), (64, 2))}
    with open(os.path.join(dp.OUT, "mtls.json"), "w") as f:
        json.dump({"runs": results, "slices": {str(c): r for c, r in slices.items()}}, f, indent=1)
    report(results)
    for conns, rounds in slices.items():
        report_slices(conns, rounds)


def alternate(base, other, conns, secs):
    """wrk with `conns` connections in slices of `secs`: base, other, base again, SLICES times.
    `base` and `other` are (url, proxy PIDs). Returns each slice's wrk figures, with the
    proxies' CPU time per request from /proc/<pid>/schedstat (nanoseconds, where
    /proc/<pid>/stat counts 10 ms ticks), as (base, other, base again)."""
    def run_ns(pid):
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])

    def one(target):
        url, pids = target
        before = sum(run_ns(p) for p in pids)
        r = dp.wrk(url, conns, secs=secs)
        r["cpu_us_per_req"] = (sum(run_ns(p) for p in pids) - before) / 1e3 / max(r["requests"], 1)
        return r
    rounds = []
    for i in range(SLICES):
        r = (one(base), one(other), one(base))
        rounds.append(r)
        print(f"{conns} conns, slice {i + 1}: p50 haproxy TLS {r[0]['p50_us']} | ours mTLS {r[1]['p50_us']} | haproxy TLS {r[2]['p50_us']} us; "
              f"rps {r[0]['rps']:.0f} | {r[1]['rps']:.0f} | {r[2]['rps']:.0f}; "
              f"CPU/req {r[0]['cpu_us_per_req']:.1f} | {r[1]['cpu_us_per_req']:.1f} | {r[2]['cpu_us_per_req']:.1f} us", file=sys.stderr)
    return rounds


def report_slices(conns, rounds):
    def quartiles(xs):
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else xs * 3  # SLICES=1: no spread to show
        return f"x{statistics.median(xs):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})"
    print(f"  {conns} connection(s), {len(rounds)} rounds of alternating slices (haproxy TLS, ours mTLS, haproxy TLS):")
    for key, name in (("p50_us", "p50"), ("rps", "rps"), ("cpu_us_per_req", "CPU per request")):
        ours = [o[key] * 2 / (a[key] + b[key]) for a, o, b in rounds]
        control = [b[key] / a[key] for a, _, b in rounds]
        medians = statistics.median(o[key] for _, o, _ in rounds) / statistics.median(x[key] for a, _, b in rounds for x in (a, b))
        print(f"    {name:15s} ours mTLS / haproxy TLS {quartiles(ours)}; control (haproxy / itself) {quartiles(control)}; "
              f"ratio of the medians of all slices x{medians:.3f}")


def report(results):
    def runs(scn, t):
        return [r for r in results if r["scenario"] == scn and r["target"] == t]

    def med_ratio(scn, a, b, key):
        ratios = []
        for rep in range(dp.REPS):
            ra = [r for r in runs(scn, a) if r["rep"] == rep]
            rb = [r for r in runs(scn, b) if r["rep"] == rep]
            if ra and rb and rb[0][key]:
                ratios.append(ra[0][key] / rb[0][key])
        return statistics.median(ratios) if ratios else float("nan")

    med = lambda scn, t, key: statistics.median(r[key] for r in runs(scn, t))
    print(f"mTLS cost, medians of {dp.REPS} reps x {dp.DUR} s")
    for scn in ["mesh h1 ping-pong", "mesh h1 throughput (64 conns)"]:
        print(f"  {scn}:")
        for t in ["direct", "haproxy x2", "haproxy x2 TLS", "ours x2", "ours x2 mTLS"]:
            cpu = med(scn, t, "cpu_us_per_req") if t != "direct" else None
            print(f"    {t:16s} p50 {med(scn, t, 'p50_us'):7.0f} us  {med(scn, t, 'rps'):8.0f} rps" + (f"  {cpu:5.1f} us CPU/req" if cpu else ""))
        print(f"    TLS/plaintext: ours p50 x{med_ratio(scn, 'ours x2 mTLS', 'ours x2', 'p50_us'):.2f}, rps x{med_ratio(scn, 'ours x2 mTLS', 'ours x2', 'rps'):.2f}; "
              f"haproxy p50 x{med_ratio(scn, 'haproxy x2 TLS', 'haproxy x2', 'p50_us'):.2f}, rps x{med_ratio(scn, 'haproxy x2 TLS', 'haproxy x2', 'rps'):.2f}")
        print(f"    ours mTLS vs haproxy TLS: p50 x{med_ratio(scn, 'ours x2 mTLS', 'haproxy x2 TLS', 'p50_us'):.2f}, rps x{med_ratio(scn, 'ours x2 mTLS', 'haproxy x2 TLS', 'rps'):.2f}")
    for t in ["ours", "haproxy"]:
        print(f"  full mTLS handshakes/s against {t:8s}: {med('handshakes', t, 'handshakes_per_second'):.0f} "
              f"({med('handshakes', t, 'cpu_us_per_handshake'):.0f} us server CPU each)")


if __name__ == "__main__":
    dp.main(run)
