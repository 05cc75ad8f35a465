#!/usr/bin/env bash
# Instructions per request of the sidecar pair under callgrind (deterministic; see
# bench/callgrind.py). Compare builds in one command:
#   VARIANTS="before=/tmp/old/sidecar,after=target/release/sidecar" bench/callgrind.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bench/install-peers.sh >/dev/null
command -v valgrind >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
cargo build --release -q -p sidecar -p control-plane -p mesh-bench
exec python3 bench/callgrind.py
