#!/usr/bin/env bash
# The guest half of scripts/vm/bench.sh: brings up the block devices to
# compare, each over a file of the same size on the same storage, runs
# scripts/fio/run.sh's jobs on each, and tears them down.
#
#   kernel-loop   the kernel's loop driver, losetup --direct-io=on
#   libublk-loop  libublk's `loop` example (-a: async/await handling)
#   replblk-0     replblkd primary with no secondaries, its /dev/ublkbN
#   replblk-2     the same with 2 secondaries on 127.0.0.1
#
# All devices are set up first and the jobs interleaved (every target runs
# job 1, then every target job 2, ...), so that a slowdown of the shared
# host lands on all targets of a job alike; idle devices cost next to
# nothing meanwhile. A replblk target whose device does not appear (the
# daemon exits, or prints no `ublk device: /dev/ublkbN` line and no new
# /dev/ublkb* shows up within --replblk-wait seconds) is reported as not
# available and skipped; the run carries on.
#
# Storage (--backing): tmpfs (default), or ext4-ram: ext4 on a brd RAM disk.
# On tmpfs, io_uring cannot write without blocking and hands every write to
# an io-wq worker thread (an extra wake-up per write, which TCG makes
# expensive); the kernel loop driver calls the file's write_iter directly.
# On ext4 over brd, O_DIRECT overwrites of written blocks complete inline.
#
# Usage (in the guest, as root; bench.sh passes all of these):
#   bench-guest.sh --out DIR --loop-bin PATH --replblk-bin DIR
#                  [--runtime S] [--ramp S] [--size BYTES] [--jobs "JOB..."]
#                  [--targets "TARGET..."] [--replblk-wait S]
#                  [--backing tmpfs|ext4-ram] [--repeat N]
# --repeat N runs the interleaved jobs N times over (a row per run).
# Writes to DIR: rows.tsv (scripts/fio/run.sh --tsv), unavailable.tsv
# (target, reason), env.tsv (key, value), json/ (the last run's of each job
# and target), logs/.
# Environment: REPLBLK_BENCH_TOML, TOML appended to each replblk config
# (start it with a table header, e.g. "[device]"); REPLBLK_BENCH_LOG_BYTES,
# each replblk node's log size (default 64 MiB); REPLBLK_BENCH_PERF_S, when
# set, profiles every job on every target: `perf record -a` (cpu-clock, no
# call graphs) for that many seconds from 1 s after the ramp (counted from
# the start of fio's job process), the samples'
# shares by thread and function written to perf/JOB.TARGET.txt, and by
# thread alone to perf/JOB.TARGET.threads.txt. A profiled run's figures
# are not comparable with an unprofiled one's. REPLBLK_BENCH_COUNTERS_S,
# when set, counts for that many seconds, from the same moment, the
# serving process's CPU time, context switches and system calls
# (`perf stat --per-thread`; io_uring_enter apart) into
# counters/JOB.TARGET.txt: what each write costs the server, thread by
# thread (a line each in counters/summary.tsv). It cannot be set with
# REPLBLK_BENCH_PERF_S. REPLBLK_BENCH_THP (always, madvise or never), when
# set, is written to the guest's transparent_hugepage/enabled before any
# target starts. REPLBLK_BENCH_PIN, when set, pins the servers and fio (see
# pin_servers below).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
fio_run="$here/../fio/run.sh"
out="" loop_bin="" replblk_bin=""
runtime=15 ramp=2 size=$((256 << 20)) replblk_wait=30 backing=tmpfs repeats=1
jobs="randwrite-qd1 randwrite-qd32 seqwrite-1m randrw-70-30"
targets="kernel-loop libublk-loop replblk-0 replblk-2"
while [ $# -gt 0 ]; do
    case $1 in
        --out) out=${2:?}; shift 2 ;;
        --loop-bin) loop_bin=${2:?}; shift 2 ;;
        --replblk-bin) replblk_bin=${2:?}; shift 2 ;;
        --runtime) runtime=${2:?}; shift 2 ;;
        --ramp) ramp=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --jobs) jobs=${2:?}; shift 2 ;;
        --targets) targets=${2:?}; shift 2 ;;
        --replblk-wait) replblk_wait=${2:?}; shift 2 ;;
        --backing) backing=${2:?}; shift 2 ;;
        --repeat) repeats=${2:?}; shift 2 ;;
        *) echo "bench-guest.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
