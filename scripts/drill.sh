#!/usr/bin/env bash
# The operational drills, run for real on this machine, each outcome checked:
#
#   sigkill       SIGKILL mid-capture, restart: no trade the simulator sent is lost or
#                 duplicated (checked against its manifest, as tests/e2e/accounting.py does)
#   journal-tail  the newest journal segment's tail garbled after a stop: `k2d journal
#                 inspect` shows the damage, the restart cuts it back, capture goes on
#   disk-full     the data dir on a 48 MiB tmpfs filled to ENOSPC: the daemon turns DEGRADED,
#                 a new start there exits 73, and once space returns every actor runs again
#                 (skipped, with the reason, where no tmpfs can be mounted: needs root)
#   backup        `k2d backup` while capturing, `k2d restore` into a new data dir: every table
#                 equals the source at the backup's snapshots, and a daemon starts on it
#
# Prints one PASS, FAIL or SKIP line per drill and exits 1 if any failed. Everything runs
# on 127.0.0.1 in a temporary directory (K2D_DRILL_KEEP=1 keeps it). Takes about 1.5 min.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${K2D_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/k2d-drill.XXXXXX")"
SYMBOLS="BTCUSDT,ETHUSDT"
PIDS=()
FAILED=0
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2

stop_started() {
    local pid
    # Only what this (sub)shell started, by process id.
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
    wait 2>/dev/null
}

