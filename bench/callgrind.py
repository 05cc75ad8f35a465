#!/usr/bin/env python3
"""Instructions per request of the two sidecars on the mesh path (wrk → outbound sidecar in
gateway mode → inbound sidecar → backend), counted by callgrind: blind to the machine's load
and repeatable to about 2 % (two copies of one binary read 75.9k and 74.7k in one 3 s run: the
work per request shifts a little with how requests batch), so it is the regression gate
performance.md asks for; differences smaller than that are noise.

Each sidecar binary in VARIANTS runs as the pair under `valgrind --tool=callgrind`; after a
warm-up the counters are zeroed (`callgrind_control -z`), wrk drives CONNS connections for
DURATION seconds, and the instructions counted from then on are divided by the requests wrk
completed. Run through bench/callgrind.sh:
  VARIANTS="before=/tmp/old/sidecar,after=target/release/sidecar" bench/callgrind.sh
Environment: VARIANTS (default "ours=target/release/sidecar"), CONNS (64), DURATION (8).
"""

import importlib.util
import os
import re
import signal
import subprocess

spec = importlib.util.spec_from_file_location("dp", os.path.join(os.path.dirname(__file__), "data-plane.py"))
dp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp)
REL, TMP = dp.REL, dp.TMP
VARIANTS = [v.split("=", 1) for v in os.environ.get("VARIANTS", f"ours={REL}/sidecar").split(",")]
CONNS = int(os.environ.get("CONNS", "64"))
DURATION = int(os.environ.get("DURATION", "8"))


def instructions(path):
    with open(path) as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if m:
                return int(m.group(1))
    return 0


def measure(name, binary, cp_url, backend):
    grind = ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={TMP}/cg-{name}.%p"]
    inb, _, out, info = dp.sidecar_pair(cp_url, backend, f"{name}-svc", binary, wrap=grind)
    url = f"http://{info['outbound']}/"
    dp.wait_http(url, tries=1200)
    subprocess.run(["wrk", "-t1", f"-c{CONNS}", "-d2s", "-H", "Host: bench", url], capture_output=True)  # warm-up
    for p in (inb, out):
        subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, check=True)
    r = dp.parse_wrk(subprocess.run(["wrk", "-t1", f"-c{CONNS}", f"-d{DURATION}s", "--latency", "-H", "Host: bench", url],
                                    capture_output=True, text=True).stdout)
    for p in (out, inb):
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    n = max(r["requests"], 1)
    # taskset and valgrind exec in place: each file carries its sidecar's PID.
    return n, instructions(f"{TMP}/cg-{name}.{out.pid}") / n, instructions(f"{TMP}/cg-{name}.{inb.pid}") / n


def run():
    backend, cp_url = dp.backend_and_control_plane()
    rows = [(name, *measure(name, binary, cp_url, backend)) for name, binary in VARIANTS]
    print(f"instructions per request under callgrind, {CONNS} connections, {DURATION} s (start-up and warm-up excluded)")
    print("| variant | requests | outbound (gateway) | inbound | pair |")
    print("|---|---|---|---|---|")
    for name, n, o, i in rows:
        print(f"| {name} | {n} | {o / 1000:.1f}k | {i / 1000:.1f}k | {(o + i) / 1000:.1f}k |")


if __name__ == "__main__":
    dp.main(run, spin=False)
