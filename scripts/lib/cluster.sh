# Shell helpers for scripts that run a 3-node volume on 127.0.0.1 (the demo
# and the VM end-to-end test). Source it; it defines functions only.
#
#   wait_for SECONDS COMMAND...          retry COMMAND every 0.2 s, bounded
#   write_config CONFIG WORK SIZE_BYTES LOG_BYTES PORT...
#                                        a config with nodes 1-3 (1 is the
#                                        primary), files under WORK, node i
#                                        listening on the i-th PORT; the
#                                        device gets $QUEUES queues (1), the
#                                        volume $BLOCK_SIZE-byte blocks (4096)
#   start_secondaries BIN CONFIG WORK    start nodes 2 and 3 (output in
#                                        WORK/nodeN.out), append their pids
#                                        to the array `pids`, wait until both
#                                        answer (60 s); non-zero if one does not
#   logs_cleared BIN CONFIG OUT          true when both secondaries' logs hold
#                                        no record (their status in OUT)
#   free_port                            a port free on 127.0.0.1 now

wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

# True once process $1 has exited (gone, or a zombie not yet reaped).
exited() {
    local state
    state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -z "$state" ] || [ "$state" = Z ]
}

# Sends signal $1 to child process $2 and reaps it within $3 seconds.
# Returns its exit status, or 124 if it is still there, after printing
# where its threads are stuck in the kernel.
stop_process() {
    local signal=$1 pid=$2 seconds=$3 status=0 task
    kill -"$signal" "$pid" 2>/dev/null || true
    if ! wait_for "$seconds" exited "$pid"; then
        echo "process $pid still there $seconds s after SIG$signal; its threads in the kernel:" >&2
        for task in /proc/"$pid"/task/*; do
            echo "-- $task ($(cat "$task/comm" 2>/dev/null))" >&2
            cat "$task/stack" >&2 2>/dev/null
        done
        return 124
    fi
    wait "$pid" 2>/dev/null || status=$?
    return "$status"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

write_config() {
    local config=$1 work=$2 size_bytes=$3 log_bytes=$4
    shift 4
    cat > "$config" <<TOML
[volume]
uuid = "$(cat /proc/sys/kernel/random/uuid)"
size_bytes = $size_bytes
block_size_bytes = ${BLOCK_SIZE:-4096}

[device]
queues = ${QUEUES:-1}
queue_depth = 64
io_max_bytes = 524288
TOML
    local id
    for id in 1 2 3; do
        cat >> "$config" <<TOML

[[node]]
id = $id
address = "127.0.0.1:$1"
data_path = "$work/node$id.data"
log_path = "$work/node$id.log"
log_size_bytes = $log_bytes
TOML
        shift
    done
}

start_secondaries() {
    local bin=$1 config=$2 work=$3 id
    for id in 2 3; do
        RUST_LOG="${RUST_LOG:-info}" "$bin/replblkd" secondary --config "$config" --node "$id" \
            >"$work/node$id.out" 2>&1 &
        pids+=($!)
    done
    for id in 2 3; do
        wait_for 60 "$bin/replblk-ctl" status --config "$config" --node "$id" >/dev/null 2>&1 \
            || { echo "secondary $id did not answer within 60 s" >&2; return 1; }
    done
}

logs_cleared() {
    "$1/replblk-ctl" status --config "$2" > "$3" 2>&1 || true
    [ "$(grep -cE '^node [23] .*log_records 0$' "$3")" -eq 2 ]
}
