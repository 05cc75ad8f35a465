#!/usr/bin/env bash
# Market-service benchmark: trades/s and latency, direct and through the mesh, SQLite and
# PostgreSQL.   bench/market.sh     (DURATION=10 per run; ~1 min)
set -euo pipefail
cd "$(dirname "$0")/.."
bench/install-peers.sh >/dev/null
scripts/test-deps >/dev/null
trap 'scripts/test-deps stop' EXIT
cargo build --release -q -p sidecar -p control-plane -p meshctl -p market-service
# shellcheck disable=SC1091
. target/test-env
PG_URL=$MESH_TEST_POSTGRES_URL python3 bench/market.py
