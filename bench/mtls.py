#!/usr/bin/env python3
"""mTLS cost (issue #7): the mesh path (client → outbound proxy → inbound proxy → backend) in
plaintext and with mutual TLS between the two hops, for our sidecars and for two chained
HAProxies (TLS with client certificates from the same mesh CA), plus full mTLS handshakes per
second against each inbound side.

Method as bench/data-plane.py: proxies and backend on CPU 0 with one worker each, load on CPU 1,
idle spinners, targets interleaved per rep, medians. Run through bench/mtls.sh.
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


def meshctl(cp, *args):
    return subprocess.run([f"{REL}/meshctl", "--control-plane", cp, *args], capture_output=True, text=True, check=True).stdout.strip()


def run():
    _, be = dp.start([f"{REL}/bench-backend", "127.0.0.1:0"])
    backend = be["http"]
    _, cp = dp.start([f"{REL}/control-plane", "--insecure-api", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                      "--data-dir", os.path.join(TMP, "cp"), "--log", "error"], cpu=1)
    cp_url = f"http://{cp['grpc']}"
    certs = os.path.join(TMP, "certs")
    tokens = {}
    for svc in ["plain", "mtls", "gateway", "mesh", "haproxy-client", "bench-client"]:
        tokens[svc] = meshctl(cp_url, "identity", "token", "create", svc)
    for svc in ["mesh", "haproxy-client", "bench-client"]:
        subprocess.run([f"{REL}/bench-tls", "certify", "--cp", cp_url, "--token", tokens[svc], "--service", svc, "--dir", certs],
                       check=True, capture_output=True)

    def inbound(name, service, token):
        args = [f"{REL}/sidecar", "--service", service, "--instance-id", name, "--app-addr", backend, "--control-plane", cp_url,
                "--inbound-addr", "127.0.0.1:0", "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                "--worker-threads", "1", "--data-dir", os.path.join(TMP, name), "--log", "error"]
        if token:
            args += ["--identity-token", token]
        return dp.start(args)

    def outbound(name, service, token):
        args = [f"{REL}/sidecar", "--mode", "gateway", "--instance-id", name, "--control-plane", cp_url,
                "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--worker-threads", "1",
                "--data-dir", os.path.join(TMP, name), "--route", f"/={service}", "--log", "error"]
        if token:
            args += ["--identity-token", token]
        return dp.start(args)

    in_plain_p, in_plain = inbound("in-plain", "plain", None)
    out_plain_p, out_plain = outbound("out-plain", "plain", None)
    # The mTLS pair: the inbound sidecar is service `mtls`; the outbound one (a gateway) has the
    # gateway identity. Both get their certificates from the control plane's CA.
    in_tls_p, in_tls = inbound("in-mtls", "mtls", tokens["mtls"])
    out_tls_p, out_tls = outbound("out-mtls", "mtls", tokens["gateway"])

    pb, pa, tb, ta = (dp.free_port() for _ in range(4))
    hb_p, _ = dp.start(dp.haproxy_conf("b-plain", pb, None, backend), wait_json=False)
    ha_p, _ = dp.start(dp.haproxy_conf("a-plain", pa, None, f"127.0.0.1:{pb}"), wait_json=False)
    # The same configuration with TLS on the hop between them (bind and server options).
    ca = os.path.join(certs, "ca.pem")
    hbt_p, _ = dp.start(dp.haproxy_conf("b-tls", f"{tb} ssl crt {certs}/mesh.bundle ca-file {ca} verify required alpn http/1.1", None, backend), wait_json=False)
    hat_p, _ = dp.start(dp.haproxy_conf("a-tls", ta, None, f"127.0.0.1:{tb} ssl crt {certs}/haproxy-client.bundle ca-file {ca} verify required alpn http/1.1"), wait_json=False)

    targets = {
        "direct": (f"http://{backend}/", []),
        "haproxy x2": (f"http://127.0.0.1:{pa}/", [ha_p.pid, hb_p.pid]),
        "haproxy x2 TLS": (f"http://127.0.0.1:{ta}/", [hat_p.pid, hbt_p.pid]),
        "ours x2": (f"http://{out_plain['outbound']}/", [out_plain_p.pid, in_plain_p.pid]),
        "ours x2 mTLS": (f"http://{out_tls['outbound']}/", [out_tls_p.pid, in_tls_p.pid]),
    }
    for url, _ in targets.values():
        dp.wait_http(url)
    scenarios = [("mesh h1 ping-pong", lambda u: dp.wrk(u, 1)), ("mesh h1 throughput (64 conns)", lambda u: dp.wrk(u, 64))]
    results = []
    for rep in range(dp.REPS):
        for name, fn in scenarios:
            for t, (url, pids) in targets.items():
                before = {p: dp.cpu_seconds(p) for p in pids}
                r = fn(url)
                cpu = sum(dp.cpu_seconds(p) - before[p] for p in pids)
                r.update({"rep": rep, "scenario": name, "target": t, "cpu_us_per_req": cpu * 1e6 / max(r["requests"], 1) if pids else None})
                results.append(r)
                print(f"rep {rep + 1} {name:32s} {t:16s} p50 {r['p50_us']}us {r['rps']:.0f} rps errors {r['errors']}", file=sys.stderr)
        # Full handshakes (no resumption) against each inbound side, 8 loops on CPU 1.
        for t, addr, expect in [("ours", in_tls["inbound"], "mtls"), ("haproxy", f"127.0.0.1:{tb}", "mesh")]:
            before = {p: dp.cpu_seconds(p) for p in ([in_tls_p.pid] if t == "ours" else [hbt_p.pid])}
            out = subprocess.run(["taskset", "-c", "1", f"{REL}/bench-tls", "handshakes", "--target", addr, "--dir", certs,
                                  "--client", "bench-client", "--expect", expect, "--secs", str(dp.DUR)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out)
            cpu = sum(dp.cpu_seconds(p) - v for p, v in before.items())
            r.update({"rep": rep, "scenario": "handshakes", "target": t, "cpu_us_per_handshake": cpu * 1e6 / max(r["handshakes"], 1)})
            results.append(r)
            print(f"rep {rep + 1} handshakes {t:10s} {r['handshakes_per_second']:.0f}/s failed {r['failed']}", file=sys.stderr)
    with open(os.path.join(dp.OUT, "mtls.json"), "w") as f:
        json.dump(results, f, indent=1)
    report(results)


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
