#!/usr/bin/env python3
"""The public edge against nginx with the same features (#17), run through bench/edge.sh.

Both proxies, one worker each on CPU 0 with the backend; wrk on CPU 1; spinners keep both cores
awake; interleaved reps, medians of same-rep ratios (the method of performance.md).

  nginx      limit_req per client address (a rate nothing reaches), CORS add_header for an
             allowed origin, `deny` of a CIDR, access_log (JSON, buffered), upstream keepalive
  ours       the same: a route with rate_limit (key ip), cors, --ip-deny, --access-log (file),
             threat screening off (nginx has none); then `detect` for its own cost
  JWT        ours with --auth required and a bearer token on every request: ES256 and RS256,
             with the verified-token cache (default) and without (--jwt-cache 0)
  bare       ours with none of it (a plain route, no access log): what the features cost
  idle       10,000 keep-alive client connections opened and left idle: each proxy's RSS

Environment: REPS (3), DURATION (5), IDLE (10000).
"""
import importlib.util
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("dp", os.path.join(HERE, "data-plane.py"))
dp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp)

IDLE = int(os.environ.get("IDLE", "10000"))
ORIGIN = "https://app.example.com"
NOFILE = 65536


def raise_nofile():
    """As many descriptors as the hard limit allows (the connections, and the proxies inherit it)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = hard if hard == resource.RLIM_INFINITY else min(hard, NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want != resource.RLIM_INFINITY and want < IDLE + 1000:
        raise SystemExit(f"IDLE={IDLE} needs {IDLE + 1000} file descriptors per process; the hard limit is {hard}")


def nginx_edge_conf(port, backend):
    d = os.path.join(dp.TMP, "nginx-edge")
    os.makedirs(os.path.join(d, "logs"), exist_ok=True)
    conf = f"""
worker_processes 1; daemon off; worker_rlimit_nofile {NOFILE}; error_log {d}/logs/error.log crit; pid {d}/nginx.pid;
events {{ worker_connections {NOFILE - 1000}; }}
http {{
  log_format json escape=json '{{"time":"$time_iso8601","client_ip":"$remote_addr","method":"$request_method","path":"$uri","status":$status,"bytes_in":$request_length,"bytes_out":$bytes_sent,"duration":$request_time,"request_id":"$request_id"}}';
  access_log {d}/logs/access.log json buffer=64k;
  keepalive_requests 100000000;
  keepalive_timeout 3600s;
  limit_req_zone $binary_remote_addr zone=edge:10m rate=1000000r/s;
  upstream app {{ server {backend}; keepalive 128; keepalive_requests 100000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=16384;
    deny 192.0.2.0/24; allow all;
    location / {{
      limit_req zone=edge burst=1000000 nodelay;
      if ($http_origin = "{ORIGIN}") {{ add_header Access-Control-Allow-Origin $http_origin always; add_header Vary Origin always; }}
      proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
    }}
  }}
}}"""
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return ["nginx", "-p", d, "-c", path]


ROUTES = """routes:
  - name: edge
    prefix: /
    service: api
    rate_limit: { requests_per_second: 1000000, burst: 1000000, key: ip }
    cors: { allow_origins: ["%s"] }
    threats: %s