if [ -z "$out" ] || [ -z "$loop_bin" ] || [ -z "$replblk_bin" ]; then
    echo "bench-guest.sh: --out, --loop-bin and --replblk-bin are required" >&2; exit 2
fi
if ! [[ $size =~ ^[0-9]+$ ]] || [ $((size % (1 << 20))) != 0 ]; then
    echo "bench-guest.sh: --size must be a whole number of MiB, in bytes" >&2; exit 2
fi
log_bytes=${REPLBLK_BENCH_LOG_BYTES:-$((64 << 20))}

say() { echo "bench [$(printf '%4d' "$SECONDS") s]: $*"; }
mkdir -p "$out/json" "$out/logs"
: > "$out/rows.tsv"
: > "$out/unavailable.tsv"
: > "$out/env.tsv"
env_put() { printf '%s\t%s\n' "$1" "$2" >> "$out/env.tsv"; }

# Every file lives on a filesystem of its own, big enough for all targets
# at once: 6 copies (one per loop device, one per replblk node), 4 logs.
work=/tmp/bench
mkdir -p "$work"
fs_mib=$(( (size * 6 + log_bytes * 4) / (1 << 20) + 256 ))
case $backing in
    tmpfs)
        mount -t tmpfs -o "size=${fs_mib}m,mode=700" bench-tmpfs "$work" ;;
    ext4-ram)
        # rd_size is in KiB; ext4's metadata fits in the extra 256 MiB.
        modprobe brd rd_nr=1 rd_size=$((fs_mib * 1024)) max_part=0
        mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/ram0
        mount -t ext4 /dev/ram0 "$work" ;;
    *) echo "bench-guest.sh: --backing tmpfs or ext4-ram" >&2; exit 2 ;;
esac

# --- teardown: everything started is registered here -------------------------
declare -A dev_of=()          # target -> /dev/...
loopdev="" ublk_pid="" ublk_id=""
declare -A primary_pid=() secondary_pids=() replblk_dir=()
stop_pid() { # pid seconds: TERM, wait up to seconds, then KILL
    local pid=$1 deadline=$((SECONDS + $2))
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    while [ "$SECONDS" -lt "$deadline" ]; do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
ublk_del() { # id: delete ublk device N (any ublk device, not only the example's)
    [ -e "/dev/ublkc$1" ] || [ -e "/dev/ublkb$1" ] || return 0
    timeout 60 "$loop_bin" del -n "$1" >> "$out/logs/ublk-del.log" 2>&1 \
        || say "warning: deleting ublk device $1 failed (see logs/ublk-del.log)"
}
stop_replblk() { # target
    local t=$1 pid dev=${dev_of[$1]:-}
    if [ -n "${primary_pid[$t]:-}" ]; then
        stop_pid "${primary_pid[$t]}" 60
        primary_pid[$t]=""
    fi
    # A primary that died uncleanly may leave its device for recovery.
    if [[ $dev == /dev/ublkb* ]]; then ublk_del "${dev#/dev/ublkb}"; fi
    for pid in ${secondary_pids[$t]:-}; do stop_pid "$pid" 30; done
    secondary_pids[$t]=""
    if [ -n "${replblk_dir[$t]:-}" ]; then rm -rf "${replblk_dir[$t]}"; fi
    return 0
}
# Tears everything down; run at the end, and by the EXIT trap on failure.
cleanup() {
    local t
    for t in "${!replblk_dir[@]}"; do stop_replblk "$t"; done
    replblk_dir=()
    if [ -n "$ublk_pid" ]; then
        ublk_del "$ublk_id"
        stop_pid "$ublk_pid" 30
        ublk_pid=""
    fi
    if [ -n "$loopdev" ]; then losetup -d "$loopdev" || true; loopdev=""; fi
    if mountpoint -q "$work"; then umount "$work" || true; fi
    if [ "$backing" = ext4-ram ]; then rmmod brd 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

unavailable() { # target reason
    case $1 in
        replblk-*) say "replblk: not available ($1: $2)" ;;
        *) say "$1: not available ($2)" ;;
    esac
    printf '%s\t%s\n' "$1" "$2" >> "$out/unavailable.tsv"
}

