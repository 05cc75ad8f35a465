#!/usr/bin/env python3
"""Sidecar builds side by side: the mesh path (wrk → outbound sidecar → inbound sidecar →
backend) for each sidecar binary named in VARIANTS, in plaintext and with mutual TLS, against
two chained HAProxies (plaintext and TLS), all in one run — so a change is measured against
its baseline in the same command, as BENCHMARKS.md requires.

Method as bench/data-plane.py: proxies and backend on CPU 0 with one worker each, wrk on CPU 1,
idle spinners, targets interleaved inside each rep, medians over reps. Also reports each
variant's RSS idle and with 1,000 client connections (plaintext outbound sidecar).

PAIRED=1 measures differently, for changes smaller than this machine's run-to-run noise (a
target's throughput moves ±25 % between reps here): two mTLS mesh paths run *at the same time*
on the same core, one wrk each (both on CPU 1), so whatever slows the machine slows both; each
path's CPU per request comes from /proc. Pairs: the first variant against a second copy of
itself (the control: how far apart two identical paths read), the first against each other
variant, and HAProxy ×2 with TLS against each variant. Both paths compete for one core, so
absolute figures are not those of a path alone; read the ratios.

Run through bench/variants.sh:
  VARIANTS="before=/path/to/old/sidecar,after=target/release/sidecar" bench/variants.sh
  PAIRED=1 VARIANTS="before=…,after=…" bench/variants.sh
Environment: VARIANTS (default: "ours=target/release/sidecar"), REPS (3), DURATION (5), PAIRED,
CONNS (with PAIRED=1: wrk connections per path, 64).
"""

import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time

spec = importlib.util.spec_from_file_location("dp", os.path.join(os.path.dirname(__file__), "data-plane.py"))
dp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp)
REL, TMP = dp.REL, dp.TMP
VARIANTS = [v.split("=", 1) for v in os.environ.get("VARIANTS", f"ours={REL}/sidecar").split(",")]
CONNS = int(os.environ.get("CONNS", "64"))  # wrk connections per path with PAIRED=1


def hold_connections(addr, n=1000):
    host, port = addr.rsplit(":", 1)
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        socks.append(s)
    for s in socks:
        s.recv(4096)
    return socks


def run():
    backend, cp_url, certs, token = dp.mesh_ca("mesh", "haproxy-client")

    targets, rss_of = {}, {}
    for name, binary in VARIANTS:
        for tls in (False, True):
            service = f"{name}-{'mtls' if tls else 'plain'}"
            tokens = (token(service), token("gateway")) if tls else (None, None)
            in_p, _, out_p, out_info = dp.sidecar_pair(cp_url, backend, service, binary, tokens)
            targets[f"{name}{' mTLS' if tls else ''}"] = (f"http://{out_info['outbound']}/", [out_p.pid, in_p.pid])
            if not tls:
                rss_of[name] = (out_p, out_info)
    plain, tls_chain = dp.haproxy_chain("plain", backend), dp.haproxy_chain("tls", backend, certs)
    targets["haproxy x2"] = (plain["url"], plain["pids"])
    targets["haproxy x2 TLS"] = (tls_chain["url"], tls_chain["pids"])
    for url, _ in targets.values():
        dp.wait_http(url)

    results = []
    for rep in range(dp.REPS):
        results += dp.interleave(rep, [("ping-pong", 1), ("64 conns", 64)], targets)
    rss = {}
    for name, (proc, info) in rss_of.items():
        idle = dp.rss_mb(proc.pid)
        socks = hold_connections(info["outbound"])
        time.sleep(0.5)
        rss[name] = (idle, dp.rss_mb(proc.pid))
        for s in socks:
            s.close()
    with open(os.path.join(dp.OUT, "variants.json"), "w") as f:
        json.dump({"results": results, "rss": rss}, f, indent=1)
    report(results, rss, list(targets))


