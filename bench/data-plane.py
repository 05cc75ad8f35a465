#!/usr/bin/env python3
"""Data-plane benchmark: direct vs our sidecar vs nginx vs HAProxy (one hop), and our
outbound→inbound pair vs two chained HAProxies (the mesh path).

Method (../shared/design/performance.md): the backend and the proxy under test share CPU 0, the
load generator runs on CPU 1, an idle-priority spinner keeps each core awake, every proxy gets
one worker, keep-alive on both sides, targets interleaved inside each rep, figures are medians
of same-rep ratios to direct. Run through bench/data-plane.sh, which builds and installs first.

Environment: REPS (3), DURATION seconds per run (5), OUT (bench/results).
"""

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
REPS = int(os.environ.get("REPS", "3"))
DUR = int(os.environ.get("DURATION", "5"))
OUT = os.environ.get("OUT", os.path.join(ROOT, "bench", "results"))
TMP = tempfile.mkdtemp(prefix="mesh-bench-")
procs = []


def start(args, cpu=0, wait_json=True):
    cmd = ["taskset", "-c", str(cpu)] + args
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(p)
    info = json.loads(p.stdout.readline()) if wait_json else {}
    return p, info


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pid_of(p):
    # taskset execs the program, so the PID is the program's.
    return p.pid


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(rest[11]) + int(rest[12])) / tck


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wait_http(url, host="bench", tries=200):
    for _ in range(tries):
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {host}", url],
                           capture_output=True, text=True)
        if r.stdout == "200":
            return
        time.sleep(0.05)
    raise SystemExit(f"{url} (Host: {host}) never answered 200: is its proxy running? (see {TMP})")


def parse_wrk(text):
    lat = {}
    for pct, val, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        lat[pct] = float(val) * {"us": 1, "ms": 1000, "s": 1e6}[unit]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    total = int(re.search(r"(\d+) requests in", text).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:Non-2xx or 3xx responses|Socket errors:.*?(?:connect|read|write|timeout)) (\d+)", text))
    return {"p50_us": lat.get("50"), "p99_us": lat.get("99"), "rps": rps, "requests": total, "errors": errors}


def wrk_cmd(url, conns, secs=None, host="bench"):
    """wrk on CPU 1 with one thread and `conns` connections for `secs` (DURATION by default)."""
    return ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{secs or DUR}s", "--latency", "-H", f"Host: {host}", url]


def wrk(url, conns, host="bench", secs=None):
    r = subprocess.run(wrk_cmd(url, conns, secs, host), capture_output=True, text=True)
    return parse_wrk(r.stdout)


def h2load(url, conns, streams, host="bench"):
    log = os.path.join(TMP, "h2.log")
    r = subprocess.run(["taskset", "-c", "1", "h2load", "-c", str(conns), "-m", str(streams), "-D", str(DUR),
                        "--header", f":authority: {host}", f"--log-file={log}", url], capture_output=True, text=True)
    durs = []
    with open(log) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[1] == "200":
                durs.append(int(parts[2]))
    durs.sort()
    m = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", r.stdout)
    ok = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", r.stdout)
    pick = lambda q: durs[min(len(durs) - 1, int(q * (len(durs) - 1)))] if durs else None
    return {"p50_us": pick(0.5), "p99_us": pick(0.99), "rps": float(m.group(3)) if m else 0.0,
            "requests": int(ok.group(1)) if ok else len(durs), "errors": int(ok.group(2)) + int(ok.group(3)) if ok else 0}


def nginx_conf(port, h2port, backend):
    d = os.path.join(TMP, f"nginx-{port}")
    os.makedirs(os.path.join(d, "logs"), exist_ok=True)
    conf = f"""
worker_processes 1; daemon off; error_log {d}/logs/error.log crit; pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  upstream app {{ server {backend}; keepalive 128; keepalive_requests 100000000; }}
  server {{ listen 127.0.0.1:{port}; listen 127.0.0.1:{h2port} http2;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}"""
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return ["nginx", "-p", d, "-c", path]


def haproxy_conf(name, port, h2port, backend):
    """One-thread HAProxy on 127.0.0.1:`port` to `backend`; both may carry options after the
    address (bench/mtls.py adds TLS that way)."""
    path = os.path.join(TMP, f"haproxy-{name}.cfg")
    h2 = f"\nfrontend fe2\n  bind 127.0.0.1:{h2port} proto h2\n  default_backend be" if h2port else ""
    with open(path, "w") as f:
        f.write(f"""global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be{h2}
backend be
  server app {backend}
""")
    return ["haproxy", "-f", path, "-db"]


