#!/usr/bin/env bash
# Checks scripts/fio/ on the host with a loop device over a file in
# /var/tmp: run.sh's four jobs (short), verify.fio on the raw device and on
# a file in an ext4 filesystem made on it, verify.fio failing on a corrupted
# block, and run.sh refusing a regular file and a mounted device. The loop
# device is detached and the files removed at the end, also on failure.
#
# Usage: scripts/fio/selftest.sh [--runtime S]   (default 2; needs root)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
runtime=2
if [ "${1:-}" = --runtime ]; then runtime=${2:?}; fi
say() { echo "selftest: $*"; }
fail() { echo "selftest: FAILED: $*" >&2; exit 1; }

work=$(mktemp -d /var/tmp/replblk-fio-selftest.XXXXXX)
loopdev=""
cleanup() {
    if mountpoint -q "$work/mnt" 2>/dev/null; then umount "$work/mnt"; fi
    if [ -n "$loopdev" ]; then losetup -d "$loopdev"; fi
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s 256M "$work/backing"
loopdev=$(losetup --direct-io=on -f --show "$work/backing")
say "$loopdev over $work/backing, direct I/O $(cat "/sys/block/${loopdev#/dev/}/loop/dio")"

"$here/run.sh" "$loopdev" --runtime "$runtime" --ramp 1 --label selftest \
    --json-dir "$work/json" --tsv "$work/rows.tsv" || fail "run.sh"
[ "$(wc -l < "$work/rows.tsv")" = 4 ] || fail "expected 4 rows in --tsv"
[ "$(find "$work/json" -name 'selftest.*.json' | wc -l)" = 4 ] || fail "expected 4 JSON files"

verify() { # file-or-device size [fio options...]
    local target=$1 size=$2
    shift 2
    DEV=$target SIZE=$size IOENGINE=io_uring timeout 300 \
        fio "$@" --output-format=terse "$here/verify.fio" > "$work/verify.out" 2>&1
}
verify "$loopdev" 32M || fail "verify.fio on $loopdev"
say "verify.fio on the device: ok"

# A corrupted block must fail the verification (first pass only: the
# second one rewrites the same range with another block size).
verify "$loopdev" 32M --section=verify-randwrite-4k || fail "verify.fio write pass"
printf 'corrupt' | dd of="$loopdev" bs=1 seek=$(((5 << 20) + 100)) conv=notrunc status=none
sync
if verify "$loopdev" 32M --section=verify-randwrite-4k --verify_only; then
    fail "verify.fio passed over a corrupted block"
fi
grep -q 'verify failed' "$work/verify.out" || fail "no 'verify failed' in fio's output"
say "verify.fio on a corrupted block: fails, as it should"

if "$here/run.sh" "$work/backing" >/dev/null 2>&1; then fail "run.sh accepted a regular file"; fi
mkfs.ext4 -q "$loopdev"
mkdir "$work/mnt"
mount "$loopdev" "$work/mnt"
if "$here/run.sh" "$loopdev" >/dev/null 2>&1; then fail "run.sh accepted a mounted device"; fi
say "run.sh refuses a regular file and a mounted device: ok"
verify "$work/mnt/verify.dat" 32M || fail "verify.fio on a file in ext4"
say "verify.fio on a file in a filesystem: ok"
say "all passed"
