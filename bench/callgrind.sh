#!/usr/bin/env bash
# Instructions per request of the sidecar pair under callgrind (repeatable to about 2 %; see
# bench/callgrind.py). Compare builds in one command:
#   VARIANTS="before=/tmp/old/sidecar,after=target/release/sidecar" bench/callgrind.sh
set -euo pipefail
command -v valgrind >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
exec "$(dirname "$0")/run-python.sh" callgrind.py
