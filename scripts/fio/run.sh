#!/usr/bin/env bash
# Runs the four fio performance jobs of this directory against a block
# device, one after the other, and prints one row per job: label, job, IOPS,
# MiB/s, and the p50 and p99 completion latency in µs. verify.fio is not
# run (see its header).
#
# Usage: scripts/fio/run.sh DEVICE [--runtime S] [--ramp S] [--size BYTES]
#                           [--label NAME] [--json-dir DIR] [--tsv FILE]
#                           [--jobs "JOB..."] [--ioengine ENGINE]
#   --runtime S     measured seconds per job (default 10)
#   --ramp S        unmeasured seconds before each job's measurement (default 2)
#   --size BYTES    use the first BYTES of DEVICE (default: the device's size,
#                   at most 1 GiB); fio size syntax is accepted (256M, 1G)
#   --label NAME    first column of the rows (default: DEVICE's name)
#   --json-dir DIR  keep each job's fio JSON output as DIR/LABEL.JOB.json
#   --tsv FILE      also append the rows to FILE, tab-separated, unformatted:
#                   label job iops mib_s p50_us p99_us ioengine
#   --jobs "..."    only these jobs (names of the .fio files without .fio)
#   --ioengine E    io_uring or libaio, without probing (see below)
#
# EVERYTHING ON DEVICE IS OVERWRITTEN. It refuses a DEVICE that is not a
# block device, or that (or a partition of which) is mounted or used as swap.
# Each fio runs under timeout (runtime + ramp + 120 s, then KILL 10 s later;
# REPLBLK_FIO_GRACE changes the 120). Unless --ioengine says, io_uring is
# used when a 4 KiB O_DIRECT read of DEVICE through it works, libaio
# otherwise.
# Needs fio, jq (both from apt), timeout, lsblk, blockdev.
# Exit status: 0 when every job ran; 1 when one failed (the others still
# run); 2 on a usage error or a refused device.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
say() { echo "fio/run.sh: $*" >&2; }
usage() { sed -n '2,29p' "$0" >&2; exit 2; }

dev="" runtime=10 ramp=2 size="" label="" json_dir="" tsv="" ioengine=""
jobs="randwrite-qd1 randwrite-qd32 seqwrite-1m randrw-70-30"
while [ $# -gt 0 ]; do
    case $1 in
        --runtime) runtime=${2:?}; shift 2 ;;
        --ramp) ramp=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --label) label=${2:?}; shift 2 ;;
        --json-dir) json_dir=${2:?}; shift 2 ;;
        --tsv) tsv=${2:?}; shift 2 ;;
        --jobs) jobs=${2:?}; shift 2 ;;
        --ioengine) ioengine=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        -*) say "unknown option: $1"; usage ;;
        *) [ -z "$dev" ] || { say "one DEVICE only"; usage; }; dev=$1; shift ;;
    esac
done
[ -n "$dev" ] || { say "no DEVICE given"; usage; }
[[ $runtime =~ ^[1-9][0-9]*$ && $ramp =~ ^[0-9]+$ ]] || { say "--runtime and --ramp take whole seconds"; exit 2; }
for tool in fio jq timeout lsblk blockdev; do
    command -v "$tool" >/dev/null || { say "$tool is not installed (apt-get install -y ${tool/lsblk/util-linux})"; exit 2; }
done
for job in $jobs; do
    [ -f "$here/$job.fio" ] || { say "no job file $here/$job.fio"; exit 2; }
done

# --- the device must be a block device nobody else is using -----------------
[ -b "$dev" ] || { say "refusing $dev: not a block device"; exit 2; }
dev=$(readlink -f "$dev")
mounts=$(lsblk -nro MOUNTPOINTS "$dev" 2>/dev/null | sed '/^$/d' || true)
if [ -z "$mounts" ]; then
    # Older lsblk has MOUNTPOINT only; /proc/mounts catches the device itself.
    mounts=$(awk -v d="$dev" '$1 == d {print $2}' /proc/mounts)