# Allocates the first $size bytes of a file up front, so that no target pays
# for allocation inside a measurement. On ext4 they are written, not
# fallocated: a write into an unwritten extent cannot complete without
# blocking, and io_uring would punt it to a worker.
allocate() { # path
    case $backing in
        tmpfs) fallocate -o 0 -l "$size" "$1" ;;
        *) dd if=/dev/zero of="$1" bs=1M count=$((size >> 20)) conv=notrunc oflag=direct status=none ;;
    esac
}
backing_file() { # path
    rm -f "$1"
    allocate "$1"
}

# --- (1) the kernel's loop device -----------------------------------------------
setup_kernel_loop() {
    backing_file "$work/kernel-loop.img"
    loopdev=$(losetup --direct-io=on -f --show "$work/kernel-loop.img") || {
        unavailable kernel-loop "losetup failed"; return 0; }
    local dio
    dio=$(cat "/sys/block/${loopdev#/dev/}/loop/dio" 2>/dev/null || echo "?")
    env_put kernel_loop_dio "$dio"
    env_put kernel_loop_lbs "$(cat "/sys/block/${loopdev#/dev/}/queue/logical_block_size")"
    say "kernel-loop: $loopdev, direct I/O ${dio/1/on}"
    dev_of[kernel-loop]=$loopdev
}

# --- (2) libublk's loop example ---------------------------------------------------
# The backing file's open flags, from the daemon's fdinfo: did the example's
# fcntl(F_SETFL, O_DIRECT) take?
fd_flags_of() { # pid path
    local fd
    for fd in /proc/"$1"/fd/*; do
        if [ "$(readlink "$fd")" = "$2" ]; then
            awk '/^flags:/ {print $2}' "/proc/$1/fdinfo/${fd##*/}"
            return 0
        fi
    done
}
setup_libublk_loop() {
    [ -x "$loop_bin" ] || { unavailable libublk-loop "no $loop_bin"; return 0; }
    backing_file "$work/libublk-loop.img"
    # A fixed id well away from those the driver hands out from 0.
    ublk_id=${REPLBLK_BENCH_LIBUBLK_ID:-10}
    RUST_LOG=warn "$loop_bin" add -n "$ublk_id" --foreground -a -f "$work/libublk-loop.img" \
        > "$out/logs/libublk-loop.out" 2>&1 &
    ublk_pid=$!
    local dev=/dev/ublkb$ublk_id deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
        [ -b "$dev" ] && break
        kill -0 "$ublk_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ ! -b "$dev" ]; then
        unavailable libublk-loop "no $dev after 60 s (logs/libublk-loop.out)"
        return 0
    fi
    local flags
    flags=$(fd_flags_of "$ublk_pid" "$work/libublk-loop.img")
    env_put libublk_loop_flags "$flags"
    # O_DIRECT is 040000 (octal) on x86.
    local odirect=off
    if [ -n "$flags" ] && (( (8#$flags & 8#40000) != 0 )); then odirect=on; fi
    env_put libublk_loop_odirect "$odirect"
    env_put libublk_loop_lbs "$(cat "/sys/block/ublkb$ublk_id/queue/logical_block_size")"
    say "libublk-loop: $dev (pid $ublk_pid), backing file O_DIRECT $odirect"
    dev_of[libublk-loop]=$dev
}

# --- (3), (4) replblk ---------------------------------------------------------------
# The commands, overridable: REPLBLKD, REPLBLK_CTL; REPLBLK_BENCH_PRIMARY_ARGS
# is appended to `replblkd primary --config CFG --node 1`.
replblkd=${REPLBLKD:-$replblk_bin/replblkd}
replblk_ctl=${REPLBLK_CTL:-$replblk_bin/replblk-ctl}
ublk_devices() { local d; for d in /dev/ublkb*; do [ -b "$d" ] && echo "$d"; done; true; }
setup_replblk() { # target secondaries port-base
    local t=$1 nsec=$2 port=$3 dir id cfg deadline
    if [ ! -x "$replblkd" ] || [ ! -x "$replblk_ctl" ]; then
        unavailable "$t" "no $replblkd or $replblk_ctl"; return 0
    fi
    dir="$work/$t"
    replblk_dir[$t]=$dir
    mkdir -p "$dir"
    cfg="$dir/volume.toml"
    {
        echo "[volume]"
        echo "uuid = \"$(cat /proc/sys/kernel/random/uuid)\""
        echo "size_bytes = $size"
        echo "block_size_bytes = 4096"
        for ((id = 1; id <= nsec + 1; id++)); do
            echo
            echo "[[node]]"
            echo "id = $id"
            echo "address = \"127.0.0.1:$((port + id))\""
            echo "data_path = \"$dir/node$id.data\""
            echo "log_path = \"$dir/node$id.log\""
            echo "log_size_bytes = $log_bytes"
        done
        if [ -n "${REPLBLK_BENCH_TOML:-}" ]; then echo; printf '%s\n' "$REPLBLK_BENCH_TOML"; fi
    } > "$cfg"
    cp "$cfg" "$out/logs/$t.toml"
    for ((id = 1; id <= nsec + 1; id++)); do
        if ! "$replblk_ctl" init --config "$cfg" --node "$id" >> "$out/logs/$t.ctl.log" 2>&1; then
            unavailable "$t" "replblk-ctl init failed: $(tail -n 1 "$out/logs/$t.ctl.log")"
            return 0
        fi
        # Allocate the copy now (the superblock after it stays as it is).
        allocate "$dir/node$id.data"
    done
    say "$t: created $((nsec + 1)) nodes' files"
    for ((id = 2; id <= nsec + 1; id++)); do
        RUST_LOG=${RUST_LOG:-info} "$replblkd" secondary --config "$cfg" --node "$id" \
            > "$out/logs/$t.node$id.log" 2>&1 &
        secondary_pids[$t]+="$! "
    done
    for ((id = 2; id <= nsec + 1; id++)); do
        deadline=$((SECONDS + replblk_wait))
        while [ "$SECONDS" -lt "$deadline" ]; do
            timeout 10 "$replblk_ctl" status --config "$cfg" --node "$id" >/dev/null 2>&1 && break
            sleep 0.5
        done
        timeout 10 "$replblk_ctl" status --config "$cfg" --node "$id" >/dev/null 2>&1 || {
            unavailable "$t" "secondary $id did not answer within $replblk_wait s (logs/$t.node$id.log)"
            return 0; }
    done
    if [ "$nsec" -gt 0 ]; then say "$t: $nsec secondaries answer"; fi
    local before dev="" line
    before=$(ublk_devices | tr '\n' ' ')
    # shellcheck disable=SC2086  # extra arguments, split on blanks
    RUST_LOG=${RUST_LOG:-info} "$replblkd" primary --config "$cfg" --node 1 \
        ${REPLBLK_BENCH_PRIMARY_ARGS:-} > "$out/logs/$t.node1.log" 2>&1 &
    primary_pid[$t]=$!
    # Counted in seconds, not polls: a poll costs a few forks, slow under TCG.
    deadline=$((SECONDS + replblk_wait))
    while [ "$SECONDS" -lt "$deadline" ]; do
        line=$(grep -o 'ublk device: /dev/ublkb[0-9]*' "$out/logs/$t.node1.log" | head -n 1 || true)
        if [ -n "$line" ]; then dev=${line#ublk device: }; fi
        if [ -z "$dev" ]; then
            # (No <(...) here: the guest's devtmpfs has no /dev/fd.)
            local d new="" n=0
            for d in $(ublk_devices); do
                case " $before " in *" $d "*) ;; *) new=$d; n=$((n + 1)) ;; esac
            done
            if [ "$n" = 1 ]; then dev=$new; fi
        fi
        if [ -n "$dev" ] && [ -b "$dev" ]; then break; fi
        if ! kill -0 "${primary_pid[$t]}" 2>/dev/null; then
            unavailable "$t" "replblkd primary exited: $(tail -n 1 "$out/logs/$t.node1.log")"
            return 0
        fi
        sleep 0.2
    done
    if [ -z "$dev" ] || [ ! -b "$dev" ]; then
        unavailable "$t" "replblkd primary made no ublk device within $replblk_wait s"
        return 0
    fi
    say "$t: $dev (primary pid ${primary_pid[$t]}, $nsec secondaries)"
    dev_of[$t]=$dev
}

# --- the run ----------------------------------------------------------------------
env_put guest_kernel "$(uname -r)"
env_put guest_cpus "$(nproc)"
env_put guest_mem_mib "$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
if [ -n "${REPLBLK_BENCH_THP:-}" ]; then
    echo "$REPLBLK_BENCH_THP" > /sys/kernel/mm/transparent_hugepage/enabled \
        || { say "REPLBLK_BENCH_THP: cannot set transparent huge pages to $REPLBLK_BENCH_THP"; exit 2; }
fi
env_put guest_thp "$(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo none)"
env_put fio "$(fio --version)"
env_put size_bytes "$size"
env_put backing "$backing"
env_put runtime_s "$runtime"
env_put repeats "$repeats"
env_put ramp_s "$ramp"
t0=$SECONDS
for t in $targets; do
    case $t in
        kernel-loop) setup_kernel_loop ;;
        libublk-loop) setup_libublk_loop ;;
        replblk-0) setup_replblk replblk-0 0 7200 ;;
        replblk-2) setup_replblk replblk-2 2 7300 ;;
        *) say "unknown target $t"; exit 2 ;;
    esac
