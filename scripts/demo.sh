#!/usr/bin/env bash
# Brings up a replicated volume on localhost, a primary and two secondaries,
# writes 64 MiB through the primary, and shows every copy identical to what
# was written and every secondary's log cleared to its end.
# Usage: scripts/demo.sh            (builds in release mode first)
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "demo: cargo is not installed" >&2; exit 1; }
echo "== building"
cargo build --release --workspace --quiet
bin=target/release

work=$(mktemp -d "${TMPDIR:-/var/tmp}/replblk-demo.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
size=$((256 << 20))
cat > "$work/volume.toml" <<TOML
[volume]
uuid = "$(cat /proc/sys/kernel/random/uuid)"
size_bytes = $size
block_size_bytes = 4096
TOML
for id in 1 2 3; do
    cat >> "$work/volume.toml" <<TOML

[[node]]
id = $id
address = "127.0.0.1:$(free_port)"
data_path = "$work/node$id.data"
log_path = "$work/node$id.log"
log_size_bytes = $((64 << 20))
TOML
done
echo "== config: $work/volume.toml"
cat "$work/volume.toml"

echo "== creating each node's data and log files"
for id in 1 2 3; do "$bin/replblk-ctl" init --config "$work/volume.toml" --node "$id"; done

echo "== starting secondaries 2 and 3"
for id in 2 3; do
    RUST_LOG=info "$bin/replblkd" secondary --config "$work/volume.toml" --node "$id" \
        >"$work/node$id.out" 2>&1 &
    pids+=($!)
done
for id in 2 3; do
    for _ in $(seq 100); do
        "$bin/replblk-ctl" status --config "$work/volume.toml" --node "$id" >/dev/null 2>&1 && break
        sleep 0.1
    done
done
"$bin/replblk-ctl" status --config "$work/volume.toml"

echo "== writing 64 MiB of random data through primary node 1"
head -c $((64 << 20)) /dev/urandom > "$work/input"
"$bin/replblk-ctl" write --config "$work/volume.toml" --node 1 --input "$work/input"

echo "== the secondaries clear their logs once told everything is all-acked"
# True when both secondaries answer and hold no record in their logs.
logs_cleared() {
    "$bin/replblk-ctl" status --config "$work/volume.toml" > "$work/status" || return 1
    [ "$(grep -cE '^node [23] .*log_records 0$' "$work/status")" -eq 2 ]
}
for _ in $(seq 100); do logs_cleared && break; sleep 0.1; done
grep -E "^node [23] " "$work/status"

echo "== comparing"
cmp -n $((64 << 20)) "$work/input" "$work/node1.data" && echo "primary's copy holds exactly the bytes written"
for id in 2 3; do
    cmp -n "$size" "$work/node1.data" "$work/node$id.data" && echo "node $id's copy is byte-identical to the primary's ($size bytes)"
done
logs_cleared || { echo "demo: a secondary's log was not cleared" >&2; exit 1; }
echo "every secondary's start-of-log pointer has reached the end of its log"
echo "== done"