fi
[ -z "$mounts" ] || { say "refusing $dev: mounted on $(echo "$mounts" | tr '\n' ' ')"; exit 2; }
if awk 'NR > 1 {print $1}' /proc/swaps | xargs -r -n1 readlink -f | grep -qx "$dev"; then
    say "refusing $dev: used as swap"; exit 2
fi
dev_bytes=$(blockdev --getsize64 "$dev")
[ "$dev_bytes" -gt 0 ] || { say "refusing $dev: size 0"; exit 2; }
if [ -z "$size" ]; then
    size=$((dev_bytes < (1 << 30) ? dev_bytes : (1 << 30)))
fi
label=${label:-$(basename "$dev")}
[[ $label =~ ^[A-Za-z0-9._+-]+$ ]] || { say "--label: letters, digits and ._+- only"; exit 2; }

grace=${REPLBLK_FIO_GRACE:-120}
limit=$((runtime + ramp + grace))

# --- io_uring, or libaio ----------------------------------------------------
case $ioengine in
    io_uring|libaio) ;;
    "")
        if timeout 60 fio --name=probe --filename="$dev" --ioengine=io_uring --direct=1 \
                --rw=read --bs=4k --size=4k --readonly --output-format=terse >/dev/null 2>&1; then
            ioengine=io_uring
        else
            ioengine=libaio
            say "io_uring does not work here (fio or kernel); using libaio"
        fi ;;
    *) say "--ioengine: io_uring or libaio"; exit 2 ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/replblk-fio.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -n "$json_dir" ]; then mkdir -p "$json_dir"; fi

# One row from fio's JSON: the job's write, or mixed (randrw), section.
# Percentiles are clat_ns, i.e. from submission to completion, in ns.
row_of() { # json-file
    jq -r --arg lbl "$label" --arg engine "$ioengine" '
        .jobs[0] as $j
        | ($j.mixed // (if $j.write.io_bytes > 0 then $j.write else $j.read end)) as $s
        | [$lbl, $j.jobname,
           ($s.iops | floor),
           ($s.bw_bytes / 1048576 * 10 | round / 10),
           (($s.clat_ns.percentile["50.000000"] // 0) / 1000 | round),
           (($s.clat_ns.percentile["99.000000"] // 0) / 1000 | round),
           $engine]
        | @tsv' "$1"
}

fmt='%-16s %-15s %9s %9s %9s %9s\n'
# shellcheck disable=SC2059  # the format is the constant above
printf "$fmt" label job IOPS MiB/s "p50 µs" "p99 µs"
say "$dev ($dev_bytes bytes): using $size bytes, ${runtime} s per job after ${ramp} s ramp, $ioengine"
failed=0
for job in $jobs; do
    out="$work/$job.json"
    rc=0
    DEV=$dev RUNTIME=$runtime RAMP_TIME=$ramp SIZE=$size IOENGINE=$ioengine \
        timeout --kill-after=10 "$limit" \
        fio --output-format=json --output="$out" --eta=never "$here/$job.fio" 2> "$work/$job.err" || rc=$?
    if [ "$rc" != 0 ] || ! row=$(row_of "$out" 2>>"$work/$job.err"); then
        case $rc in
            0) say "$job: no result in fio's JSON output:" ;;
            124|137) say "$job: fio did not finish within $limit s:" ;;
            *) say "$job: fio failed (exit $rc):" ;;
        esac
        sed 's/^/    /' "$work/$job.err" >&2
        failed=1
        continue
    fi
    if [ -n "$json_dir" ]; then cp "$out" "$json_dir/$label.$job.json"; fi
    if [ -n "$tsv" ]; then printf '%s\n' "$row" >> "$tsv"; fi
    IFS=$'\t' read -r l j iops mibs p50 p99 _ <<< "$row"
    # shellcheck disable=SC2059
    printf "$fmt" "$l" "$j" "$iops" "$mibs" "$p50" "$p99"
done
exit "$failed"
