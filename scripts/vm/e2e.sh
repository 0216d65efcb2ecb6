#!/usr/bin/env bash
# The ublk end-to-end test, host side: boots the test guest (Debian's 6.12
# kernel, which has ublk) and runs scripts/vm/e2e-guest.sh in it against
# this checkout's release build: ext4 on the primary's /dev/ublkbN, a tree
# copy and a fio verify job, kill -9 of the primary and its recovery, the
# replicas compared byte for byte, and kills at random moments of the
# device's start and recovery; then the demonstration on a volume of
# 512-byte blocks.
#
# Usage: scripts/vm/e2e.sh [--no-build] [--timeout S]
#   --no-build   use target/release as it is (scripts/test.sh has built it)
#   --timeout S  give the guest S seconds in all (default 840)
# Exit status: the guest's (0 when every check passed); on failure the
# guest's own log (daemons, dmesg) has been printed. Must run as root.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=1
# Under 15 minutes in all, boot included; a run takes about 5 on 2 cores.
timeout=840
while [ $# -gt 0 ]; do
    case $1 in
        --no-build) build=0; shift ;;
        --timeout) timeout=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "e2e.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "e2e.sh: must run as root (qemu, apt-get)" >&2; exit 2; }

if [ "$build" = 1 ]; then
    cargo build --release --workspace --manifest-path "$repo/Cargo.toml"
fi
# The guest sees the host's root read-only but not the host's /tmp, and a
# rebuild during the run must not change the binaries under test: copy them.
bin=$repo/target/vm-e2e/bin
rm -rf "$bin"
mkdir -p "$bin"
for binary in replblkd replblk-ctl; do
    [ -x "$repo/target/release/$binary" ] \
        || { echo "e2e.sh: target/release/$binary is missing; build first" >&2; exit 1; }
    cp "$repo/target/release/$binary" "$bin/"
done
trap 'rm -rf "$bin"' EXIT

"$here/setup.sh" --quiet
# Three 512 MiB copies and their logs live in the guest's tmpfs.
export REPLBLK_VM_MEM=${REPLBLK_VM_MEM:-3072}
started=$SECONDS
rc=0
results=$repo/target/vm-e2e/results
rm -rf "$results"
mkdir -p "$results"
"$here/run.sh" --timeout "$timeout" --results "$results" \
    --env "E2E_TREES=${E2E_TREES:-}" --env "E2E_FIO_TIMEOUT=${E2E_FIO_TIMEOUT:-}" \
    --env "E2E_KILL_ROUNDS=${E2E_KILL_ROUNDS:-}" --env "E2E_KILL_SEED=${E2E_KILL_SEED:-}" \
    --env "RUST_LOG=${RUST_LOG:-info}" \
    -- "$here/e2e-guest.sh" "$bin" || rc=$?
echo "e2e.sh: guest finished with status $rc after $((SECONDS - started)) s"
if [ "$rc" != 0 ]; then
    echo "e2e.sh: the daemons' logs are in $results"
    exit "$rc"
fi

# A volume of 512-byte blocks, the other logical block size a device may
# have: the demonstration (ext4, files written and read back, copies
# compared, e2fsck, the device removed) must pass on it as well.
echo "e2e.sh: 512-byte blocks: scripts/demo-device.sh in the guest"
started=$SECONDS
"$here/run.sh" --timeout 300 --env BLOCK_SIZE=512 \
    -- "mkdir -p /tmp/demo && $(printf '%q ' "$repo/scripts/demo-device.sh" "$bin" /tmp/demo)" \
    > "$results/demo-512.out" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
    cat "$results/demo-512.out"
    echo "e2e.sh: FAILED with 512-byte blocks (status $rc)"
    exit "$rc"
fi
grep -q "^logical_block_size 512$" "$results/demo-512.out" \
    || { cat "$results/demo-512.out"; echo "e2e.sh: the device did not have 512-byte blocks"; exit 1; }
echo "e2e.sh: 512-byte blocks passed after $((SECONDS - started)) s"