def meshctl(cp_url, *args):
    return subprocess.run([f"{REL}/meshctl", "--control-plane", cp_url, *args], capture_output=True, text=True, check=True).stdout.strip()


def backend_and_control_plane():
    """The backend (CPU 0) and a plaintext control plane (CPU 1, off the request path): their
    addresses as (backend `host:port`, control-plane URL)."""
    _, be = start([f"{REL}/bench-backend", "127.0.0.1:0"])
    _, cp = start([f"{REL}/control-plane", "--insecure-api", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                   "--data-dir", os.path.join(TMP, "cp"), "--log", "error"], cpu=1)
    return be["http"], f"http://{cp['grpc']}"


def certify(cp_url, certs, *services):
    """Certificates from the mesh CA for `services` into `certs` (bench-tls certify): for HAProxy
    and the handshake client, which cannot ask the CA themselves."""
    for svc in services:
        token = meshctl(cp_url, "identity", "token", "create", svc)
        subprocess.run([f"{REL}/bench-tls", "certify", "--cp", cp_url, "--token", token, "--service", svc, "--dir", certs],
                       check=True, capture_output=True)


def mesh_ca(*services):
    """The backend, the control plane, certificates from its CA for `services` (see `certify`)
    and a maker of bootstrap tokens: (backend, control-plane URL, certificate dir, token(svc))."""
    backend, cp_url = backend_and_control_plane()
    certs = os.path.join(TMP, "certs")
    certify(cp_url, certs, *services)
    return backend, cp_url, certs, lambda svc: meshctl(cp_url, "identity", "token", "create", svc)


def sidecar_pair(cp_url, backend, service, binary=None, tokens=(None, None), wrap=()):
    """Our mesh path: a gateway-mode sidecar routing `/` to `service`, whose inbound sidecar fronts
    `backend`, one worker each. `tokens` (inbound, outbound) give them mesh identities, so the hop
    between them is mutual TLS; `wrap` goes before both commands (valgrind). Returns the inbound
    and outbound processes and their `listening` lines."""
    binary = binary or f"{REL}/sidecar"
    common = ["--control-plane", cp_url, "--admin-addr", "127.0.0.1:0", "--worker-threads", "1", "--log", "error"]
    inb = [*wrap, binary, "--service", service, "--instance-id", f"in-{service}", "--app-addr", backend,
           "--inbound-addr", "127.0.0.1:0", "--outbound-addr", "127.0.0.1:0", "--data-dir", os.path.join(TMP, f"in-{service}"), *common]
    out = [*wrap, binary, "--mode", "gateway", "--instance-id", f"out-{service}", "--outbound-addr", "127.0.0.1:0",
           "--data-dir", os.path.join(TMP, f"out-{service}"), "--route", f"/={service}", *common]
    for i, (args, token) in enumerate(((inb, tokens[0]), (out, tokens[1]))):
        if token:
            path = os.path.join(TMP, f"token-{service}-{i}")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(token)
            args += ["--identity-token-file", path]
    in_p, in_info = start(inb)
    out_p, out_info = start(out)
    return in_p, in_info, out_p, out_info


def haproxy_chain(name, backend, certs=None, wrap=()):
    """Two chained HAProxies (a → b → backend), one worker each; with `certs` (from `certify` for
    `mesh` and `haproxy-client`), TLS with client certificates from the mesh CA between them;
    `wrap` goes before both commands (valgrind). Returns the URL, both PIDs and processes, and
    b's address and PID (the TLS side, for handshakes)."""
    pa, pb = free_port(), free_port()
    bind_b, to_b = pb, f"127.0.0.1:{pb}"
    if certs:
        ca = os.path.join(certs, "ca.pem")
        bind_b = f"{pb} ssl crt {certs}/mesh.bundle ca-file {ca} verify required alpn http/1.1"
        to_b = f"{to_b} ssl crt {certs}/haproxy-client.bundle ca-file {ca} verify required alpn http/1.1"
    b, _ = start([*wrap, *haproxy_conf(f"b-{name}", bind_b, None, backend)], wait_json=False)
    a, _ = start([*wrap, *haproxy_conf(f"a-{name}", pa, None, to_b)], wait_json=False)
    return {"url": f"http://127.0.0.1:{pa}/", "pids": [a.pid, b.pid], "procs": (a, b), "inbound": f"127.0.0.1:{pb}",
            "inbound_pid": b.pid}