cleanup() {
    local m
    stop_started
    # Any filesystem mounted under the work dir (by this shell or the disk-full drill's).
    for m in $(awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/mounts 2>/dev/null); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
    if [ "${K2D_DRILL_KEEP:-0}" = 1 ]; then echo "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

k2d() { "$PY" -m k2d "$@"; }
step() { echo "$((SECONDS)) $*" >>"$WORK/steps.log"; }
check() { "$PY" "$ROOT/scripts/drill_check.py" "$@"; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
result() { # STATUS DRILL DETAIL
    printf '%s %s: %s\n' "$1" "$2" "$3"
    if [ "$1" = FAIL ]; then FAILED=1; fi
}

# start_simulator NAME: a Binance-protocol venue on a free port; sets SIM_PID, SIM_PORT.
start_simulator() {
    local log="$WORK/$1.log" i
    "$PY" -m k2d simulate --port 0 --symbols "$SYMBOLS" --rate 300 --seed 31 \
        --faults drop=0.005,dup=0.005,reorder=0.005 --record-quotes \
        --manifest "$WORK/$1-manifest.json" >"$log" 2>&1 &
    SIM_PID=$!
    PIDS+=("$SIM_PID")
    for i in $(seq 100); do
        SIM_PORT="$(sed -n 's/.*listening on ws:\/\/[0-9.]*:\([0-9]*\).*/\1/p' "$log" | head -1)"
        [ -n "$SIM_PORT" ] && return 0
        sleep 0.1
    done
    echo "simulator $1 did not start: $(tail -3 "$log")" >&2
    return 1
}

# write_config PATH DATA_DIR API_PORT SIM_PORT [STORAGE_LINES]
write_config() {
    cat >"$1" <<EOF
[storage]
data_dir = "$2"
$5
[api]
port = $3
[writer]
flush_interval = 0.3
[journal]
fsync_interval = 0.05
[sequencer]
gap_grace = 0.3
rerequest_after = 3.0
[supervisor]
backoff_initial = 0.2
backoff_max = 2.0
[feeds.binance]
ws_url = "ws://127.0.0.1:$4"
rest_url = "http://127.0.0.1:$4"
symbols = ["BTCUSDT", "ETHUSDT"]
EOF
}

# start_daemon CONFIG LOG [ENV=VALUE...]: sets DAEMON_PID.
start_daemon() {
    local cfg="$1" log="$2"
    shift 2
    env "$@" "$PY" -m k2d run --config "$cfg" >>"$log" 2>&1 &
    DAEMON_PID=$!
    PIDS+=("$DAEMON_PID")
}

# stop_daemon PID: SIGTERM, wait; returns its exit code.
stop_daemon() {
    kill -TERM "$1" 2>/dev/null
    wait "$1"
}

# ---------------------------------------------------------------------------------------
# sigkill, backup (while capturing), journal-tail: one simulator, one data dir

drill_capture() {
    local data="$WORK/data" cfg="$WORK/c.toml" log="$WORK/daemon.log" port rc out
    port="$(free_port)"
    start_simulator sim || { result FAIL sigkill "simulator did not start"; return; }
    write_config "$cfg" "$data" "$port" "$SIM_PORT" ""

    # sigkill: kill -9 mid-capture, start again
    start_daemon "$cfg" "$log"
    if ! out="$(check wait-ready "$port" 60)"; then
        result FAIL sigkill "first start: $out; $(tail -3 "$log")"
        return
    fi
    sleep 3
    step kill -9
    kill -9 "$DAEMON_PID"
    wait "$DAEMON_PID" 2>/dev/null
    start_daemon "$cfg" "$log"
    if ! out="$(check wait-ready "$port" 60)"; then
        result FAIL sigkill "restart after SIGKILL: $out; $(tail -3 "$log")"
        return
    fi
    sleep 2

    # backup while the daemon captures; restore into a new data dir
    step backup
    drill_backup "$cfg" "$data"
    step backup done

    # journal-tail: stop, garble the newest segment's tail, start again
    stop_daemon "$DAEMON_PID"
    rc=$?
    local seg garbled inspect_rc restart_log="$WORK/daemon-restart.log" committed
    seg="$(ls "$data"/journal/feed-binance/*.k2j | sort | tail -1)"
    step stopped, garble
    garbled="$(check garble "$seg")"
    k2d journal inspect "$seg" >"$WORK/inspect-before.txt" 2>&1
    inspect_rc=$?
    start_daemon "$cfg" "$restart_log"
    if [ $rc -ne 0 ] || [ $inspect_rc -ne 1 ] || ! check wait-ready "$port" 60 >/dev/null; then
        result FAIL journal-tail "stop exited $rc, inspect of the garbled segment exited $inspect_rc (expected 1), restart: $(tail -2 "$restart_log")"
    elif ! committed="$(check wait-committed "$port" 30)"; then
        result FAIL journal-tail "capture did not go on after the repair: $committed"
    elif ! grep -qi "truncat" "$restart_log"; then
        result FAIL journal-tail "the restart did not report cutting back the tail"
    elif ! k2d journal inspect "$seg" >"$WORK/inspect-after.txt" 2>&1; then
        result FAIL journal-tail "segment still damaged after the restart: $(tail -2 "$WORK/inspect-after.txt")"
    else
        result PASS journal-tail "$garbled; \`k2d journal inspect\` found it ($(grep -ci 'crc\|corrupt' "$WORK/inspect-before.txt") damage lines), the restart cut the tail back and capture went on ($committed)"
    fi

    # close the market, let the backfill finish, then account for every trade sent
    step close market
    kill -USR1 "$SIM_PID"
    local i gaps
    for i in $(seq 100); do grep -q "market closed" "$WORK/sim.log" && break; sleep 0.1; done
    if ! gaps="$(check wait-gaps-closed "$port" 120)"; then
        result FAIL sigkill "$gaps"
        stop_daemon "$DAEMON_PID"
        return
    fi
    step gaps closed
    stop_daemon "$DAEMON_PID"
    rc=$?
    step stopped
    if [ $rc -ne 0 ]; then
        result FAIL sigkill "the last stop exited $rc: $(tail -3 "$restart_log")"
    elif out="$(check account "$data" "$WORK/sim-manifest.json")"; then
        result PASS sigkill "killed -9 mid-capture and restarted: $out; $gaps"
    else
        result FAIL sigkill "$out"
    fi
    kill -TERM "$SIM_PID" 2>/dev/null
    wait "$SIM_PID" 2>/dev/null
}

drill_backup() {
    local cfg="$1" data="$2" saved="$WORK/backup" restored="$WORK/restored" out files
    local capture=$DAEMON_PID
    if ! k2d backup --to "$saved" --config "$cfg" >"$WORK/backup.txt" 2>&1; then
        result FAIL backup "k2d backup: $(tail -2 "$WORK/backup.txt")"
        return
    fi
    files="$(tail -1 "$WORK/backup.txt")"
    if ! k2d restore --from "$saved" --config "$cfg" --data-dir "$restored" >"$WORK/restore.txt" 2>&1; then
        result FAIL backup "k2d restore: $(tail -2 "$WORK/restore.txt")"
        return
    fi
    if k2d restore --from "$saved" --config "$cfg" --data-dir "$restored" >/dev/null 2>&1; then
        result FAIL backup "a second restore into the non-empty data dir was not refused"
        return
    fi
    step restored
    if ! out="$(check compare-restore "$saved" "$data" "$restored")"; then
        result FAIL backup "$out"
        return
    fi
    # A daemon starts on the restored data dir (feeds off: it recovers its state from the
    # restored snapshots and serves them).
    local port cfg2="$WORK/c-restored.toml" log="$WORK/daemon-restored.log" pid rc ready
    port="$(free_port)"
    write_config "$cfg2" "$restored" "$port" "$SIM_PORT" ""
    step compared
    start_daemon "$cfg2" "$log" K2D_FEEDS__BINANCE__ENABLED=false
    pid=$DAEMON_PID
    DAEMON_PID=$capture
    if ! ready="$(check wait-ready "$port" 60)"; then
        result FAIL backup "a daemon on the restored data dir: $ready; $(tail -2 "$log")"
        stop_daemon "$pid"
        return
    fi
    stop_daemon "$pid"
    rc=$?
    step restored daemon stopped
    if [ $rc -ne 0 ]; then
        result FAIL backup "the daemon on the restored data dir exited $rc"
        return
    fi
    result PASS backup "taken while capturing (${files#backed up }); restored into a new data dir: $out; a second restore there was refused; a daemon started on it ($ready)"
}

# ---------------------------------------------------------------------------------------
# disk-full: a real small filesystem

drill_disk_full() {
    local mnt="$WORK/small" port cfg="$WORK/c-full.toml" log="$WORK/daemon-full.log" out
    if [ "$(id -u)" != 0 ] || ! command -v mount >/dev/null; then
        result SKIP disk-full "mounting a tmpfs needs root and mount(8); run the drill as root"
        return
    fi
    mkdir -p "$mnt"
    if ! out="$(mount -t tmpfs -o size=48m tmpfs "$mnt" 2>&1)"; then
        result SKIP disk-full "cannot mount a tmpfs here: $out"
        return
    fi
    start_simulator sim-full || { result FAIL disk-full "simulator did not start"; return; }
    port="$(free_port)"
    # The start-up check (storage.min_free_bytes) would refuse so small a filesystem.
    write_config "$cfg" "$mnt/data" "$port" "$SIM_PORT" "min_free_bytes = 0"
    start_daemon "$cfg" "$log"
    if ! check wait-ready "$port" 60 >/dev/null; then
        result FAIL disk-full "start on the tmpfs: $(tail -3 "$log")"
        return
    fi
    sleep 2
    dd if=/dev/zero of="$mnt/filler" bs=1M 2>/dev/null
    local degraded refused refused_rc running rc
    degraded="$(check wait-degraded "$port" 30)"
    local degraded_rc=$?
    # A new start on the full filesystem is one line and exit code 73.
    env K2D_STORAGE__DATA_DIR="$mnt/data2" K2D_API__PORT=0 \
        "$PY" -m k2d run --config "$cfg" --exit-after 5 >"$WORK/refused.log" 2>&1
    refused_rc=$?
    refused="$(grep -o 'cannot start: [^"]*' "$WORK/refused.log" | head -1)"
    rm -f "$mnt/filler"
    running="$(check wait-running "$port" 60)"
    local running_rc=$?
    stop_daemon "$DAEMON_PID"
    rc=$?
    kill -TERM "$SIM_PID" 2>/dev/null
    wait "$SIM_PID" 2>/dev/null
    if [ $degraded_rc -ne 0 ]; then
        result FAIL disk-full "$degraded"
    elif [ $refused_rc -ne 73 ]; then
        result FAIL disk-full "a start on the full filesystem exited $refused_rc, not 73: $(tail -2 "$WORK/refused.log")"
    elif [ $running_rc -ne 0 ]; then
        result FAIL disk-full "$running"
    elif [ $rc -ne 0 ]; then
        result FAIL disk-full "the daemon exited $rc after the drill: $(tail -3 "$log")"
    else
        result PASS disk-full "data dir on a 48 MiB tmpfs filled to ENOSPC: $degraded; a new start there exited 73 ($refused); space freed: $running; stopped cleanly"
    fi
}

echo "k2d drills on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ), work dir $WORK"
started=$SECONDS
drill_capture
drill_disk_full
echo "drills done in $((SECONDS - started))s: $([ $FAILED = 0 ] && echo 'all passed' || echo 'FAILURES above')"
exit $FAILED
