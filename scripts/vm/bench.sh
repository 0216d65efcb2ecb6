#!/usr/bin/env bash
# Benchmarks ublk devices in the test VM against the kernel's loop device:
# scripts/fio/run.sh's four jobs on the kernel loop driver (losetup
# --direct-io=on), libublk's `loop` example, and replblk's /dev/ublkbN with
# 0 and 2 secondaries, in one guest boot, each over a file of the same size
# on the same storage (a tmpfs, or ext4 on a RAM disk); then a Markdown table of the results with each target's ratio
# to the kernel loop device and to libublk's loop example of the same run.
# Under TCG the absolute numbers mean little; the ratios count.
#
# Usage: scripts/vm/bench.sh [--runtime S] [--ramp S] [--size-mib N]
#            [--jobs "JOB..."] [--targets "TARGET..."] [--out DIR]
#            [--markdown FILE] [--no-build] [--replblk-bin DIR]
#            [--replblk-wait S] [--timeout S] [--backing tmpfs|ext4-ram]
#            [--repeat N] [--icount SHIFT]
#   --runtime S       measured seconds per job and target (default 15)
#   --ramp S          unmeasured seconds before each (default 2)
#   --size-mib N      size of every device and backing file (default 256)
#   --jobs, --targets subsets (default: all four jobs; kernel-loop
#                     libublk-loop replblk-0 replblk-2)
#   --out DIR         keep the fio JSON, daemon logs, guest console and the
#                     table here (default target/vm-bench/DATE-TIME)
#   --markdown FILE   also write the table (with its header lines) to FILE
#   --no-build        use target/release/{replblkd,replblk-ctl} as they are,
#                     without cargo build --release first
#   --replblk-bin DIR take replblkd and replblk-ctl from DIR instead of
#                     target/release, and build nothing (scripts/vm/ab.sh
#                     compares builds this way)
#   --replblk-wait S  how long replblkd primary gets to make its device, and
#                     its secondaries to answer (default 30)
#   --timeout S       for the whole guest run (default: from the above)
#   --backing B       where the backing files go in the guest: tmpfs
#                     (default) or ext4-ram, ext4 on a brd RAM disk (see
#                     bench-guest.sh for why it matters)
#   --repeat N        run the interleaved jobs N times over in the boot
#                     (default 1); the table gives each job and target's
#                     median run (by IOPS, by MiB/s for seqwrite-1m), and
#                     the ratios are of those medians
#   --icount SHIFT    run the guest with qemu's -icount shift=SHIFT,sleep=off:
#                     its clock advances 2^SHIFT ns per guest instruction
#                     executed (on one host thread for all vCPUs), and jumps
#                     ahead when every vCPU is idle. IOPS then count the
#                     guest instructions each write costs, whatever the host
#                     does meanwhile: repeat runs agree within a few percent
#                     where real-time runs differ by up to 40%. 2 gives a
#                     250 MIPS guest. Not a real machine's timing: use it to
#                     compare builds, and for what costs CPU (docs/VM.md)
#
# A replblk target that cannot make a device is reported "not available"
# and the run carries on. libublk's loop example is built once from the
# crate source in ~/.cargo/registry (libclang-dev is installed for its
# bindgen) and cached under /var/cache/replblk-vm/libublk-loop. The replblk
# binaries are copied into DIR for the run, so a rebuild meanwhile does not
# change them under the guest. Must run as root (apt-get, qemu, the cache).
# Environment: REPLBLK_VM_MEM (default 4096 here: the guest's tmpfs holds
# every target's files at once), the other REPLBLK_VM_* of run.sh, and
# REPLBLK_BENCH_TOML, REPLBLK_BENCH_LOG_BYTES, REPLBLK_BENCH_PRIMARY_ARGS,
# REPLBLK_BENCH_PERF_S (a profile of each run: perf/ in DIR),
# REPLBLK_BENCH_COUNTERS_S (the server's counters: counters/ in DIR),
# REPLBLK_BENCH_THP (the guest's transparent huge pages),
# REPLBLK_BENCH_PIN (the servers on one vCPU, fio on the other),
# passed to bench-guest.sh (see there).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${REPLBLK_VM_CACHE:-/var/cache/replblk-vm}
libublk_version=${REPLBLK_LIBUBLK_VERSION:-0.4.8}
runtime=15 ramp=2 size_mib=256 out="" markdown="" build=1 replblk_wait=30 timeout="" backing=tmpfs repeats=1 icount=""
replblk_bin=""
jobs="randwrite-qd1 randwrite-qd32 seqwrite-1m randrw-70-30"
targets="kernel-loop libublk-loop replblk-0 replblk-2"

