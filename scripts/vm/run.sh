#!/usr/bin/env bash
# Boots the ublk test guest (Debian's 6.12 kernel under qemu TCG), runs one
# shell command line in it as root, and exits with that command's status.
#
# Usage: scripts/vm/run.sh [options] -- COMMAND...
#   --timeout S       kill the guest after S seconds in all (default 1800,
#                     or $REPLBLK_VM_TIMEOUT); exit 124
#   --boot-timeout S  give up if the command has not started after S seconds
#                     (default 300); exit 125
#   --results DIR     host directory mounted writable at /mnt/results in the
#                     guest (default: a temporary one, removed afterwards)
#   --env NAME=VALUE  export this variable to the command (repeatable)
#   --verbose         also print the boot messages, not only the command's
#   --log FILE        keep a copy of the whole guest console in FILE
#
# In the guest the command runs under bash in a chroot of the host's root
# filesystem (9p, read-only), from the host's current directory when the
# guest can see it, with tmpfs on /tmp, /run, /mnt and /dev/shm. The host's
# /tmp is hidden: binaries under test must live elsewhere (e.g. target/).
# Exit status: COMMAND's own; 124 on timeout; 125 if the guest failed.
# Environment: REPLBLK_VM_MEM (MiB, default 2048), REPLBLK_VM_SMP (default 2),
# REPLBLK_VM_APPEND (extra kernel arguments, e.g. loglevel=7),
# REPLBLK_VM_QEMU_ARGS (extra qemu arguments, split on blanks).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${REPLBLK_VM_CACHE:-/var/cache/replblk-vm}
timeout=${REPLBLK_VM_TIMEOUT:-1800}
boot_timeout=300
results=""
verbose=0
keep_log=""
envs=()

usage() { sed -n '2,23p' "$0" >&2; exit 2; }
say() { echo "run.sh: $*" >&2; }

while [ $# -gt 0 ]; do
    case $1 in
        --timeout) timeout=${2:?}; shift 2 ;;
        --boot-timeout) boot_timeout=${2:?}; shift 2 ;;
        --results) results=${2:?}; shift 2 ;;
        --env) envs+=("${2:?}"); shift 2 ;;
        --verbose|-v) verbose=1; shift ;;
        --log) keep_log=${2:?}; shift 2 ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) say "unknown option: $1"; usage ;;
    esac
