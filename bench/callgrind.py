#!/usr/bin/env python3
"""Instructions per request of the two sidecars on the mesh path (wrk → outbound sidecar in
gateway mode → inbound sidecar → backend), counted by callgrind: blind to the machine's load
and repeatable to about 2 % (two copies of one binary read 75.9k and 74.7k in one 3 s run: the
work per request shifts a little with how requests batch), so it is the regression gate
performance.md asks for; differences smaller than that are noise.

Each sidecar binary in VARIANTS runs as the pair under `valgrind --tool=callgrind` while wrk
drives CONNS connections; SETTLE seconds into the run the counters are zeroed
(`callgrind_control -z`), DURATION seconds later dumped (`-d`), and the instructions of that
window are divided by the requests the backend answered in it — so the connections a wrk run
opens, and those an ending run aborts and the proxies make again, are not counted. With MTLS=1 the hop between the pair is mutual TLS (both sidecars get certificates
from the control plane's CA); with HAPROXY=1 two chained HAProxies are counted the same way,
as the reference — in plaintext only: under valgrind the first HAProxy keeps making new TLS
connections to the second (161 full handshakes in a window of 764 requests, measured), which
it does not do at full speed (no new connection in 26,621 requests, seen with strace), so a
TLS count of HAProxy under callgrind would not describe HAProxy.
Since 3f68506 the mTLS pair multiplexes concurrent requests over one HTTP/2 connection, which
moves work from the kernel (not counted here) into user space (counted), and valgrind's
slowdown makes more requests concurrent: compare MTLS=1 counts only between builds that both
multiplex (BENCHMARKS.md, mTLS fourth round).
Run through bench/callgrind.sh:
  VARIANTS="before=/tmp/old/sidecar,after=target/release/sidecar" bench/callgrind.sh
  MTLS=1 bench/callgrind.sh; HAPROXY=1 bench/callgrind.sh
Environment: VARIANTS (default "ours=target/release/sidecar"), CONNS (64), DURATION (8),
SETTLE (3), MTLS (0), HAPROXY (0).
"""

import importlib.util
import os
import re
import signal
import subprocess
import time
import urllib.request

spec = importlib.util.spec_from_file_location("dp", os.path.join(os.path.dirname(__file__), "data-plane.py"))
dp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp)
REL, TMP = dp.REL, dp.TMP
VARIANTS = [v.split("=", 1) for v in os.environ.get("VARIANTS", f"ours={REL}/sidecar").split(",")]
CONNS = int(os.environ.get("CONNS", "64"))
DURATION = int(os.environ.get("DURATION", "8"))
SETTLE = int(os.environ.get("SETTLE", "3"))
MTLS = os.environ.get("MTLS", "0") == "1"
HAPROXY = os.environ.get("HAPROXY", "0") == "1"


def instructions(path):
    with open(path) as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if m:
                return int(m.group(1))
    return 0


def grind(name):
    return ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={TMP}/cg-{name}.%p"]


def answered(backend):
    with urllib.request.urlopen(f"http://{backend}/__requests", timeout=30) as r:
        return int(r.read())


def count(name, url, backend, first, second):
    """Instructions per request of `first` and `second` (the proxy wrk talks to, then the next)
    over a window inside one wrk run: after a warm-up run and SETTLE seconds into the measured
    one (the connections an ending wrk run aborts are made again, TLS handshakes included,
    outside the window), the counters are zeroed; DURATION seconds later both profiles are dumped
    and the backend says how many requests it answered in between. (requests, first, second)."""
    dp.wait_http(url, tries=1200)
    subprocess.run(["wrk", "-t1", f"-c{CONNS}", "-d2s", "-H", "Host: bench", url], capture_output=True)
    load = subprocess.Popen(["wrk", "-t1", f"-c{CONNS}", f"-d{SETTLE + DURATION + 5}s", "-H", "Host: bench", url],
                            stdout=subprocess.DEVNULL)
    time.sleep(SETTLE)
    control = lambda flag, p: subprocess.run(["callgrind_control", flag, str(p.pid)], capture_output=True, check=True)
    control("-z", first)
    control("-z", second)
    n0 = answered(backend)
    time.sleep(DURATION)
    control("-d", first)
    control("-d", second)
    n = max(answered(backend) - n0, 1)
    load.kill()
    load.wait()
    for p in (first, second):
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    # taskset and valgrind exec in place: each file carries its process's PID; `.1` is the dump.
    return n, instructions(f"{TMP}/cg-{name}.{first.pid}.1") / n, instructions(f"{TMP}/cg-{name}.{second.pid}.1") / n


def run():
    backend, cp_url = dp.backend_and_control_plane()
    rows = []
    for name, binary in VARIANTS:
        svc = f"{name}-svc"
        tokens = (dp.meshctl(cp_url, "identity", "token", "create", svc),
                  dp.meshctl(cp_url, "identity", "token", "create", "gateway")) if MTLS else (None, None)
        inb, _, out, info = dp.sidecar_pair(cp_url, backend, svc, binary, tokens=tokens, wrap=grind(name))
        rows.append((name, *count(name, f"http://{info['outbound']}/", backend, out, inb)))
    if HAPROXY and MTLS:
        print("HAPROXY=1 counts HAProxy in plaintext only (see the module's notes): skipped with MTLS=1")
    elif HAPROXY:
        chain = dp.haproxy_chain("cg", backend, wrap=grind("haproxy"))
        rows.append(("haproxy", *count("haproxy", chain["url"], backend, *chain["procs"])))
    hop = "mutual TLS" if MTLS else "plaintext"
    print(f"instructions per request under callgrind, {CONNS} connections, {DURATION} s, {hop} between the pair"
          " (start-up, warm-up and reconnects excluded)")
    print("| variant | requests | outbound (first proxy) | inbound (second proxy) | pair |")
    print("|---|---|---|---|---|")
    for name, n, o, i in rows:
        print(f"| {name} | {n} | {o / 1000:.1f}k | {i / 1000:.1f}k | {(o + i) / 1000:.1f}k |")


if __name__ == "__main__":
    dp.main(run, spin=False)