say() { echo "bench.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }
usage() { sed -n '2,61p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --runtime) runtime=${2:?}; shift 2 ;;
        --ramp) ramp=${2:?}; shift 2 ;;
        --size-mib) size_mib=${2:?}; shift 2 ;;
        --jobs) jobs=${2:?}; shift 2 ;;
        --targets) targets=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --markdown) markdown=${2:?}; shift 2 ;;
        --no-build) build=0; shift ;;
        --replblk-bin) replblk_bin=$(cd "${2:?}" && pwd); build=0; shift 2 ;;
        --replblk-wait) replblk_wait=${2:?}; shift 2 ;;
        --timeout) timeout=${2:?}; shift 2 ;;
        --backing) backing=${2:?}; shift 2 ;;
        --repeat) repeats=${2:?}; shift 2 ;;
        --icount) icount=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        *) say "unknown option: $1"; usage ;;
    esac
done
for n in "$runtime" "$ramp" "$size_mib" "$replblk_wait" "$repeats" ${timeout:+"$timeout"} ${icount:+"$icount"}; do
    [[ $n =~ ^[0-9]+$ ]] || die "expected whole numbers, got $n"
done
case $backing in tmpfs|ext4-ram) ;; *) die "--backing: tmpfs or ext4-ram" ;; esac
for job in $jobs; do [ -f "$repo/scripts/fio/$job.fio" ] || die "no job $job"; done
for t in $targets; do
    case $t in kernel-loop|libublk-loop|replblk-0|replblk-2) ;; *) die "--targets: unknown target $t" ;; esac
done
# Each target is one device of the boot: a second mention would set it up again.
[ -z "$(tr ' ' '\n' <<< "$targets" | sed '/^$/d' | sort | uniq -d)" ] \
    || die "--targets: a target named twice ($targets)"
n_targets=$(wc -w <<< "$targets")
n_jobs=$(wc -w <<< "$jobs")
# Per fio: runtime, ramp, and fio's start and teardown under TCG (~10 s),
# with room; plus boot, the devices' setup and teardown.
timeout=${timeout:-$((600 + 4 * replblk_wait + repeats * n_targets * n_jobs * (runtime + ramp + 60)))}
[ "$(id -u)" = 0 ] || die "must run as root (apt-get, qemu, $cache)"

# --- host side: the VM, fio and jq, libublk's loop example --------------------
"$here/setup.sh" --quiet || die "scripts/vm/setup.sh failed"

# Runs a command with its output kept aside, shown only if it fails.
logged() {
    local log rc=0
    log=$(mktemp)
    "$@" > "$log" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then cat "$log" >&2; fi
    rm -f "$log"
    return "$rc"
}

loop_dir="$cache/libublk-loop"
loop_bin="$loop_dir/bin/loop"
build_libublk_loop() {
    local src stamp
    src=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d \
        -name "libublk-$libublk_version" 2>/dev/null | head -n 1)
    [ -n "$src" ] || die "libublk-$libublk_version's source is not in ~/.cargo/registry/src (a cargo fetch of a crate that depends on it puts it there)"
    stamp="libublk-$libublk_version $(rustc -V)"
    if [ -x "$loop_bin" ] && [ "$(cat "$loop_dir/bin/stamp" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    if ! dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q 'ok installed'; then
        say "installing libclang-dev (bindgen, for libublk-rs-sys)"
        logged env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libclang-dev \
            || die "apt-get install libclang-dev failed"
    fi
    say "building libublk $libublk_version's loop example (about 2 minutes on 2 cores)"
    mkdir -p "$loop_dir/bin"
    # A copy, so that the build's Cargo.lock and target/ stay out of the
    # registry; cp -a keeps the mtimes, so a rebuild reuses target/.
    rm -rf "$loop_dir/src"
    cp -a "$src" "$loop_dir/src"
    (cd "$loop_dir/src" && CARGO_TARGET_DIR="$loop_dir/target" \
        logged cargo build --release --example loop) || die "building libublk's loop example failed"
    cp "$loop_dir/target/release/examples/loop" "$loop_bin.tmp"
    mv "$loop_bin.tmp" "$loop_bin"
    echo "$stamp" > "$loop_dir/bin/stamp"
}
build_libublk_loop

