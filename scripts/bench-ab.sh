#!/usr/bin/env bash
# Compares replblk builds on this machine with replblk-bench: runs each
# build's benchmark in turn, ROUNDS times over (so the builds alternate and
# the machine's drift falls on all of them), then prints per build each
# round's local and replblk rows and the targets' ratios. One round says
# little on a shared machine (docs/BENCHMARKS.md).
#
# Usage: scripts/bench-ab.sh [--rounds N] [--out DIR] NAME=BINDIR... [-- BENCH-ARGS...]
#   NAME=BINDIR   a build: a directory holding its replblk-bench and replblkd
#                 (e.g. a copy of target/release of some commit); the primary
#                 runs inside replblk-bench, the secondaries are its replblkd
#   --rounds N    runs per build (default 3)
#   --out DIR     keep every run's output here (default target/bench-ab/DATE-TIME)
#   BENCH-ARGS    passed to every replblk-bench (default: --secondary-dir
#                 /dev/shm --secondaries 2)
# Takes about 70 s per run with the defaults.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rounds=3 out=""
builds=()
bench_args=(--secondary-dir /dev/shm --secondaries 2)
say() { echo "bench-ab.sh: $*" >&2; }
usage() { sed -n '2,16p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --) shift; bench_args=("$@"); break ;;
        -h|--help) usage ;;
        *=*) builds+=("$1"); shift ;;
        *) say "unknown argument: $1"; usage ;;
    esac
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { say "--rounds: a whole number from 1"; exit 2; }
[ ${#builds[@]} -ge 1 ] || { say "no build given"; usage; }
for build in "${builds[@]}"; do
    dir=${build#*=}
    for binary in replblk-bench replblkd; do
        [ -x "$dir/$binary" ] || { say "${build%%=*}: no $dir/$binary"; exit 2; }
    done
done
out=${out:-$repo/target/bench-ab/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"

for ((round = 1; round <= rounds; round++)); do
    for build in "${builds[@]}"; do
        name=${build%%=*} dir=${build#*=}
        say "round $round of $rounds: $name (load average $(cut -d' ' -f1-3 /proc/loadavg))"
        # Bounded: a run that hangs is killed, reported, and the others go on.
        timeout --kill-after=10 900 "$dir/replblk-bench" --replblkd "$dir/replblkd" \
            "${bench_args[@]}" > "$out/$name-$round.log" 2>&1 \
            || say "$name, round $round: replblk-bench failed (see $out/$name-$round.log)"
    done
done

for build in "${builds[@]}"; do
    name=${build%%=*}
    echo "== $name"
    for ((round = 1; round <= rounds; round++)); do
        echo "round $round:"
        grep -E '^  (local|replblk-[0-9]+) |measured' "$out/$name-$round.log" || echo "  (no results)"
    done
done
say "outputs in $out"