def paired():
    backend, cp_url, certs, token = dp.mesh_ca("mesh", "haproxy-client")
    paths = {}
    first = VARIANTS[0][0]
    for name, binary in VARIANTS + [(f"{first} (copy)", VARIANTS[0][1])]:
        service = f"p{len(paths)}-mtls"
        in_p, _, out_p, info = dp.sidecar_pair(cp_url, backend, service, binary, (token(service), token("gateway")))
        paths[name] = (f"http://{info['outbound']}/", [out_p.pid, in_p.pid])
    chain = dp.haproxy_chain("tls", backend, certs)
    paths["haproxy x2 TLS"] = (chain["url"], chain["pids"])
    for url, _ in paths.values():
        dp.wait_http(url)
    pairs = [(first, f"{first} (copy)")] + [(first, n) for n, _ in VARIANTS[1:]]
    pairs += [("haproxy x2 TLS", n) for n, _ in VARIANTS]
    ratios = {p: [] for p in pairs}
    for rep in range(dp.REPS):
        for a, b in pairs:
            before = {p: dp.cpu_seconds(p) for t in (a, b) for p in paths[t][1]}
            runs = [subprocess.Popen(dp.wrk_cmd(paths[t][0], CONNS), stdout=subprocess.PIPE, text=True) for t in (a, b)]
            ra, rb = (dp.parse_wrk(r.communicate()[0]) for r in runs)
            cpu = [sum(dp.cpu_seconds(p) - before[p] for p in paths[t][1]) * 1e6 / max(r["requests"], 1)
                   for t, r in ((a, ra), (b, rb))]
            ratios[(a, b)].append((cpu[1] / cpu[0], rb["rps"] / ra["rps"]))
            print(f"rep {rep + 1} {a} | {b}: CPU/req {cpu[0]:.1f} | {cpu[1]:.1f} us, rps {ra['rps']:.0f} | {rb['rps']:.0f}",
                  file=sys.stderr)
    with open(os.path.join(dp.OUT, "variants-paired.json"), "w") as f:
        json.dump({f"{a} | {b}": v for (a, b), v in ratios.items()}, f, indent=1)
    print(f"mTLS mesh paths at {CONNS} connections, two at a time on one core; medians of {dp.REPS} reps x {dp.DUR} s")
    print("| A | B | CPU per request B / A | per rep | throughput B / A |")
    print("|---|---|---|---|---|")
    for (a, b), v in ratios.items():
        per = ", ".join(f"{c:.3f}" for c, _ in v)
        print(f"| {a} | {b} | {statistics.median(c for c, _ in v):.3f} | {per} | {statistics.median(r for _, r in v):.3f} |")


def report(results, rss, names):
    def med(scn, t, key):
        return statistics.median(r[key] for r in results if r["scenario"] == scn and r["target"] == t)

    def ratio(scn, a, b, key):
        per = []
        for rep in range(dp.REPS):
            ra = [r for r in results if r["rep"] == rep and r["scenario"] == scn and r["target"] == a]
            rb = [r for r in results if r["rep"] == rep and r["scenario"] == scn and r["target"] == b]
            if ra and rb and rb[0][key]:
                per.append(ra[0][key] / rb[0][key])
        return statistics.median(per) if per else float("nan")

    print(f"mesh path, medians of {dp.REPS} reps x {dp.DUR} s")
    print("| scenario | target | p50 µs | rps | CPU µs/req | p50 / HAProxy same TLS | rps / HAProxy same TLS |")
    print("|---|---|---|---|---|---|---|")
    for scn in ["ping-pong", "64 conns"]:
        for t in names:
            peer = "haproxy x2 TLS" if "TLS" in t else "haproxy x2"
            print(f"| {scn} | {t} | {med(scn, t, 'p50_us'):.0f} | {med(scn, t, 'rps'):.0f} | {med(scn, t, 'cpu_us_per_req'):.1f} "
                  f"| {ratio(scn, t, peer, 'p50_us'):.2f} | {ratio(scn, t, peer, 'rps'):.2f} |")
    print("| variant | RSS idle MB | RSS with 1,000 client connections MB |")
    print("|---|---|---|")
    for name, (idle, loaded) in rss.items():
        print(f"| {name} | {idle:.1f} | {loaded:.1f} |")


if __name__ == "__main__":
    dp.main(paired if os.environ.get("PAIRED") == "1" else run)
