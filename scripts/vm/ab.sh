#!/usr/bin/env bash
# Compares replblk builds in the test VM: runs scripts/vm/bench.sh for each
# build in turn, ROUNDS times over (one guest boot per build and round, so
# the builds alternate and the machine's drift falls on all of them), each
# boot measuring libublk's loop example beside replblk, then prints per
# build and job the ratio of replblk's IOPS to libublk loop's of the same
# boot: every round's, and their median. Ratios within a boot count; the
# machines this runs on are shared and noisy (docs/BENCHMARKS.md).
#
# Usage: scripts/vm/ab.sh [--rounds N] [--jobs "JOB..."] [--target T]
#            [--runtime S] [--backing B] [--repeat N] [--icount SHIFT]
#            [--out DIR] NAME=BINDIR...
#   NAME=BINDIR   a build: a directory holding its replblkd and replblk-ctl
#                 (e.g. a copy of target/release of some commit)
#   --rounds N    boots per build (default 3)
#   --jobs        fio jobs (default "randwrite-qd1 randwrite-qd32")
#   --target T    the replblk target compared (default replblk-0)
#   --runtime S   measured seconds per job (default 15)
#   --backing B   where the guest keeps the backing files: tmpfs (default)
#                 or ext4-ram (see bench.sh)
#   --repeat N    runs of each job per boot, interleaved (default 1); a
#                 boot's ratio is then of the two targets' median IOPS
#   --icount SHIFT  guest time counts instructions (see bench.sh): the
#                 ratios then compare what each write costs in
#                 instructions, and boots of one build agree within a few
#                 percent
#   --out DIR     keep every boot's results here (default
#                 target/vm-ab/DATE-TIME)
# Takes about (runtime + ramp) x 2 x jobs x repeat + 40 s per boot.
# REPLBLK_BENCH_PIN and the other REPLBLK_BENCH_* pass through to bench.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
rounds=3 jobs="randwrite-qd1 randwrite-qd32" target=replblk-0 runtime=15 backing=tmpfs repeats=1 icount="" out=""
builds=()
say() { echo "ab.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }
usage() { sed -n '2,30p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=${2:?}; shift 2 ;;
        --jobs) jobs=${2:?}; shift 2 ;;
        --target) target=${2:?}; shift 2 ;;
        --runtime) runtime=${2:?}; shift 2 ;;
        --backing) backing=${2:?}; shift 2 ;;
        --repeat) repeats=${2:?}; shift 2 ;;
        --icount) icount=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        *=*) builds+=("$1"); shift ;;
        *) say "unknown argument: $1"; usage ;;
    esac
done
[ "${#builds[@]}" -ge 1 ] || usage
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive number"
[[ $repeats =~ ^[1-9][0-9]*$ ]] || die "--repeat must be a positive number"
for build in "${builds[@]}"; do
    dir=${build#*=}
    [ -x "$dir/replblkd" ] && [ -x "$dir/replblk-ctl" ] \
        || die "${build%%=*}: no replblkd and replblk-ctl in $dir"
done
out=${out:-$repo/target/vm-ab/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The median of v[1..n], sorting v in place (insertion sort: a handful of
# runs or rounds). Prepended to the awk programs below.
awk_median='
function median(v, n,    i, k, x) {
    for (i = 2; i <= n; i++) { x = v[i]; k = i - 1; while (k > 0 && v[k] > x) { v[k + 1] = v[k]; k-- } v[k + 1] = x }
    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}'
# One line per boot: build, round, job, ratio (replblk IOPS / libublk loop IOPS).
ratios="$out/ratios.tsv"
: > "$ratios"
for round in $(seq 1 "$rounds"); do
    for build in "${builds[@]}"; do
        name=${build%%=*} dir=${build#*=}
        run="$out/$name-$round"
        say "round $round of $rounds: $name"
        if ! "$here/bench.sh" --replblk-bin "$dir" --jobs "$jobs" \
            --targets "libublk-loop $target" --runtime "$runtime" --backing "$backing" \
            --repeat "$repeats" ${icount:+--icount "$icount"} \
            --out "$run" \
            > "$run.log" 2>&1; then
            say "warning: $name's boot $round failed; see $run.log"
        fi
        [ -f "$run/rows.tsv" ] || continue
        awk -F'\t' -v build="$name" -v round="$round" -v target="$target" "$awk_median"'
            $1 == "libublk-loop" { base[$2, ++nb[$2]] = $3 }
            $1 == target { mine[$2, ++nm[$2]] = $3; jobs[$2] = 1 }
            # The median of a job'"'"'s runs on one target (its --repeat runs).
            function runs_median(values, job, n,    i, v) {
                for (i = 1; i <= n; i++) v[i] = values[job, i] + 0
                return median(v, n)
            }
            END {
                for (job in jobs) if (nb[job] > 0 && runs_median(base, job, nb[job]) > 0)
                    printf "%s\t%s\t%s\t%.2f\n", build, round, job,
                        runs_median(mine, job, nm[job]) / runs_median(base, job, nb[job])
            }' "$run/rows.tsv" >> "$ratios"
    done
done

echo "$target IOPS / libublk loop IOPS of the same boot ($rounds rounds, backing files on $backing; results in $out)"
echo
echo "| build | job | per round | median |"
echo "|---|---|---|---:|"
for build in "${builds[@]}"; do
    name=${build%%=*}
    for job in $jobs; do
        awk -F'\t' -v build="$name" -v job="$job" "$awk_median"'
            $1 == build && $3 == job { r[$2] = $4; n++ }
            END {
                if (n == 0) { printf "| %s | %s | (no result) | |\n", build, job; exit }
                line = ""; k = 0
                for (i = 1; i <= 1000; i++) if (i in r) { line = line (k ? ", " : "") r[i] "x"; v[++k] = r[i] + 0 }
                printf "| %s | %s | %s | %.2fx |\n", build, job, line, median(v, k)
            }' "$ratios"
    done
done