def interleave(rep, scenarios, targets):
    """One rep: wrk with each (scenario, connections) against each target (url, proxy PIDs) in
    turn, with the proxies' CPU per request from /proc. Returns the results, each labelled."""
    results = []
    for scenario, conns in scenarios:
        for t, (url, pids) in targets.items():
            before = {p: cpu_seconds(p) for p in pids}
            r = wrk(url, conns)
            cpu = sum(cpu_seconds(p) - before[p] for p in pids)
            r.update({"rep": rep, "scenario": scenario, "target": t,
                      "cpu_us_per_req": cpu * 1e6 / max(r["requests"], 1) if pids else None})
            results.append(r)
            cpu_text = f" {r['cpu_us_per_req']:.1f} us CPU/req" if pids else ""
            print(f"rep {rep + 1} {scenario:32s} {t:22s} p50 {r['p50_us']}us {r['rps']:.0f} rps{cpu_text} errors {r['errors']}",
                  file=sys.stderr)
    return results


def main(body=None, spin=True):
    """Runs `body` (this file's `run` by default) with an idle-priority spinner on each core, then
    kills every process `start` started."""
    os.makedirs(OUT, exist_ok=True)
    spin_cmd = ["chrt", "-i", "0", "sh", "-c", "while :; do :; done"]
    spinners = [subprocess.Popen(["taskset", "-c", str(c), *spin_cmd]) for c in (0, 1)] if spin else []
    try:
        (body or run)()
    finally:
        for p in procs + spinners:
            try:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=5)
            except Exception:
                pass


