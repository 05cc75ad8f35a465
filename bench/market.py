#!/usr/bin/env python3
"""Market-service benchmark: trades per second and latency, direct to the service and through
gateway → sidecar → sidecar → service, on SQLite and on PostgreSQL, in one run.

Each run: 64 funded traders buying small amounts on one hot market or on 32 markets, wrk with
CONNS connections (1, 8, 64, 256) for DURATION seconds; every trade is a real event-sourced
command (two aggregates appended with expected versions, outbox and an fsync'd commit, shared by
the commands the group committer batches together). Run through bench/market.sh.
Environment: DURATION (5), CONNS ("1 8 64 256"), PG_URL (from scripts/test-deps).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
DUR = int(os.environ.get("DURATION", "5"))
CONNS = [int(c) for c in os.environ.get("CONNS", "1 8 64 256").split()]
TRADERS = 64
TMP = tempfile.mkdtemp(prefix="mesh-market-bench-")
procs = []


def start(args):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(p)
    return json.loads(p.stdout.readline())


def call(method, url, body=None, token=None, user=None):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    if user:
        headers["x-mesh-user"] = user  # what the market's sidecar hands it for a verified user
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def wait(url):
    for _ in range(400):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"{url} never answered")


# End-user tokens from meshctl's development issuer (made in TMP on first use): the gateway
# verifies them and hands the market service the user, as in `meshctl up`.
TOKENS = []


def issuer():
    for t in range(TRADERS):
        TOKENS.append(subprocess.run([f"{REL}/meshctl", "token", "issue", "--sub", f"t{t}", "--ttl", "2h", "--dir", TMP],
                                     capture_output=True, text=True, check=True).stdout.strip())
    return os.path.join(TMP, "issuer", "jwks.json")


def one_backend(db_url, label):
    jwks = issuer() if not TOKENS else os.path.join(TMP, "issuer", "jwks.json")
    # The mesh as `meshctl up` runs it: the control plane's CA gives the gateway and the sidecar
    # certificates, so the sidecar knows the verified user comes from the edge.
    cp_dir = os.path.join(TMP, f"cp-{label}")
    cp = start([f"{REL}/control-plane", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                "--data-dir", cp_dir, "--log", "error"])
    cp_url = f"https://{cp['grpc']}"
    ca = os.path.join(cp_dir, "ca.pem")
    identity = {}
    for service in ["market-service", "gateway"]:
        identity[service] = os.path.join(TMP, f"token-{service}-{label}")
        subprocess.run([f"{REL}/meshctl", "--control-plane", cp_url, "--ca-file", ca, "--admin-token-file",
                        os.path.join(cp_dir, "admin.token"), "identity", "token", "create", service,
                        "--write", identity[service]], check=True, capture_output=True)
    tls = lambda service: ["--control-plane-ca", ca, "--identity-token-file", identity[service]]
    token_file = os.path.join(TMP, f"admin-token-{label}")
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write("bench")
    app = start([f"{REL}/market-service", "--listen", "127.0.0.1:0", "--database-url", db_url, "--admin-token-file", token_file, "--log", "error"])
    direct = f"http://{app['http']}"
    start([f"{REL}/sidecar", "--service", "market-service", "--instance-id", f"m-{label}", "--app-addr", app["http"],
           "--control-plane", cp_url, "--inbound-addr", "127.0.0.1:0", "--outbound-addr", "127.0.0.1:0",
           "--admin-addr", "127.0.0.1:0", "--data-dir", os.path.join(TMP, f"sc-{label}"), "--log", "error", *tls("market-service")])
    gw = start([f"{REL}/sidecar", "--mode", "gateway", "--instance-id", f"gw-{label}", "--control-plane", cp_url,
                "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--data-dir", os.path.join(TMP, f"gw-{label}"),
                "--route", "/api/markets=market-service,/markets", "--log", "error",
                "--jwks-file", jwks, "--jwt-issuer", "meshctl-dev", "--jwt-audience", "opinion-market", "--auth", "optional",
                *tls("gateway")])
    gateway = f"http://{gw['outbound']}/api/markets"
    wait(f"{direct}/healthz")
    for t in range(TRADERS):
        call("POST", f"{direct}/accounts", {}, user=f"t{t}")
        call("POST", f"{direct}/accounts/t{t}/grants", {"amount": "100000000"}, token="bench")
    close = int(time.time() * 1000) + 3_600_000
    markets = [call("POST", f"{direct}/markets", {"question": f"Q{i}?", "outcomes": ["yes", "no"], "close_time_ms": close,
                                                  "liquidity": "1000"}, user="t0")["id"] for i in range(33)]
    wait(f"{gateway}/{markets[0]}")
    return {"direct": f"{direct}/markets", "through the mesh": gateway}, markets


LUA = """
local markets = {%s}
local tokens = {%s}
local done, bad = 0, 0
math.randomseed(os.time())
request = function()
  local m = markets[math.random(#markets)]
  local t = math.random(0, %d)
  local body = string.format('{"outcome":%%d,"side":"buy","shares":"0.01"}', math.random(0, 1))
  local who = {["Content-Type"] = "application/json"}
  if %s then who["Authorization"] = "Bearer " .. tokens[t + 1] else who["x-mesh-user"] = "t" .. t end
  return wrk.format("POST", "%s/" .. m .. "/trades", who, body)
end
response = function(status, headers, body)
  if status ~= 201 and bad < 3 then
    bad = bad + 1
    io.stderr:write(status .. " " .. body .. string.char(10))
  end
end
"""


def fsyncs_per_second(seconds=2.0):
    """This disk's physical limit: small write + fsync, back to back, in the benchmark's directory."""
    path = os.path.join(TMP, "fsync.probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        os.write(fd, b"x" * 128)
        os.fsync(fd)
        n += 1
    os.close(fd)
    os.remove(path)
    return n / (time.time() - t0)


def commits(direct):
    h = json.loads(urllib.request.urlopen(direct.rsplit("/markets", 1)[0] + "/healthz", timeout=5).read())
    return h["group_commit"]["batches"], h["group_commit"]["commands"]


def run_wrk(base, markets, gateway, conns):
    from urllib.parse import urlparse
    u = urlparse(base)
    script = os.path.join(TMP, "trades.lua")
    with open(script, "w") as f:
        f.write(LUA % (",".join(f'"{m}"' for m in markets), ",".join(f'"{t}"' for t in TOKENS), TRADERS - 1, "true" if gateway else "false", u.path))
    r = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{DUR}s", "--latency", "-s", script, f"{u.scheme}://{u.netloc}"],
                       capture_output=True, text=True)
    out = r.stdout
    if r.stderr.strip():
        print(f"  refusals seen (first ones): {r.stderr.strip()[:400]}", file=sys.stderr)
    lat = {p: float(v) * {"us": 0.001, "ms": 1, "s": 1000}[unit] for p, v, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return rps, lat.get("50"), lat.get("99"), non2xx


def main():
    pg = os.environ.get("PG_URL")
    dbs = [("SQLite", f"sqlite://{TMP}/market.db")]
    if pg:
        import uuid
        name = "bench_" + uuid.uuid4().hex[:12]
        subprocess.run(["psql", pg, "-qc", f"CREATE DATABASE {name}"], check=True)
        dbs.append(("PostgreSQL", pg.rsplit("/", 1)[0] + "/" + name))
    print(f"{DUR} s per run, {TRADERS} traders; every trade appends to two aggregates and is acknowledged once its batch is durable.\n")
    print(f"This disk: {fsyncs_per_second():.0f} fsyncs/s (write + fsync, back to back).\n")
    print("| database | path | markets | connections | trades/s | p50 ms | p99 ms | non-2xx | trades per commit |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for label, url in dbs:
            paths, markets = one_backend(url, label.lower())
            for shape, subset in [("1 (hot)", markets[:1]), ("32", markets[1:])]:
                for conns in CONNS:
                    for path, base in paths.items():
                        b0, c0 = commits(paths["direct"])
                        rps, p50, p99, bad = run_wrk(base, subset, path != "direct", conns)
                        b1, c1 = commits(paths["direct"])
                        per = (c1 - c0) / max(1, b1 - b0)
                        print(f"| {label} | {path} | {shape} | {conns} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {bad} | {per:.1f} |")
                        sys.stdout.flush()
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
