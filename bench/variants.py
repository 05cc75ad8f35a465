#!/usr/bin/env python3
"""Sidecar builds side by side: the mesh path (wrk → outbound sidecar → inbound sidecar →
backend) for each sidecar binary named in VARIANTS, in plaintext and with mutual TLS, against
two chained HAProxies (plaintext and TLS), all in one run — so a change is measured against
its baseline in the same command, as BENCHMARKS.md requires.

Method as bench/data-plane.py: proxies and backend on CPU 0 with one worker each, wrk on CPU 1,
idle spinners, targets interleaved inside each rep, medians over reps. Also reports each
variant's RSS idle and with 1,000 client connections (plaintext outbound sidecar).

Run through bench/variants.sh:
  VARIANTS="before=/path/to/old/sidecar,after=target/release/sidecar" bench/variants.sh
Environment: VARIANTS (default: "ours=target/release/sidecar"), REPS (3), DURATION (5).
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


def meshctl(cp, *args):
    return subprocess.run([f"{REL}/meshctl", "--control-plane", cp, *args], capture_output=True, text=True, check=True).stdout.strip()


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
    _, be = dp.start([f"{REL}/bench-backend", "127.0.0.1:0"])
    backend = be["http"]
    _, cp = dp.start([f"{REL}/control-plane", "--insecure-api", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                      "--data-dir", os.path.join(TMP, "cp"), "--log", "error"], cpu=1)
    cp_url = f"http://{cp['grpc']}"
    certs = os.path.join(TMP, "certs")
    tokens = {svc: meshctl(cp_url, "identity", "token", "create", svc) for svc in ["gateway", "mesh", "haproxy-client"]}
    for svc in ["mesh", "haproxy-client"]:
        subprocess.run([f"{REL}/bench-tls", "certify", "--cp", cp_url, "--token", tokens[svc], "--service", svc, "--dir", certs],
                       check=True, capture_output=True)

    def pair(binary, name, tls):
        service = f"{name}-{'mtls' if tls else 'plain'}"
        common = ["--control-plane", cp_url, "--admin-addr", "127.0.0.1:0", "--worker-threads", "1", "--log", "error"]
        inb = [binary, "--service", service, "--instance-id", f"in-{service}", "--app-addr", backend,
               "--inbound-addr", "127.0.0.1:0", "--outbound-addr", "127.0.0.1:0", "--data-dir", os.path.join(TMP, f"in-{service}"), *common]
        out = [binary, "--mode", "gateway", "--instance-id", f"out-{service}", "--outbound-addr", "127.0.0.1:0",
               "--data-dir", os.path.join(TMP, f"out-{service}"), "--route", f"/={service}", *common]
        if tls:
            inb += ["--identity-token", meshctl(cp_url, "identity", "token", "create", service)]
            out += ["--identity-token", tokens["gateway"]]
        ip, ii = dp.start(inb)
        op, oi = dp.start(out)
        return ip, op, oi

    targets, rss_of = {}, {}
    for name, binary in VARIANTS:
        for tls in (False, True):
            ip, op, oi = pair(binary, name, tls)
            targets[f"{name}{' mTLS' if tls else ''}"] = (f"http://{oi['outbound']}/", [op.pid, ip.pid])
            if not tls:
                rss_of[name] = (op, oi)
    pb, pa, tb, ta = (dp.free_port() for _ in range(4))
    hb_p, _ = dp.start(dp.haproxy_conf("b-plain", pb, None, backend), wait_json=False)
    ha_p, _ = dp.start(dp.haproxy_conf("a-plain", pa, None, f"127.0.0.1:{pb}"), wait_json=False)
    ca = os.path.join(certs, "ca.pem")
    hbt_p, _ = dp.start(dp.haproxy_conf("b-tls", f"{tb} ssl crt {certs}/mesh.bundle ca-file {ca} verify required alpn http/1.1", None, backend), wait_json=False)
    hat_p, _ = dp.start(dp.haproxy_conf("a-tls", ta, None, f"127.0.0.1:{tb} ssl crt {certs}/haproxy-client.bundle ca-file {ca} verify required alpn http/1.1"), wait_json=False)
    targets["haproxy x2"] = (f"http://127.0.0.1:{pa}/", [ha_p.pid, hb_p.pid])
    targets["haproxy x2 TLS"] = (f"http://127.0.0.1:{ta}/", [hat_p.pid, hbt_p.pid])
    for url, _ in targets.values():
        dp.wait_http(url)

    results = []
    scenarios = [("ping-pong", 1), ("64 conns", 64)]
    for rep in range(dp.REPS):
        for scn, conns in scenarios:
            for t, (url, pids) in targets.items():
                before = {p: dp.cpu_seconds(p) for p in pids}
                r = dp.wrk(url, conns)
                cpu = sum(dp.cpu_seconds(p) - before[p] for p in pids)
                r.update({"rep": rep, "scenario": scn, "target": t, "cpu_us_per_req": cpu * 1e6 / max(r["requests"], 1)})
                results.append(r)
                print(f"rep {rep + 1} {scn:10s} {t:22s} p50 {r['p50_us']}us {r['rps']:.0f} rps {r['cpu_us_per_req']:.1f} us CPU/req errors {r['errors']}", file=sys.stderr)
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
    os.makedirs(dp.OUT, exist_ok=True)
    spinners = [subprocess.Popen(["taskset", "-c", str(c), "chrt", "-i", "0", "sh", "-c", "while :; do :; done"]) for c in (0, 1)]
    try:
        run()
    finally:
        for p in dp.procs + spinners:
            try:
                p.kill()
                p.wait(timeout=5)
            except Exception:
                pass