done
[ $# -gt 0 ] || { say "no command given"; usage; }
[[ $timeout =~ ^[0-9]+$ && $boot_timeout =~ ^[0-9]+$ ]] || { say "timeouts must be whole seconds"; exit 2; }
command_line="$*"

"$here/setup.sh" --quiet || { say "setup.sh failed"; exit 125; }
# shellcheck disable=SC1091
. "$cache/current/vm.env"

# --- per-run directory -----------------------------------------------------
run=$(mktemp -d "${TMPDIR:-/tmp}/replblk-vm.XXXXXX")
qpid="" tailpid="" streampid=""
stop_pid() { # pid: TERM, then KILL after 5 s
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}
# shellcheck disable=SC2317,SC2329  # called by the EXIT trap
cleanup() {
    local pid
    for pid in $qpid $tailpid $streampid; do stop_pid "$pid"; done
    wait 2>/dev/null || true
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

mkdir -p "$run/ctl"
if [ -z "$results" ]; then
    results="$run/results"
fi
mkdir -p "$results"
results=$(cd "$results" && pwd)

{
    printf 'cd -- %q 2>/dev/null || cd /\n' "$PWD"
    for e in "${envs[@]}"; do
        [[ $e == *=* && ${e%%=*} =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { say "bad --env: $e"; exit 2; }
        printf 'export %s=%q\n' "${e%%=*}" "${e#*=}"
    done
    printf '%s\n' "$command_line"
} > "$run/ctl/cmd.sh"

# --- boot --------------------------------------------------------------------
log="$run/console.log"
: > "$log"
p9=security_model=none
read -ra extra_qemu_args <<< "${REPLBLK_VM_QEMU_ARGS:-}"
qemu-system-x86_64 \
    -accel tcg -cpu max -smp "${REPLBLK_VM_SMP:-2}" -m "${REPLBLK_VM_MEM:-2048}" \
    -nodefaults -no-user-config -display none -monitor none -no-reboot \
    -serial "file:$log" \
    -kernel "$VMLINUZ" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1 replblk_vm.deadline=$((timeout + 60)) ${REPLBLK_VM_APPEND:-}" \
    -device virtio-rng-pci \
    -virtfs "local,path=/,mount_tag=hostroot,readonly=on,multidevs=remap,$p9" \
    -virtfs "local,path=$run/ctl,mount_tag=ctl,$p9" \
    -virtfs "local,path=$results,mount_tag=results,$p9" \
    "${extra_qemu_args[@]}" \
    < /dev/null > "$run/qemu.out" 2>&1 &
qpid=$!
t0=${EPOCHREALTIME/./}

# Stream the console live: the command's part, or everything with --verbose.
# (Not awk: Debian's mawk buffers its input from a pipe.)
mkfifo "$run/stream"
stream_console() {
    local on=0 line
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        case $line in
            "replblk-vm: >>> command start"*) on=1; [ "$verbose" = 1 ] || continue ;;
            *"replblk-vm: <<< command exit"*)
                # The command's last line may lack its newline.
                local rest=${line%%replblk-vm: <<< command exit*}
                on=0
                if [ "$verbose" != 1 ]; then
                    [ -z "$rest" ] || printf '%s\n' "$rest"
                    continue
                fi ;;
        esac
        if [ "$on" = 1 ] || [ "$verbose" = 1 ]; then printf '%s\n' "$line"; fi
    done
}
stream_console < "$run/stream" &
streampid=$!
tail -n +1 -F -s 0.2 --pid="$qpid" "$log" > "$run/stream" 2>/dev/null &
tailpid=$!

elapsed_ms() { echo $(( (${EPOCHREALTIME/./} - t0) / 1000 )); }
secs() { printf '%d.%01d' $(($1 / 1000)) $(($1 % 1000 / 100)); }

started_ms="" done_ms="" reason=""
while kill -0 "$qpid" 2>/dev/null; do
    ms=$(elapsed_ms)
    if [ -z "$started_ms" ] && [ -e "$run/ctl/started" ]; then
        started_ms=$ms
    fi
    if [ -e "$run/ctl/status" ]; then
        # Finished; the guest is powering off. Should that hang, the status
        # is already known: stop qemu.
        done_ms=${done_ms:-$ms}
        if [ $((ms - done_ms)) -ge 30000 ]; then
            reason="poweroff-hang"; break
        fi
    elif [ "$ms" -ge $((timeout * 1000)) ]; then
        reason=timeout; break
    elif [ -z "$started_ms" ] && [ "$ms" -ge $((boot_timeout * 1000)) ]; then
        reason="boot-timeout"; break
    fi
    sleep 0.2
done
end_ms=$(elapsed_ms)
if [ -z "$started_ms" ] && [ -e "$run/ctl/started" ]; then started_ms=$end_ms; fi
if [ -n "$reason" ]; then
    say "killing qemu (pid $qpid)"
    stop_pid "$qpid"
fi
qrc=0
wait "$qpid" || qrc=$?
qpid=""
# tail notices qemu's end within a second and drains the log.
for _ in $(seq 50); do kill -0 "$tailpid" 2>/dev/null || break; sleep 0.1; done
stop_pid "$tailpid"; tailpid=""
for _ in $(seq 20); do kill -0 "$streampid" 2>/dev/null || break; sleep 0.1; done
stop_pid "$streampid"; streampid=""

[ -z "$keep_log" ] || tr -d '\r' < "$log" > "$keep_log"

print_log() {
    echo "----- guest console (last 500 lines) -----" >&2
    tr -d '\r' < "$log" | tail -n 500 >&2
    echo "----- end of guest console -----" >&2
    if [ -s "$run/qemu.out" ]; then
        echo "----- qemu output (exit code $qrc) -----" >&2
        cat "$run/qemu.out" >&2
    fi
}
timing() {
    local boot="no command start" cmd=""
    [ -z "$started_ms" ] || boot="boot $(secs "$started_ms") s"
    [ -z "$started_ms" ] || cmd=", command $(secs $((end_ms - started_ms))) s"
    echo "$boot$cmd, total $(secs "$end_ms") s"
}

status=""
if [ -e "$run/ctl/status" ]; then
    status=$(cat "$run/ctl/status")
else
    # Fallback: the marker on the console.
    status=$(tr -d '\r' < "$log" | sed -n 's/^.*replblk-vm: <<< command exit \([0-9]*\)$/\1/p' | tail -n 1)
fi
if [[ $status =~ ^[0-9]+$ ]]; then
    say "command exited with status $status ($(timing))"
    exit "$status"
fi

case $reason in
    timeout)
        say "TIMEOUT: the guest did not finish within $timeout s ($(timing))"
        print_log; exit 124 ;;
    boot-timeout)
        say "BOOT FAILED: the command had not started after $boot_timeout s"
        print_log; exit 125 ;;
esac
if [ -e "$run/ctl/guest-error" ]; then
    say "GUEST FAILED: $(cat "$run/ctl/guest-error") ($(timing))"
elif [ -n "$started_ms" ]; then
    say "GUEST DIED while running the command, no exit status (kernel panic, or the command powered the guest off?) ($(timing))"
else
    say "BOOT FAILED: qemu exited (code $qrc) before the command started ($(timing))"
fi
print_log
exit 125