done
say "setup took $((SECONDS - t0)) s"

perf_s=${REPLBLK_BENCH_PERF_S:-}
if [ -n "$perf_s" ]; then
    [[ $perf_s =~ ^[0-9]+$ ]] && [ "$perf_s" -gt 0 ] && [ "$perf_s" -le "$runtime" ] \
        || { say "REPLBLK_BENCH_PERF_S must be 1..runtime ($runtime), got $perf_s"; exit 2; }
    command -v perf >/dev/null || { say "REPLBLK_BENCH_PERF_S: no perf"; exit 2; }
    mkdir -p "$out/perf"
    # perf's first start in a boot reads its binary and libraries over 9p,
    # which under TCG took longer than a job: the first target's recording
    # began after its fio had ended. One start now, unrecorded.
    perf record -q -a -e cpu-clock -o "$out/perf/warm-up.data" -- true > /dev/null 2>&1 || true
    rm -f "$out/perf/warm-up.data"
fi
counters_s=${REPLBLK_BENCH_COUNTERS_S:-}
if [ -n "$counters_s" ]; then
    [ -z "$perf_s" ] || { say "REPLBLK_BENCH_COUNTERS_S and REPLBLK_BENCH_PERF_S exclude each other"; exit 2; }
    [[ $counters_s =~ ^[0-9]+$ ]] && [ "$counters_s" -gt 0 ] && [ "$counters_s" -le "$runtime" ] \
        || { say "REPLBLK_BENCH_COUNTERS_S must be 1..runtime ($runtime), got $counters_s"; exit 2; }
    command -v perf >/dev/null || { say "REPLBLK_BENCH_COUNTERS_S: no perf"; exit 2; }
    mkdir -p "$out/counters"
    # As for profiles: perf's first start in a boot is slow; not counted.
    perf stat -e task-clock -- true > /dev/null 2>&1 || true
