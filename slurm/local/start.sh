#!/usr/bin/env bash
# Start (or confirm) a real one-node SLURM cluster on this machine, from Debian packages.
#
# Why: CI tests of sbatch/submitit must exercise real SLURM semantics (arrays, srun steps,
# requeue, signals) rather than mocks. The cluster has no slurmdbd, no cgroups and no systemd,
# so it works inside a container.
#
# Idempotent: safe to run repeatedly. A second run with the cluster already healthy only
# checks it and prints the status line; a changed slurm.conf restarts the slurm daemons.
#
# Environment knobs:
#   SLURM_LOCAL_WAIT_S   seconds to wait for the node to become usable (default 60)
#   SLURM_LOCAL_NO_INSTALL=1  never run apt-get (fail instead if packages are missing)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly HERE
readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly CONF_DIR=/etc/slurm
# The Debian build looks for /etc/slurm/slurm.conf, so writing the config there means
# sbatch/srun/squeue/scontrol (and submitit) need no SLURM_CONF in their environment.
readonly CONF="${CONF_DIR}/slurm.conf"
readonly STATE_DIR=/var/spool/slurmctld
readonly SPOOL_DIR=/var/spool/slurmd
readonly LOG_DIR=/var/log/slurm
readonly CTLD_PID=/run/slurmctld.pid
readonly SLURMD_PID=/run/slurmd.pid
readonly MUNGE_KEY=/etc/munge/munge.key
readonly PARTITION=debug
readonly WAIT_S="${SLURM_LOCAL_WAIT_S:-60}"

log() { echo "slurm-local: $*" >&2; }
die() {
    echo "slurm-local: ERROR: $*" >&2
    # The daemons log to files, not the terminal; show their tails so CI logs say why.
    local f
    for f in "${LOG_DIR}/slurmctld.log" "${LOG_DIR}/slurmd.log" /var/log/munge/munged.log; do
        if [[ -s "$f" ]]; then
            echo "----- last lines of $f -----" >&2
            tail -n 25 "$f" >&2 || true
        fi
    done
    exit 1
}

# Daemons must run as root (slurmd launches jobs as the submitting user). CI runners usually
# run as an unprivileged user with passwordless sudo, so re-exec rather than fail.
if [[ ${EUID} -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -n -E bash "${BASH_SOURCE[0]}" "$@"
    fi
    die "must run as root (or as a user with passwordless sudo)"
fi

# ---------------------------------------------------------------- packages
pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
    pkg_installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ "${SLURM_LOCAL_NO_INSTALL:-0}" == 1 ]] && die "missing packages: ${missing[*]} (SLURM_LOCAL_NO_INSTALL=1)"
    log "installing ${missing[*]} (apt)"
    # Package maintainer scripts try to start the services; without systemd and before our
    # slurm.conf exists that fails. A policy-rc.d returning 101 tells invoke-rc.d not to try.
    added_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    rc=0
    { apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } || rc=$?
    ((added_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${PACKAGES[*]} failed (rc=${rc})"
fi
for b in munged munge unmunge slurmctld slurmd sbatch srun sinfo scontrol squeue; do
    command -v "$b" >/dev/null 2>&1 || die "'$b' not on PATH after installing ${PACKAGES[*]}"
done

# Is the process in pidfile $1 alive and named $2? (Guards against a recycled pid.)
pid_alive() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc '0-9' <"$1")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
        [[ "$(cat "/proc/${pid}/comm" 2>/dev/null || true)" == "$2" ]]
}

# ---------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# munged refuses to start unless key and directories are owned by munge and not group/world
# accessible, so enforce that every time (a restored CI cache can lose ownership).
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s "${MUNGE_KEY}" ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="${MUNGE_KEY}"
    else
        dd if=/dev/urandom of="${MUNGE_KEY}" bs=1024 count=1 status=none
    fi
fi
chown munge:munge "${MUNGE_KEY}"
chmod 0400 "${MUNGE_KEY}"

if ! munge_ok; then
    log "starting munged"
    # --force: a crashed munged leaves its socket behind and would otherwise refuse to start.
    runuser -u munge -- /usr/sbin/munged --force ||
        die "munged failed to start"
    for _ in $(seq 1 50); do
        munge_ok && break
        sleep 0.2
    done
    munge_ok || die "munged started but 'munge -n | unmunge' fails"
fi

# ---------------------------------------------------------------- slurm.conf
node="$(hostname -s)"
# The CPUs this machine gives us; without the OpenMP variables, which GNU nproc honours (a shell
# with OMP_NUM_THREADS=1, usual on clusters and in our test runs, made a 1-CPU node on which
# 2-CPU jobs waited forever with reason PartitionConfig).
cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
mem_mb="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
# slurmd drains a node that reports less memory than configured; leave 10% headroom because
# what slurmd measures differs a little from /proc/meminfo (and between kernels/containers).
real_mem=$((mem_mb * 90 / 100))

install -d -o root -g root -m 0755 "${CONF_DIR}" "${STATE_DIR}" "${SPOOL_DIR}" "${LOG_DIR}"

