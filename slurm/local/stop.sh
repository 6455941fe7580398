#!/usr/bin/env bash
# Stop the one-node CI SLURM cluster started by slurm/local/start.sh: slurmd, slurmctld, munged.
#
# Idempotent: stopping an already stopped cluster is a no-op. Every wait is bounded so CI
# teardown never hangs; a daemon that ignores SIGTERM is SIGKILLed after the grace period.
# Processes are found through their pidfiles only, so unrelated processes are never touched.
#
# Environment knobs:
#   SLURM_LOCAL_KEEP_MUNGE=1  leave munged running (start.sh uses this to restart slurm only)
#   SLURM_LOCAL_STOP_WAIT_S   grace period per daemon in seconds (default 20)
set -euo pipefail

readonly CTLD_PID=/run/slurmctld.pid
readonly SLURMD_PID=/run/slurmd.pid
readonly MUNGE_PID=/run/munge/munged.pid
readonly WAIT_S="${SLURM_LOCAL_STOP_WAIT_S:-20}"

log() { echo "slurm-local: $*" >&2; }

if [[ ${EUID} -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -n -E bash "${BASH_SOURCE[0]}" "$@"
    fi
    echo "slurm-local: ERROR: must run as root (or as a user with passwordless sudo)" >&2
    exit 1
fi

# Prints the pid from pidfile $1 if that process is alive and named $2 (not a recycled pid).
live_pid() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc '0-9' <"$1")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
        [[ "$(cat "/proc/${pid}/comm" 2>/dev/null || true)" == "$2" ]] && echo "$pid"
}

# stop_daemon PIDFILE NAME: SIGTERM, wait up to WAIT_S, then SIGKILL.
stop_daemon() {
    local pidfile="$1" name="$2" pid
    if ! pid="$(live_pid "$pidfile" "$name")"; then
        rm -f "$pidfile"
        return 0
    fi
    log "stopping ${name} (pid ${pid})"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + WAIT_S))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "${name} (pid ${pid}) ignored SIGTERM for ${WAIT_S}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
}

# munged last: the slurm daemons still authenticate RPCs through it while they shut down.
stop_daemon "$SLURMD_PID" slurmd
stop_daemon "$CTLD_PID" slurmctld
if [[ "${SLURM_LOCAL_KEEP_MUNGE:-0}" != 1 ]]; then
    stop_daemon "$MUNGE_PID" munged
fi
log "stopped"