fi
# fio forks its job's process once it has started up, which takes seconds
# under TCG at a boot's first fio: a measurement waits for that process
# (the measured fio's, named by its JSON output; run.sh may probe with
# another fio first), then for the ramp, then one second more.
wait_for_job() { # job target
    local deadline=$((SECONDS + runtime + ramp + 120))
    until [ "$(pgrep -c -f -- '^fio .*--output-format=json' || true)" -ge 2 ]; do
        [ "$SECONDS" -lt "$deadline" ] || { say "$1 on $2: fio's job never started"; return 1; }
        sleep 0.5
    done
    sleep $((ramp + 1))
}
# Counts what the target's serving process does while the job runs.
counters_start() { # job target
    local pid
    case $2 in
        libublk-loop) pid=$ublk_pid ;;
        replblk-*) pid=${primary_pid[$2]} ;;
        *) return 0 ;;
    esac
    wait_for_job "$1" "$2" || return 0
    local file="$out/counters/$1.$2.txt"
    thread_times "$pid" before > "$file"
    perf stat --per-thread -p "$pid" -x, --append -o "$file" \
        -e task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter,duration_time \
        -- sleep "$counters_s" > /dev/null 2>&1 \
        || say "perf stat for $1 on $2 failed"
    thread_times "$pid" after >> "$file"
    awk '/^AnonHugePages:/ {print "anon_huge_kib," $2}' "/proc/$pid/smaps_rollup" >> "$file" 2>/dev/null || true
}
# Each thread's user and system CPU time so far, in clock ticks; then the
# whole process's (threads gone meanwhile included) and the guest's clock.
thread_times() { # pid label
    local stat
    for stat in /proc/"$1"/task/*/stat /proc/"$1"/stat; do
        # After the name's closing parenthesis: fields 3.. of proc(5).
        sed -E 's/^([0-9]+) \((.*)\) (.*)$/\1 \2 \3/' "$stat" 2>/dev/null \
            | awk -v label="$2" -v kind="${stat%/stat}" '{
                n = NF - 52
                if (kind ~ /task/) printf "%s,%s,%s,utime=%s,stime=%s\n", label, $1, $2, $(14 + n), $(15 + n)
                else printf "process,%s,utime=%s,stime=%s\n", label, $(14 + n), $(15 + n)
            }'
    done
    echo "clock,$2,$(date +%s%N)"
}
# One line per busy thread of the counted server in counters/summary.tsv:
# job, target, IOPS, thread, then per write its CPU µs (perf's
# task-clock, and from /proc's clock ticks), io_uring_enter calls and
# context switches, the user share of its CPU time (from the ticks, so
# rough), and the CPU µs of the process's io_uring workers together. Per
# write means over the time perf counted (its duration_time) for perf's
# figures, over the window from `before` to `after` for the ticks'.
# Workers come and go within a window (an idle one exits, a busy pool
# grows), and perf counts only the threads there when it starts: the
# workers' figure is the process's CPU time less its other threads', from
# the ticks.
counters_summary() { # job target
    local file="$out/counters/$1.$2.txt" iops
    [ -s "$file" ] || return 0
    iops=$(awk -F'\t' -v job="$1" -v target="$2" '$1 == target && $2 == job {iops = $3} END {print iops}' "$out/rows.tsv")
    [[ $iops =~ ^[0-9.]+$ ]] || return 0
    awk -F, -v job="$1" -v target="$2" -v iops="$iops" '
        $1 == "before" || $1 == "after" {
            split($4, u, "="); split($5, s, "=")
            user[$1, $2] = u[2]; sys[$1, $2] = s[2]; thread_name[$2] = $3; next
        }
        $1 == "process" {
            split($3, u, "="); split($4, s, "=")
            process[$2] = u[2] + s[2]; next
        }
        $1 == "clock" { clock_ns[$2] = $3; next }
        NF > 3 && $2 != "<not counted>" {
            n = split($1, parts, "-"); tid = parts[n]
            thread = $1; sub("-" tid "$", "", thread)
            name[tid] = thread; value[tid, $4] = $2
        }
        END {
            # Ticks are 10 ms (USER_HZ 100): the workers in µs per write.
            others = 0
            for (key in user) {
                split(key, k, SUBSEP)
                if (k[1] != "after" || thread_name[k[2]] ~ /^iou-wrk/ || !(("before", k[2]) in user)) continue
                others += user["after", k[2]] - user["before", k[2]] + sys["after", k[2]] - sys["before", k[2]]
            }
            window_s = (clock_ns["after"] - clock_ns["before"]) / 1e9
            workers = "-"
            if (window_s > 0 && ("before" in process) && ("after" in process))
                workers = sprintf("%.1f", (process["after"] - process["before"] - others) * 10000 / (iops * window_s))
            for (tid in name) {
                if (name[tid] ~ /^iou-wrk/ || value[tid, "task-clock"] < 50) continue
                writes = iops * value[tid, "duration_time"] / 1e9
                if (writes == 0) continue
                ticks = user["after", tid] - user["before", tid] + sys["after", tid] - sys["before", tid]
                share = ticks > 0 ? sprintf("%.2f", (user["after", tid] - user["before", tid]) / ticks) : "-"
                ticked = window_s > 0 ? sprintf("%.1f", ticks * 10000 / (iops * window_s)) : "-"
                printf "%s\t%s\t%s\t%s\t%.1f\t%s\t%.2f\t%.2f\t%s\t%s\n", job, target, iops, name[tid],
                    value[tid, "task-clock"] * 1000 / writes, ticked,
                    value[tid, "syscalls:sys_enter_io_uring_enter"] / writes,
                    value[tid, "context-switches"] / writes, share, workers
            }
        }' "$file" >> "$out/counters/summary.tsv"
}
# Records the whole guest while a job runs; the report is made afterwards.
profile_start() { # job target
    wait_for_job "$1" "$2" || return 0
    perf record -q -a -e cpu-clock -o "$out/perf/$1.$2.data" -- sleep "$perf_s" \
        > "$out/perf/$1.$2.record.log" 2>&1
}
profile_report() { # job target
    local data="$out/perf/$1.$2.data"
    [ -s "$data" ] || { say "perf: no samples for $1 on $2 (perf/$1.$2.record.log)"; return 0; }
    perf report -i "$data" --stdio --no-children --percent-limit 0.01 \
        --sort comm,dso,sym > "$out/perf/$1.$2.txt" 2>/dev/null || true
    perf report -i "$data" --stdio --no-children --sort comm,pid \
        > "$out/perf/$1.$2.threads.txt" 2>/dev/null || true
    rm -f "$data"
}

# REPLBLK_BENCH_PIN: the servers' threads on the last vCPU, fio on the
# first. Placement is otherwise the guest scheduler's, boot by boot: a
# server sharing fio's vCPU or not changes how many cross-vCPU wake-ups a
# request takes, which TCG makes slow. Threads the servers start later
# (io-wq workers) take io_uring's own mask, not this one.
pin_servers() {
    local last=$(( $(nproc) - 1 )) pid task
    for pid in ${ublk_pid:-} ${primary_pid[*]:-} ${secondary_pids[*]:-}; do
        for task in /proc/"$pid"/task/*; do
            # io_uring's own threads refuse a new mask; they keep theirs.
            taskset -p -c "$last" "${task##*/}" > /dev/null 2>&1 || true
        done
    done
}
fio_prefix=()
if [ -n "${REPLBLK_BENCH_PIN:-}" ]; then
    fio_prefix=(taskset -c 0)
    pin_servers
    env_put pinned "servers on vCPU $(( $(nproc) - 1 )), fio on vCPU 0"