def run():
    _, be = start([f"{REL}/bench-backend", "127.0.0.1:0"])
    backend = be["http"]
    extra = [start([f"{REL}/bench-backend", "127.0.0.1:0"])[1]["http"] for _ in range(2)]

    # Control plane on CPU 1 (it is not on the request path).
    _, cp = start([f"{REL}/control-plane", "--insecure-api", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                   "--data-dir", os.path.join(TMP, "cp"), "--log", "error"], cpu=1)
    cp_url = f"http://{cp['grpc']}"
    start([f"{REL}/bench-register", cp_url, "one", backend], cpu=1)
    start([f"{REL}/bench-register", cp_url, "three", backend] + extra, cpu=1)

    def sidecar_gateway(name, route_service):
        p, info = start([f"{REL}/sidecar", "--mode", "gateway", "--instance-id", name, "--control-plane", cp_url,
                         "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--worker-threads", "1",
                         "--data-dir", os.path.join(TMP, name), "--route", f"/={route_service}", "--log", "error"])
        return p, info["outbound"]

    ours_p, ours = sidecar_gateway("ours", "one")
    tax_p, tax = sidecar_gateway("ours-lb3", "three")
    # Mesh path: outbound sidecar → inbound sidecar (service `mesh`) → backend.
    inb_p, inb = start([f"{REL}/sidecar", "--service", "mesh", "--instance-id", "mesh-1", "--app-addr", backend,
                        "--control-plane", cp_url, "--inbound-addr", "127.0.0.1:0", "--outbound-addr", "127.0.0.1:0",
                        "--admin-addr", "127.0.0.1:0", "--worker-threads", "1", "--data-dir", os.path.join(TMP, "inb"), "--log", "error"])
    pair_p, pair = sidecar_gateway("ours-out", "mesh")

    nx_port, nx_h2 = free_port(), free_port()
    nginx_p, _ = start(nginx_conf(nx_port, nx_h2, backend), wait_json=False)
    hp_port, hp_h2 = free_port(), free_port()
    hap_p, _ = start(haproxy_conf("one", hp_port, hp_h2, backend), wait_json=False)
    chain = haproxy_chain("x2", backend)

    h1 = {"direct": f"http://{backend}/", "nginx": f"http://127.0.0.1:{nx_port}/", "haproxy": f"http://127.0.0.1:{hp_port}/", "ours": f"http://{ours}/"}
    h2 = {"direct": f"http://{backend}/", "nginx": f"http://127.0.0.1:{nx_h2}/", "haproxy": f"http://127.0.0.1:{hp_h2}/", "ours": f"http://{ours}/"}
    mesh = {"direct": f"http://{backend}/", "haproxy x2": chain["url"], "ours x2": f"http://{pair}/"}
    tax_t = {"ours": f"http://{ours}/", "ours-lb3": f"http://{tax}/"}
    pids = {"nginx": [nginx_p.pid], "haproxy": [hap_p.pid], "ours": [ours_p.pid], "haproxy x2": chain["pids"],
            "ours x2": [pair_p.pid, inb_p.pid], "ours-lb3": [tax_p.pid], "direct": []}
    for u in list(h1.values()) + list(mesh.values()) + list(tax_t.values()):
        wait_http(u)
    # nginx serves from its worker process, not the master we started.
    workers = subprocess.run(["pgrep", "-P", str(nginx_p.pid)], capture_output=True, text=True).stdout.split()
    pids["nginx"] = [nginx_p.pid] + [int(w) for w in workers]

    idle_rss = {k: sum(rss_mb(p) for p in v) for k, v in pids.items() if v}
    scenarios = [
        ("h1 ping-pong", h1, lambda u: wrk(u, 1)),
        ("h1 throughput (64 conns)", h1, lambda u: wrk(u, 64)),
        ("h2c ping-pong", h2, lambda u: h2load(u, 1, 1)),
        ("h2c throughput (16 conns x 10 streams)", h2, lambda u: h2load(u, 16, 10)),
        ("mesh h1 ping-pong", mesh, lambda u: wrk(u, 1)),
        ("mesh h1 throughput (64 conns)", mesh, lambda u: wrk(u, 64)),
        ("feature tax h1 throughput", tax_t, lambda u: wrk(u, 64)),
    ]
    results = []
    for rep in range(REPS):
        for name, targets, fn in scenarios:
            for t, url in targets.items():
                before = {p: cpu_seconds(p) for p in pids[t]}
                r = fn(url)
                cpu = sum(cpu_seconds(p) - before[p] for p in pids[t])
                r.update({"rep": rep, "scenario": name, "target": t, "cpu_us_per_req": cpu * 1e6 / max(r["requests"], 1) if pids[t] else None})
                results.append(r)
                print(f"rep {rep + 1} {name:42s} {t:10s} p50 {r['p50_us']}us p99 {r['p99_us']}us {r['rps']:.0f} rps errors {r['errors']}", file=sys.stderr)

    # RSS with 1,000 open client connections (wrk -c1000 against each proxy).
    conn_rss = {}
    for t in ("nginx", "haproxy", "ours"):
        p = subprocess.Popen(["taskset", "-c", "1", "wrk", "-t1", "-c1000", "-d4s", "-H", "Host: bench", h1[t]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.5)
        conn_rss[t] = sum(rss_mb(x) for x in pids[t])
        p.wait()

    with open(os.path.join(OUT, "data-plane.json"), "w") as f:
        json.dump({"results": results, "idle_rss_mb": idle_rss, "rss_1000_conns_mb": conn_rss}, f, indent=1)
    report(results, idle_rss, conn_rss)


def report(results, idle_rss, conn_rss):
    def med_ratio(scn, target, key, base="direct"):
        ratios = []
        for rep in range(REPS):
            a = [r for r in results if r["rep"] == rep and r["scenario"] == scn and r["target"] == target]
            b = [r for r in results if r["rep"] == rep and r["scenario"] == scn and r["target"] == base]
            if a and b and a[0][key] and b[0][key]:
                ratios.append(a[0][key] / b[0][key])
        return statistics.median(ratios) if ratios else float("nan")

    def med(scn, target, key):
        v = [r[key] for r in results if r["scenario"] == scn and r["target"] == target and r[key] is not None]
        return statistics.median(v) if v else float("nan")

    print(f"Reps: {REPS} x {DUR}s per target, interleaved. Ratios are medians of same-rep ratios to direct.\n")
    print("| scenario | target | p50 µs | p99 µs | p50 / direct | p99 / direct | rps / direct | proxy CPU µs/req | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    seen = []
    for r in results:
        k = (r["scenario"], r["target"])
        if k in seen:
            continue
        seen.append(k)
        scn, t = k
        base = "ours" if scn.startswith("feature") else "direct"
        errors = sum(x["errors"] for x in results if x["scenario"] == scn and x["target"] == t)
        print(f"| {scn} | {t} | {med(scn, t, 'p50_us'):.0f} | {med(scn, t, 'p99_us'):.0f} | {med_ratio(scn, t, 'p50_us', base):.2f} | "
              f"{med_ratio(scn, t, 'p99_us', base):.2f} | {med_ratio(scn, t, 'rps', base):.2f} | {med(scn, t, 'cpu_us_per_req'):.1f} | {errors} |")
    print("\n| proxy | RSS idle MB | RSS with 1,000 client connections MB |")
    print("|---|---|---|")
    for t in ("nginx", "haproxy", "ours"):
        print(f"| {t} | {idle_rss.get(t, 0):.1f} | {conn_rss.get(t, 0):.1f} |")
    print(f"| ours x2 (outbound + inbound) | {idle_rss.get('ours x2', 0):.1f} | |")


if __name__ == "__main__":
    main()
