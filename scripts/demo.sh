#!/usr/bin/env bash
# Brings up a replicated volume on localhost, a primary and two secondaries,
# and uses it as a Linux block device: ext4 on the primary's /dev/ublkbN,
# files written through it, then every copy shown byte-identical and every
# secondary's log cleared (scripts/demo-device.sh does the work).
#
# Where the running kernel has ublk (/dev/ublk-control, after `modprobe
# ublk_drv`), on this machine; otherwise in a qemu guest with Debian's 6.12
# kernel (scripts/vm/, installed on first use: a few minutes).
# Usage: scripts/demo.sh            (builds in release mode first; as root)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

command -v cargo >/dev/null || { echo "demo: cargo is not installed" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "demo: must run as root (a block device, mount)" >&2; exit 1; }
if ! command -v cc >/dev/null 2>&1 || ! ldconfig -p | grep -q 'libclang[-.0-9]*\.so '; then
    echo "== installing a C compiler and libclang (libublk's bindgen)"
    apt-get update -qq && apt-get install -y -qq build-essential libclang-dev
fi
echo "== building"
cargo build --release --workspace --quiet

modprobe ublk_drv 2>/dev/null || true
if [ -e /dev/ublk-control ]; then
    echo "== this kernel has ublk: running on this machine"
    work=$(mktemp -d "${TMPDIR:-/var/tmp}/replblk-demo.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    scripts/demo-device.sh "$repo/target/release" "$work"
else
    echo "== this kernel ($(uname -r)) has no ublk: running in a qemu guest with Debian's 6.12 kernel"
    # The guest sees this machine's root read-only, except its /tmp.
    bin=$repo/target/demo/bin
    rm -rf "$bin"
    mkdir -p "$bin"
    cp target/release/replblkd target/release/replblk-ctl "$bin/"
    trap 'rm -rf "$bin"' EXIT
    scripts/vm/setup.sh
    # The guest's /tmp is a tmpfs of its own, which takes O_DIRECT.
    REPLBLK_VM_MEM=${REPLBLK_VM_MEM:-3072} scripts/vm/run.sh --timeout 900 \
        -- "mkdir -p /tmp/demo && $(printf '%q ' "$repo/scripts/demo-device.sh" "$bin" /tmp/demo)"
fi
