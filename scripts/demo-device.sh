#!/usr/bin/env bash
# The demonstration itself, on a kernel with ublk (the host's, or the test
# guest's: scripts/demo.sh picks): a primary and two secondaries on
# 127.0.0.1, ext4 on the primary's /dev/ublkbN, files written through it,
# then every copy shown byte-identical and every secondary's log cleared.
#
# Usage: scripts/demo-device.sh BIN_DIR WORK_DIR
#   BIN_DIR   holds replblkd and replblk-ctl
#   WORK_DIR  an empty directory for the nodes' files (on a filesystem that
#             takes O_DIRECT), removed by the caller
set -euo pipefail

bin=$(cd "${1:?usage: demo-device.sh BIN_DIR WORK_DIR}" && pwd)
work=$(cd "${2:?usage: demo-device.sh BIN_DIR WORK_DIR}" && pwd)
size=$((256 << 20))
config=$work/volume.toml
mnt=$work/mnt
pids=()
primary_pid=""

cleanup() {
    set +e
    mountpoint -q "$mnt" && umount "$mnt"
    [ -n "$primary_pid" ] && stop_process TERM "$primary_pid" 60
    for pid in "${pids[@]}"; do stop_process TERM "$pid" 30; done
}
trap cleanup EXIT
die() {
    echo "demo: $*" >&2
    for log in "$work"/*.out; do echo "----- $log"; tail -n 30 "$log"; done >&2
    exit 1
}
# shellcheck source=lib/cluster.sh
. "$(dirname "$0")/lib/cluster.sh"

write_config "$config" "$work" "$size" $((32 << 20)) "$(free_port)" "$(free_port)" "$(free_port)"
echo "== config: $config"
cat "$config"

echo "== creating each node's data and log files"
for id in 1 2 3; do "$bin/replblk-ctl" init --config "$config" --node "$id"; done

echo "== starting secondaries 2 and 3"
start_secondaries "$bin" "$config" "$work" || die "the secondaries did not come up"

echo "== starting primary node 1 with its block device"
RUST_LOG=${RUST_LOG:-info} "$bin/replblkd" primary --config "$config" --node 1 \
    >"$work/node1.out" 2>&1 &
primary_pid=$!
wait_for 120 grep -q "^ublk device: " "$work/node1.out" || die "the primary created no device"
device=$(sed -n 's/^ublk device: //p' "$work/node1.out")
echo "primary serves $device"
lsblk "$device" 2>/dev/null || true
echo "logical_block_size $(cat "/sys/block/$(basename "$device")/queue/logical_block_size")"

echo "== mkfs.ext4 and mount"
mkfs.ext4 -q -F "$device"
mkdir -p "$mnt"
mount "$device" "$mnt"
echo "== writing through the filesystem: 32 MiB of random data and a copy of /usr/include/linux"
head -c $((32 << 20)) /dev/urandom > "$work/random.bin"
cp "$work/random.bin" "$mnt/random.bin"
cp -a /usr/include/linux "$mnt/linux"
sync
df -h "$mnt" | tail -n 1
echo "$(find "$mnt/linux" -type f | wc -l) files copied"
umount "$mnt"

echo "== reading it back through the device"
mount -o ro "$device" "$mnt"
cmp "$work/random.bin" "$mnt/random.bin" || die "random.bin reads back different"
echo "random.bin reads back identical"
diff -r /usr/include/linux "$mnt/linux" || die "the copied tree reads back different"
echo "the copied tree reads back identical"
umount "$mnt"

echo "== the secondaries clear their logs once told everything is all-acked"
wait_for 60 logs_cleared "$bin" "$config" "$work/status" || { cat "$work/status"; die "a secondary's log was not cleared"; }
grep -E "^(node [123]|  secondary [23]|device) " "$work/status"
echo "every secondary's start-of-log pointer has reached the end of its log"

echo "== comparing the copies"
for id in 2 3; do
    cmp -n "$size" "$work/node1.data" "$work/node$id.data" \
        || die "node $id's copy differs from the primary's"
    echo "node $id's copy is byte-identical to the primary's ($size bytes)"
done
e2fsck -fn "$work/node3.data" >/dev/null 2>&1 || die "e2fsck finds node 3's copy damaged"
echo "node 3's copy is a clean ext4 filesystem (e2fsck -fn)"

echo "== stopping the primary (SIGTERM removes $device)"
stop_process TERM "$primary_pid" 60 || die "the primary failed to stop cleanly (status $?)"
primary_pid=""
[ ! -e "$device" ] || die "$device is still there"
echo "$device removed"
echo "== done"
