#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine: Debian's slurm-wlm + munge, run as
# plain daemons (this is a container: no systemd, no cgroups). `make slurm-local` and
# `.ci/run` call it; the SLURM integration tests (pytest -m slurm) submit to it.
#
# Idempotent: installs packages only when missing, rewrites the config only when it
# changed, starts only the daemons that are not running, and returns at once when the
# node is already up and schedulable. Needs root (apt-get, daemons, /etc/slurm).
#
# Env knobs: SLURM_LOCAL_CRED_EXPIRE (seconds, default 10; also the delay before a
# requeued job may start again, see below), SLURM_LOCAL_WAIT (seconds to wait for the
# node to come up, default 60).
set -euo pipefail

log() { echo "[slurm-local] $*"; }
die() { echo "[slurm-local] ERROR: $*" >&2; exit 1; }

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
NODE="$(hostname -s)"
CRED_EXPIRE="${SLURM_LOCAL_CRED_EXPIRE:-10}"
WAIT_S="${SLURM_LOCAL_WAIT:-60}"
LOG_DIR=/var/log/slurm

node_state() {
    # Prints e.g. "idle", "mixed", "allocated", "down*", "drained"; empty when unknown.
    sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true
}

node_usable() {
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

# True when the pid file names a live process with that command name (a stale pid file
# from an earlier container may name a reused pid).
pid_alive() {
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

# ---- fast path: already up ---------------------------------------------------------
if command -v sinfo >/dev/null 2>&1 && [ -f "$CONF" ] && munge_ok \
        && pid_alive /run/slurm/slurmctld.pid slurmctld && pid_alive /run/slurm/slurmd.pid slurmd && node_usable; then
    log "already up: node $NODE is $(node_state)"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, writes $CONF, starts daemons)"

# ---- 1. packages ---------------------------------------------------------------------
need=()
for pkg in slurm-wlm munge; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install ${need[*]} by hand (Debian/Ubuntu packages)"
    log "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # In a container without systemd, stop the packages' maintainer scripts from starting
    # the daemons with their default (absent) config; the standard policy-rc.d "deny"
    # does that (a policy the image already has is left alone). We start the daemons below.
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_added=1
    fi
    apt_rc=0
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}"; } || apt_rc=$?
    [ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$apt_rc" = 0 ] || die "apt-get update/install ${need[*]} failed (exit $apt_rc)"
fi
for bin in munged slurmctld slurmd sinfo scontrol sbatch; do
    command -v "$bin" >/dev/null 2>&1 || die "$bin not found after installing slurm-wlm/munge"
done

# ---- 2. slurm.conf -------------------------------------------------------------------
CPUS="$(nproc)"
MEM_MB="$(free -m | awk '/^Mem:/ {print $2}')"
# Declare a little less than the machine has: slurmd drains a node whose real memory is
# below the configured RealMemory ("Low RealMemory").
REAL_MEM=$(( MEM_MB * 95 / 100 ))
[ "$REAL_MEM" -gt 0 ] || die "could not read total memory from 'free -m'"

mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" /run/slurm
new_conf="$(mktemp)"
cat >"$new_conf" <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster. Edits are overwritten.
ClusterName=local
SlurmctldHost=$NODE
# Daemons run as root: this is a throwaway container cluster, not a shared system.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default
# 120 s); keep it short so preemption/requeue round trips are quick here.
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MpiDefault=none
# No cgroups in a container: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
# CR_CPU: schedule CPUs (no memory tracking), whatever the core/thread layout is.
SelectTypeParameters=CR_CPU
# Jobs submitted with --requeue may be requeued (scontrol requeue from the batch script).
JobRequeue=1
ReturnToService=2
SlurmdTimeout=300
SlurmctldTimeout=120
InactiveLimit=0
KillWait=30
# Finished jobs stay visible to 'scontrol show job' this long (there is no slurmdbd/sacct).
MinJobAge=600
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 0644 "$new_conf" "$CONF"
    conf_changed=1
    log "wrote $CONF (node $NODE, CPUs=$CPUS, RealMemory=$REAL_MEM MB)"
fi
rm -f "$new_conf"
# An empty cgroup.conf keeps slurmd from complaining on hosts where it looks for one.
[ -f "$CONF_DIR/cgroup.conf" ] || echo "# cgroups unused (proctrack/linuxproc, task/none)" >"$CONF_DIR/cgroup.conf"

# ---- 3. munge ------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0755 /run/munge

if ! munge_ok; then
    log "starting munged"
    rm -f /run/munge/munged.pid
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
    else
        /usr/sbin/munged --force || die "munged failed to start (see /var/log/munge/munged.log)"
    fi
    for _ in $(seq 1 50); do munge_ok && break; sleep 0.2; done
    munge -n </dev/null | unmunge >/dev/null || die "munge credential round trip fails (see /var/log/munge/munged.log)"
fi

# ---- 4. slurmctld + slurmd -----------------------------------------------------------
if [ "$conf_changed" = 1 ]; then
    # A running daemon holds the old config: restart it with the new one.
    for d in slurmd slurmctld; do
        if pid_alive "/run/slurm/$d.pid" "$d"; then
            log "restarting $d (config changed)"
            kill "$(cat "/run/slurm/$d.pid")" || true
            for _ in $(seq 1 50); do pid_alive "/run/slurm/$d.pid" "$d" || break; sleep 0.2; done
        fi
    done
fi
if ! pid_alive /run/slurm/slurmctld.pid slurmctld; then
    log "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld failed to start (see $LOG_DIR/slurmctld.log)"
fi
for _ in $(seq 1 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer 'scontrol ping' (see $LOG_DIR/slurmctld.log)"
if ! pid_alive /run/slurm/slurmd.pid slurmd; then
    log "starting slurmd"
    /usr/sbin/slurmd || die "slurmd failed to start (see $LOG_DIR/slurmd.log)"
fi

# ---- 5. wait for the node --------------------------------------------------------------
deadline=$(( $(date +%s) + WAIT_S ))
resumed=0
while :; do
    state="$(node_state)"
    case "$state" in
        idle|mixed|allocated|completing)
            log "up: node $NODE is $state (partition debug, $CPUS CPUs)"
            exit 0 ;;
        down*|drain*|fail*)
            # A node that was down/drained in saved state (e.g. a previous slurmd was
            # killed) stays that way until resumed by hand.
            if [ "$resumed" = 0 ]; then
                reason="$(sinfo -h -N -n "$NODE" -o '%E' 2>/dev/null || true)"
                log "node $NODE is $state (${reason:-no reason}); resuming it"
                scontrol update nodename="$NODE" state=resume 2>/dev/null || true
                resumed=1
            fi ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        sinfo -N -l >&2 || true
        tail -n 20 "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
        die "node $NODE not schedulable after ${WAIT_S}s (state '${state:-unknown}'); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
    fi
    sleep 1
done