if [ "$build" = 1 ]; then
    say "cargo build --release --workspace"
    (cd "$repo" && logged cargo build --release --workspace) \
        || say "warning: building replblk failed; its rows use target/release as it is, if there"
fi

# --- the guest run ------------------------------------------------------------
out=${out:-$repo/target/vm-bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
case $out in /tmp/*) die "--out must not be under /tmp (the guest hides the host's /tmp)" ;; esac
rm -rf "${out:?}/bin"
mkdir -p "$out/bin"
# The host's load during the run (qemu itself accounts for about 2): other
# work on the machine slows the guest down unevenly.
(while :; do echo "$(date +%s) $(cut -d' ' -f1 /proc/loadavg)"; sleep 5; done) > "$out/host-load.txt" &
load_pid=$!
trap 'kill "$load_pid" 2>/dev/null || true; rm -rf "${out:?}/bin"' EXIT
replblk_built=""
for b in replblkd replblk-ctl; do
    if [ -x "${replblk_bin:-$repo/target/release}/$b" ]; then
        cp -p "${replblk_bin:-$repo/target/release}/$b" "$out/bin/"
    fi
done
if [ -x "$out/bin/replblkd" ]; then
    replblk_built=", replblkd built $(date -r "$out/bin/replblkd" '+%H:%M')"
fi
replblk_rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no -- src ublk tools Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    replblk_rev="$replblk_rev+uncommitted"
fi
if [ -n "$replblk_bin" ]; then replblk_rev="binaries from $replblk_bin"; fi

export REPLBLK_VM_MEM=${REPLBLK_VM_MEM:-4096}
if [ -n "$icount" ]; then
    export REPLBLK_VM_QEMU_ARGS="${REPLBLK_VM_QEMU_ARGS:-} -icount shift=$icount,sleep=off"
fi
envs=()
for v in REPLBLK_BENCH_TOML REPLBLK_BENCH_LOG_BYTES REPLBLK_BENCH_PRIMARY_ARGS REPLBLK_BENCH_PERF_S REPLBLK_BENCH_COUNTERS_S REPLBLK_BENCH_THP REPLBLK_BENCH_PIN RUST_LOG; do
    if [ -n "${!v:-}" ]; then envs+=(--env "$v=${!v}"); fi
done
say "guest run: $n_targets targets x $n_jobs jobs of ${runtime}+${ramp} s, timeout $timeout s; output in $out"
t0=$SECONDS
rc=0
# run.sh hands the guest one command line: quote every word.
guest_cmd=$(printf '%q ' "$here/bench-guest.sh" --out /mnt/results --loop-bin "$loop_bin" \
    --replblk-bin /mnt/results/bin --runtime "$runtime" --ramp "$ramp" \
    --size "$((size_mib << 20))" --jobs "$jobs" --targets "$targets" \
    --replblk-wait "$replblk_wait" --backing "$backing" --repeat "$repeats")
"$here/run.sh" --timeout "$timeout" --results "$out" --log "$out/console.log" "${envs[@]}" \
    -- "$guest_cmd" || rc=$?
wall=$((SECONDS - t0))
kill "$load_pid" 2>/dev/null || true
load_range=$(awk 'NR == 1 || $2 < lo {lo = $2} NR == 1 || $2 > hi {hi = $2} END {print lo "-" hi}' "$out/host-load.txt")
[ -f "$out/rows.tsv" ] || die "the guest run produced no results (exit $rc); see $out/console.log"

# --- the table ----------------------------------------------------------------
env_get() { awk -F'\t' -v k="$1" '$1 == k {print $2; exit}' "$out/env.tsv"; }
onoff() { case $1 in 1|on) echo on ;; 0|off) echo off ;; *) echo "unknown" ;; esac; }
{
    echo "Run $(date +%Y-%m-%d), replblk $replblk_rev$replblk_built; guest kernel $(env_get guest_kernel)"
    echo "under $(qemu-system-x86_64 --version | head -n 1 | sed 's/ (.*//') TCG${icount:+ with -icount shift=$icount,sleep=off (guest time counts instructions)}, $(env_get guest_cpus) vCPUs,"
    echo "$(env_get guest_mem_mib) MiB; host: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo),"
    echo "kernel $(uname -r). $(env_get fio), $(cut -f 7 "$out/rows.tsv" | sort -u | paste -sd/),"
    case $(env_get backing) in
        ext4-ram) where="ext4 on a brd RAM disk" ;;
        *) where="a tmpfs" ;;
    esac
    echo "O_DIRECT, $(( $(env_get size_bytes) >> 20 )) MiB devices over files on $where in the guest,"
    echo "$(env_get runtime_s) s measured after $(env_get ramp_s) s ramp per job and target, jobs interleaved"
    echo "across targets; $((wall / 60)) min $((wall % 60)) s for the whole run; host load average"
    echo "(1 min) $load_range during it."
    if [ "$(env_get repeats)" -gt 1 ] 2>/dev/null; then
        echo "Every job ran $(env_get repeats) times on every target, interleaved; the table shows each one's median run."
    fi
    if [ -n "$(env_get pinned)" ]; then echo "Pinned: $(env_get pinned)."; fi
    echo "Kernel loop: direct I/O $(onoff "$(env_get kernel_loop_dio)") (/sys/block/loopN/loop/dio);"
    echo "libublk loop: backing file O_DIRECT $(onoff "$(env_get libublk_loop_odirect)") (fdinfo flags $(env_get libublk_loop_flags))."
    while IFS=$'\t' read -r t reason; do
        echo "$t: not available ($reason)."
    done < "$out/unavailable.tsv"
    echo
    awk -F'\t' -v jobs="$jobs" -v targets="$targets" '
        # With --repeat a job and target have several rows: keep the
        # median one (by the figure the ratios use).
        FILENAME == ARGV[1] {
            k = ++runs[$1, $2]; row[$1, $2, k] = $0
            key[$1, $2, k] = ($2 == "seqwrite-1m") ? $4 : $3
            have[$1, $2] = 1; next
        }
        { na[$1] = 1 }
        function pick(t, j,    k, i, x, m, order, f) {
            m = runs[t, j]
            for (k = 1; k <= m; k++) order[k] = k
            for (i = 2; i <= m; i++) {
                x = order[i]; k = i - 1
                while (k > 0 && key[t, j, order[k]] + 0 > key[t, j, x] + 0) { order[k + 1] = order[k]; k-- }
                order[k + 1] = x
            }
            split(row[t, j, order[int((m + 1) / 2)]], f, "\t")
            iops[t, j] = f[3]; mib[t, j] = f[4]; p50[t, j] = f[5]; p99[t, j] = f[6]
        }
        function ratio(t, base, j,    m) {
            if (!((t, j) in have) || !((base, j) in have)) return "-"
            m = (j == "seqwrite-1m") ? mib[base, j] : iops[base, j]
            if (m <= 0) return "-"
            return sprintf("%.2fx", ((j == "seqwrite-1m") ? mib[t, j] : iops[t, j]) / m)
        }
        END {
            for (tj in have) { split(tj, parts, SUBSEP); pick(parts[1], parts[2]) }
            print "| job | target | IOPS | MiB/s | p50 µs | p99 µs | vs kernel loop | vs libublk loop |"
            print "|---|---|---:|---:|---:|---:|---:|---:|"
            nj = split(jobs, J, " "); nt = split(targets, T, " ")
            for (a = 1; a <= nj; a++) for (b = 1; b <= nt; b++) {
                j = J[a]; t = T[b]
                if ((t, j) in have)
                    printf "| %s | %s | %d | %s | %d | %d | %s | %s |\n", j, t, iops[t, j], mib[t, j],
                        p50[t, j], p99[t, j], ratio(t, "kernel-loop", j), ratio(t, "libublk-loop", j)
                else
                    printf "| %s | %s | %s | | | | | |\n", j, t, (t in na) ? "not available" : "failed"
            }
        }' "$out/rows.tsv" "$out/unavailable.tsv"
    echo
    echo "vs: IOPS (MiB/s for seqwrite-1m) divided by that target's in the same run; higher is better."
    if [ -s "$out/counters/summary.tsv" ]; then
        echo
        echo "Per write, counted in the guest (REPLBLK_BENCH_COUNTERS_S), the serving process:"
        echo
        echo "| job | target | IOPS | thread | CPU µs (perf) | CPU µs (ticks) | io_uring_enter | context switches | user share | io-wq CPU µs (ticks) |"
        echo "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"
        awk -F'\t' '{printf "| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10}' \
            "$out/counters/summary.tsv"
    fi
} > "$out/table.md"
cat "$out/table.md"
# --markdown may name the table itself (--out DIR --markdown DIR/table.md).
if [ -n "$markdown" ] && ! [ "$markdown" -ef "$out/table.md" ]; then
    cp "$out/table.md" "$markdown"
fi
say "guest run exit $rc, $wall s; results in $out"
exit "$rc"