"""


def es256_and_rs256():
    """Signing keys, their JWK Set, and a token for each (10 minutes)."""
    import base64
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    ec_key, rsa_key = ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)
    n = rsa_key.public_key().public_numbers()
    e = ec_key.public_key().public_numbers()
    jwks = {"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "ec", "alg": "ES256", "x": b64(e.x.to_bytes(32, "big")), "y": b64(e.y.to_bytes(32, "big"))},
        {"kty": "RSA", "kid": "rsa", "alg": "RS256", "n": b64(n.n.to_bytes(256, "big")), "e": b64(n.e.to_bytes(3, "big"))},
    ]}
    claims = b64(json.dumps({"sub": "bench", "exp": int(time.time()) + 600}).encode())

    def sign(alg, kid):
        head = b64(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
        msg = f"{head}.{claims}".encode()
        if alg == "ES256":
            r, s = utils.decode_dss_signature(ec_key.sign(msg, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            sig = rsa_key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
        return f"{head}.{claims}.{b64(sig)}"
    return jwks, {"ES256": sign("ES256", "ec"), "RS256": sign("RS256", "rsa")}


def gateway(cp_url, name, threats, extra=()):
    cfg = os.path.join(dp.TMP, f"{name}-config.yaml")
    with open(cfg, "w") as f:
        f.write(ROUTES % (ORIGIN, threats))
    return dp.start([f"{dp.REL}/sidecar", "--mode", "gateway", "--instance-id", name, "--control-plane", cp_url,
                     "--config", cfg, "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--worker-threads", "1",
                     "--data-dir", os.path.join(dp.TMP, name), "--log", "error", "--ip-deny", "192.0.2.0/24",
                     "--access-log", os.path.join(dp.TMP, f"{name}-access.log"), *extra])


def wrk(url, header=None):
    args = ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{dp.DUR}s", "--latency", "-H", f"Origin: {ORIGIN}"]
    if header:
        args += ["-H", header]
    return dp.parse_wrk(subprocess.run(args + [url], capture_output=True, text=True).stdout)


def hold_idle(addr, n):
    """Opens `n` keep-alive connections, makes one request on each, and leaves them open."""
    host, port = addr.rsplit(":", 1)
    socks = []
    req = f"GET / HTTP/1.1\r\nHost: bench\r\nOrigin: {ORIGIN}\r\n\r\n".encode()
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        s.sendall(req)
        socks.append(s)
    for s in socks:
        s.settimeout(10)
        data = s.recv(65536)
        if not data.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"an idle-connection request to {addr} failed: {data[:200]!r}")
    return socks


def main():
    raise_nofile()
    dp.main(run)


def run():
    _, be = dp.start([f"{dp.REL}/bench-backend", "127.0.0.1:0"])
    backend = be["http"]
    _, cp = dp.start([f"{dp.REL}/control-plane", "--insecure-api", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                      "--data-dir", os.path.join(dp.TMP, "cp"), "--log", "error"], cpu=1)
    cp_url = f"http://{cp['grpc']}"
    dp.start([f"{dp.REL}/bench-register", cp_url, "api", backend], cpu=1)
    jwks, tokens = es256_and_rs256()
    jwks_file = os.path.join(dp.TMP, "jwks.json")
    with open(jwks_file, "w") as f:
        json.dump(jwks, f)
    auth = ["--jwks-file", jwks_file, "--auth", "required"]
    bare = dp.start([f"{dp.REL}/sidecar", "--mode", "gateway", "--instance-id", "bare", "--control-plane", cp_url,
                     "--route", "/=api", "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--worker-threads", "1",
                     "--data-dir", os.path.join(dp.TMP, "bare"), "--log", "error", "--access-log", "off", "--threats", "off"])
    procs = {
        "ours, no edge features": bare,
        "ours": gateway(cp_url, "ours", "off"),
        "ours + detect": gateway(cp_url, "ours-detect", "detect"),
        "ours + JWT (cache)": gateway(cp_url, "ours-jwt", "off", auth),
        "ours + JWT (no cache)": gateway(cp_url, "ours-jwt-nocache", "off", auth + ["--jwt-cache", "0"]),
    }
    nx_port = dp.free_port()
    nginx_p, _ = dp.start(nginx_edge_conf(nx_port, backend), wait_json=False)
    time.sleep(0.5)
    nginx_pids = [int(x) for x in subprocess.run(["pgrep", "-P", str(nginx_p.pid)], capture_output=True, text=True).stdout.split()]
    urls = {name: f"http://{info['outbound']}/" for name, (_, info) in procs.items()}
    urls["nginx"] = f"http://127.0.0.1:{nx_port}/"
    for name, url in urls.items():
        if "JWT" not in name:
            dp.wait_http(url)
    pids = {name: [p.pid] for name, (p, _) in procs.items()}
    pids["nginx"] = [nginx_p.pid] + nginx_pids
    cpu = lambda name: sum(dp.cpu_seconds(p) for p in pids[name])

    targets = [("nginx", None), ("ours, no edge features", None), ("ours", None), ("ours + detect", None)]
    for alg, tok in tokens.items():
        targets += [("ours + JWT (cache)", (alg, tok)), ("ours + JWT (no cache)", (alg, tok))]
    rows = {}
    for rep in range(dp.REPS):
        for name, token in targets:
            label = name if token is None else f"{name} {token[0]}"
            header = None if token is None else f"Authorization: Bearer {token[1]}"
            c0 = cpu(name)
            r = wrk(urls[name], header)
            r["cpu_us"] = (cpu(name) - c0) * 1e6 / max(r["requests"], 1)
            rows.setdefault(label, []).append(r)
            print(f"rep {rep + 1} {label:28s} {r['rps']:.0f} rps, {r['cpu_us']:.1f} µs CPU/req, errors {r['errors']}", file=sys.stderr)

    # RSS with IDLE idle keep-alive client connections: nginx and ours.
    rss = {}
    for name in ("nginx", "ours"):
        before = sum(dp.rss_mb(p) for p in pids[name])
        addr = urls[name][len("http://"):].rstrip("/")
        socks = hold_idle(addr, IDLE)
        time.sleep(1)
        after = sum(dp.rss_mb(p) for p in pids[name])
        rss[name] = (before, after)
        for s in socks:
            s.close()
        print(f"{name}: RSS {before:.1f} MB idle, {after:.1f} MB with {IDLE} connections", file=sys.stderr)

    med = lambda k, f: statistics.median(r[f] for r in rows[k])
    ratio = lambda a, b, f: statistics.median(x[f] / y[f] for x, y in zip(rows[a], rows[b]))
    print(f"Reps: {dp.REPS} x {dp.DUR}s, 64 connections, interleaved; each proxy one worker on CPU 0 with the backend, wrk on CPU 1.\n")
    print("| target | rps | rps / nginx | proxy CPU µs/req | CPU / nginx | p50 µs | p99 µs | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for k in rows:
        errors = sum(r["errors"] for r in rows[k])
        print(f"| {k} | {med(k, 'rps'):.0f} | {ratio(k, 'nginx', 'rps'):.2f} | {med(k, 'cpu_us'):.1f} | {ratio(k, 'nginx', 'cpu_us'):.2f} | "
              f"{med(k, 'p50_us'):.0f} | {med(k, 'p99_us'):.0f} | {errors} |")
    for alg in tokens:
        print(f"\nJWT {alg}: CPU per request over the same edge without a token: cached +{med(f'ours + JWT (cache) {alg}', 'cpu_us') - med('ours', 'cpu_us'):.1f} µs, "
              f"uncached +{med(f'ours + JWT (no cache) {alg}', 'cpu_us') - med('ours', 'cpu_us'):.1f} µs")
    print(f"\n| proxy | RSS idle MB | RSS with {IDLE} idle connections MB | KB per connection |")
    print("|---|---|---|---|")
    for name, (before, after) in rss.items():
        print(f"| {name} | {before:.1f} | {after:.1f} | {(after - before) * 1024 / IDLE:.1f} |")
    print(f"\nRSS with {IDLE} connections, ours / nginx: {rss['ours'][1] / rss['nginx'][1]:.2f} (goal <= 1.0)")


if __name__ == "__main__":
    main()
