#!/usr/bin/env bash
# Installs the benchmark peers and load generators from Debian (root; idempotent).
set -euo pipefail
pkgs=(wrk nginx-light haproxy nghttp2-client util-linux procps python3-cryptography)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian starts packaged daemons on install where an init system runs; the benchmark starts its
# own instances from bench/ configs, so stop any that did start.
for svc in nginx haproxy; do service "$svc" stop >/dev/null 2>&1 || true; done
echo "benchmark peers present: $(wrk --version 2>&1 | head -1 | cut -c1-40); $(nginx -v 2>&1); $(haproxy -v | head -1)"