fi

failed=0 engine=()
for repeat in $(seq 1 "$repeats"); do
for job in $jobs; do
    for t in $targets; do
        [ -n "${dev_of[$t]:-}" ] || continue
        say "$job on $t (${dev_of[$t]}), repeat $repeat of $repeats"
        profiler=""
        if [ -n "$perf_s" ]; then profile_start "$job" "$t" & profiler=$!; fi
        if [ -n "$counters_s" ]; then counters_start "$job" "$t" & profiler=$!; fi
        ${fio_prefix[@]+"${fio_prefix[@]}"} "$fio_run" "${dev_of[$t]}" --jobs "$job" --label "$t" --runtime "$runtime" \
            --ramp "$ramp" --size "$size" --json-dir "$out/json" --tsv "$out/rows.tsv" \
            "${engine[@]}" || failed=1
        if [ -n "$profiler" ]; then
            wait "$profiler" || true
            if [ -n "$perf_s" ]; then profile_report "$job" "$t"; fi
            if [ -n "$counters_s" ]; then counters_summary "$job" "$t"; fi
        fi
        # The first run found out whether io_uring works; the others reuse it.
        if [ ${#engine[@]} = 0 ] && [ -s "$out/rows.tsv" ]; then
            engine=(--ioengine "$(tail -n 1 "$out/rows.tsv" | cut -f 7)")
        fi
    done
done
done
t1=$SECONDS
cleanup
trap - EXIT
say "teardown took $((SECONDS - t1)) s"
env_put elapsed_s "$((SECONDS - t0))"
say "done in $((SECONDS - t0)) s"
exit "$failed"