new_conf="$(mktemp)"
trap 'rm -f "${new_conf}"' EXIT
cat >"${new_conf}" <<CONF
# Generated by slurm/local/start.sh -- one-node CI cluster; edits are overwritten.
ClusterName=localci
# 127.0.0.1 so nothing depends on the CI machine's DNS resolving its own hostname.
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Containers have no usable cgroup hierarchy: track processes via /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct is unavailable, everything else works from slurmctld's memory.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# Cores (not memory) are the consumable, so jobs need no --mem and two 1-CPU jobs or one
# 2-task job fit on a 2-core runner at once.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that was down (e.g. slurmd restarted) comes back as soon as it registers again.
ReturnToService=2
# Requeue (scontrol requeue, preemption, submitit's USR2 checkpoint/requeue) is allowed.
JobRequeue=1
# Short so cancelled/requeued test jobs free the node quickly.
KillWait=5
# A requeued job may not start again for cred_expire+1 seconds (default 120 s, which makes
# requeue/preemption tests crawl); 30 s still leaves step launch ample credential lifetime.
AuthInfo=cred_expire=30
# Nothing wakes the scheduler when a requeued job's begin time passes, only these periodic
# passes (default 60 s / 30 s); with a handful of jobs frequent passes cost nothing.
SchedulerParameters=sched_interval=5,bf_interval=5
# No mail on a CI box; the default /bin/mail is missing and slurmctld logs an error.
MailProg=/bin/true
# Without an accounting database, slurmctld's memory is the only record of finished jobs;
# keep them visible to scontrol/squeue for 5 minutes so tests can inspect the outcome.
MinJobAge=300
# Notice a dead slurmd within a minute instead of the default five.
SlurmdTimeout=60
# CPUs only (no Sockets/Cores): every CPU then counts as a core, so CR_Core can hand out
# hyperthreads individually and a 1-CPU job never takes a whole 2-thread core.
NodeName=${node} NodeHostname=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
# OverSubscribe=FORCE:2 lets a second job share a busy core instead of queueing forever on
# a 2-core runner (e.g. a long-running job plus a test job).
PartitionName=${PARTITION} Nodes=${node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
CONF

conf_changed=0
if ! cmp -s "${new_conf}" "${CONF}"; then
    conf_changed=1
    install -o root -g root -m 0644 "${new_conf}" "${CONF}"
fi

if ((conf_changed)) && { pid_alive "${CTLD_PID}" slurmctld || pid_alive "${SLURMD_PID}" slurmd; }; then
    log "slurm.conf changed; restarting slurm daemons"
    SLURM_LOCAL_KEEP_MUNGE=1 bash "${HERE}/stop.sh"
fi

# ---------------------------------------------------------------- daemons
started=0
if ! pid_alive "${CTLD_PID}" slurmctld; then
    started=1
    log "starting slurmctld"
    slurmctld || die "slurmctld failed to start"
fi
if ! pid_alive "${SLURMD_PID}" slurmd; then
    started=1
    log "starting slurmd"
    slurmd || die "slurmd failed to start"
fi

# ---------------------------------------------------------------- wait for the node
node_state() { sinfo -h -N -n "${node}" -p "${PARTITION}" -o '%T' 2>/dev/null | head -n1 || true; }

deadline=$((SECONDS + WAIT_S))
state=""
resumed=0
while ((SECONDS < deadline)); do
    pid_alive "${CTLD_PID}" slurmctld || die "slurmctld exited"
    pid_alive "${SLURMD_PID}" slurmd || die "slurmd exited"
    state="$(node_state)"
    case "${state}" in
        idle | mixed | allocated | completing) break ;;
        # Trailing '*' = slurmd not responding yet: just keep waiting for registration.
        *\*) ;;
        down | drain* | fail*)
            # Left over from an earlier unclean stop (state is saved across restarts).
            if ((!resumed)); then
                log "node ${node} is '${state}'; resuming it"
                scontrol update nodename="${node}" state=resume || true
                resumed=1
            fi
            ;;
    esac
    sleep 1
done
case "${state}" in
    idle | mixed | allocated | completing) ;;
    *) die "node ${node} not usable after ${WAIT_S}s (state='${state:-no answer from slurmctld}')" ;;
esac

# Right after a restart sinfo can still show the node state saved before the restart, so
# only a job that actually runs proves munge, slurmctld and slurmd all work together.
if ((started)); then
    smoke_s=$((deadline - SECONDS))
    ((smoke_s < 10)) && smoke_s=10
    timeout "${smoke_s}" srun --quiet --job-name=slurm-local-smoke --ntasks=1 --time=1 true ||
        die "node ${node} is '${state}' but a trivial 'srun true' failed or timed out (${smoke_s}s)"
fi

version="$(sinfo -V 2>/dev/null | awk '{print $2}')"
echo "slurm-local: UP node=${node} cpus=${cpus} real_mem=${real_mem}MB partition=${PARTITION} state=${state} slurm=${version} conf=${CONF}"
