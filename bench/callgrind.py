#!/usr/bin/env python3
"""Instructions per request of the two sidecars on the mesh path (wrk → outbound sidecar in
gateway mode → inbound sidecar → backend), counted by callgrind: deterministic to well under
1 % and blind to the machine's load, so it is the regression gate performance.md asks for.

Each sidecar binary in VARIANTS runs as the pair under `valgrind --tool=callgrind`; after a
warm-up the counters are zeroed (`callgrind_control -z`), wrk drives CONNS connections for
DURATION seconds, and the instructions counted from then on are divided by the requests wrk
completed. Run through bench/callgrind.sh:
  VARIANTS="before=/tmp/old/sidecar,after=target/release/sidecar" bench/callgrind.sh
Environment: VARIANTS (default "ours=target/release/sidecar"), CONNS (64), DURATION (8).
"""

import importlib.util
import glob
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


def instructions(out_prefix):
    total = 0
    for path in glob.glob(out_prefix + "*"):
        with open(path) as f:
            for line in f:
                m = re.match(r"(?:summary|totals):\s+(\d+)", line)
                if m:
                    total += int(m.group(1))
                    break
    return total


def measure(name, binary, cp_url, backend):
    grind = lambda role: ["valgrind", "--tool=callgrind", "--dump-instr=no",
                          f"--callgrind-out-file={TMP}/cg-{name}-{role}.%p"]
    common = ["--control-plane", cp_url, "--admin-addr", "127.0.0.1:0", "--worker-threads", "1", "--log", "error"]
    service = f"{name}-svc"
    inb, _ = dp.start(grind("in") + [binary, "--service", service, "--instance-id", f"in-{name}", "--app-addr", backend,
                                     "--inbound-addr", "127.0.0.1:0", "--outbound-addr", "127.0.0.1:0",
                                     "--data-dir", os.path.join(TMP, f"in-{name}"), *common])
    out, info = dp.start(grind("out") + [binary, "--mode", "gateway", "--instance-id", f"out-{name}", "--outbound-addr",
                                         "127.0.0.1:0", "--data-dir", os.path.join(TMP, f"out-{name}"),
                                         "--route", f"/={service}", *common])
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
    return n, instructions(f"{TMP}/cg-{name}-out") / n, instructions(f"{TMP}/cg-{name}-in") / n


def run():
    _, be = dp.start([f"{REL}/bench-backend", "127.0.0.1:0"])
    _, cp = dp.start([f"{REL}/control-plane", "--insecure-api", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                      "--data-dir", os.path.join(TMP, "cp"), "--log", "error"], cpu=1)
    rows = [(name, *measure(name, binary, f"http://{cp['grpc']}", be["http"])) for name, binary in VARIANTS]
    print(f"instructions per request under callgrind, {CONNS} connections, {DURATION} s (start-up and warm-up excluded)")
    print("| variant | requests | outbound (gateway) | inbound | pair |")
    print("|---|---|---|---|---|")
    for name, n, o, i in rows:
        print(f"| {name} | {n} | {o / 1000:.1f}k | {i / 1000:.1f}k | {(o + i) / 1000:.1f}k |")


if __name__ == "__main__":
    try:
        run()
    finally:
        for p in dp.procs:
            try:
                p.kill()
                p.wait(timeout=5)
            except Exception:
                pass
