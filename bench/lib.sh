# Sourced by the event benchmarks (after `cd` to the repository root): release binaries in $R,
# a scratch dir $T, and the processes in $pids — all killed and removed on exit.
cargo build --release -q -p control-plane -p meshctl -p sidecar -p mesh-bench
R=target/release
T=$(mktemp -d)
pids=()
cleanup() { kill -9 "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT
