#!/usr/bin/env bash
# A real SLURM cluster on this machine: Debian's slurm-wlm + munge, run as plain daemons
# (this is a container: no systemd, no cgroups). `make slurm-local` and `.ci/run` call it;
# the SLURM integration tests (pytest -m slurm) submit to it.
#
#   bash slurm/local_cluster.sh              one node (the host's name), /etc/slurm/slurm.conf
#   bash slurm/local_cluster.sh --nodes 2    a second, separate cluster of nodes n1 and n2
#                                            (make slurm-local NODES=2)
#
# The multi-node cluster runs beside the one-node one, with its own config
# (/etc/slurm-local2/slurm.conf), ports, state and log files: one slurmctld plus one
# `slurmd -N nK` per node, all on 127.0.0.1. Each NodeName line has its own Port=, %n in
# the slurmd spool/pid/log paths keeps the daemons apart, and n1..nN resolve to 127.0.0.1
# through /etc/hosts. Point the client commands at it with the line this script prints
# last: `export SLURM_CONF=/etc/slurm-local2/slurm.conf`. The nodes share one filesystem
# and one set of CPUs, so this tests the SLURM/srun/torchrun wiring across nodes, not
# bandwidth or a shared filesystem.
#
# Idempotent: installs packages only when missing, rewrites the config only when it
# changed, starts only the daemons that are not running, and returns at once when the
# nodes are already up and schedulable. Needs root (apt-get, daemons, /etc/slurm*).
#
# Env knobs: NODES (same as --nodes), SLURM_LOCAL_CRED_EXPIRE (seconds, default 10; also
# the delay before a requeued job may start again, see below), SLURM_LOCAL_WAIT (seconds
# to wait for the nodes to come up, default 60).
set -euo pipefail

log() { echo "[slurm-local] $*"; }
die() { echo "[slurm-local] ERROR: $*" >&2; exit 1; }

NODES="${NODES:-1}"
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES="${2:-}"; shift 2 ;;
        --nodes=*) NODES="${1#--nodes=}"; shift ;;
        *) die "unknown argument '$1' (usage: local_cluster.sh [--nodes N])" ;;
    esac
done
case "$NODES" in
    ''|*[!0-9]*|0) die "--nodes/NODES must be a positive integer, got '$NODES'" ;;
esac

CRED_EXPIRE="${SLURM_LOCAL_CRED_EXPIRE:-10}"
WAIT_S="${SLURM_LOCAL_WAIT:-60}"
LOG_DIR=/var/log/slurm
HOST="$(hostname -s)"
if [ "$NODES" = 1 ]; then
    # The original one-node layout, kept as it was so that a cluster started by an older
    # checkout is recognised as up.
    CLUSTER=local
    CONF_DIR=/etc/slurm
    RUN_DIR=/run/slurm
    STATE_DIR=/var/spool/slurmctld
    CTLD_PORT=6817
    NODE_NAMES=("$HOST")
    SLURMD_SPOOL=/var/spool/slurmd
    SLURMD_PID="$RUN_DIR/slurmd.pid"
    SLURMD_LOG="$LOG_DIR/slurmd.log"
    CTLD_LOG="$LOG_DIR/slurmctld.log"
else
    CLUSTER="local$NODES"
    CONF_DIR="/etc/slurm-$CLUSTER"
    RUN_DIR="/run/slurm-$CLUSTER"
    STATE_DIR="/var/spool/slurmctld-$CLUSTER"
    CTLD_PORT=$(( 6817 + 10 * (NODES - 1) ))
    NODE_NAMES=()
    for i in $(seq 1 "$NODES"); do NODE_NAMES+=("n$i"); done
    SLURMD_SPOOL="/var/spool/slurmd-$CLUSTER/%n"
    SLURMD_PID="$RUN_DIR/slurmd-%n.pid"
    SLURMD_LOG="$LOG_DIR/$CLUSTER-slurmd-%n.log"
    CTLD_LOG="$LOG_DIR/$CLUSTER-slurmctld.log"
fi
CONF="$CONF_DIR/slurm.conf"
CTLD_PID="$RUN_DIR/slurmctld.pid"
# Every client command below (sinfo, scontrol) talks to this cluster.
export SLURM_CONF="$CONF"

# The last line names the config, so that a person or a script can point sbatch at it.
finish() {
    if [ "$NODES" != 1 ]; then echo "SLURM_CONF=$CONF"; fi
    exit 0
}

node_pid_file() { echo "${SLURMD_PID//%n/$1}"; }

node_state() {
    # Prints e.g. "idle", "mixed", "allocated", "down*", "drained"; empty when unknown.
    sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n1 || true
}

all_nodes_usable() {
    local n
    for n in "${NODE_NAMES[@]}"; do
        case "$(node_state "$n")" in
            idle|mixed|allocated|completing) ;;
            *) return 1 ;;
        esac
    done
}

# True when the pid file names a live process with that command name (a stale pid file
# from an earlier container may name a reused pid).
pid_alive() {
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

all_slurmd_alive() {
    local n
    for n in "${NODE_NAMES[@]}"; do pid_alive "$(node_pid_file "$n")" slurmd || return 1; done
}

names_resolve() {
    local n
    for n in "${NODE_NAMES[@]}"; do getent hosts "$n" >/dev/null 2>&1 || return 1; done
}

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

# ---- fast path: already up ---------------------------------------------------------
# (A config older than this script may be stale: the full path rewrites it when it differs.)
if command -v sinfo >/dev/null 2>&1 && [ -f "$CONF" ] && [ "$CONF" -nt "${BASH_SOURCE[0]}" ] && munge_ok \
        && names_resolve && pid_alive "$CTLD_PID" slurmctld && all_slurmd_alive && all_nodes_usable; then
    log "already up: cluster $CLUSTER, nodes ${NODE_NAMES[*]} $(node_state "${NODE_NAMES[0]}")"
    finish
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

# ---- 2. node names ---------------------------------------------------------------------
# `slurmd -N nK` looks its own name up, and torchrun's rendezvous resolves the first
# node's name: map the extra names to loopback.
if [ "$NODES" != 1 ] && ! names_resolve; then
    log "adding '127.0.0.1 ${NODE_NAMES[*]}' to /etc/hosts"
    echo "127.0.0.1 ${NODE_NAMES[*]}" >>/etc/hosts
    names_resolve || die "node names ${NODE_NAMES[*]} still do not resolve after editing /etc/hosts"
fi

# ---- 3. slurm.conf -------------------------------------------------------------------
CPUS="$(nproc)"
MEM_MB="$(free -m | awk '/^Mem:/ {print $2}')"
# Declare a little less than the machine has: slurmd drains a node whose real memory is
# below the configured RealMemory ("Low RealMemory"). The nodes of a multi-node cluster
# share the machine, so each declares its share (memory is not scheduled: CR_CPU).
REAL_MEM=$(( MEM_MB * 95 / 100 / NODES ))
[ "$REAL_MEM" -gt 0 ] || die "could not read total memory from 'free -m'"

mkdir -p "$CONF_DIR" "$STATE_DIR" "$LOG_DIR" "$RUN_DIR"
for n in "${NODE_NAMES[@]}"; do mkdir -p "${SLURMD_SPOOL//%n/$n}"; done
if [ "$NODES" = 1 ]; then
    ports="SlurmdPort=6818"
    node_lines="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN"
else
    # All nodes share 127.0.0.1, so each slurmd listens on a port of its own. Every node
    # declares the machine's CPUs: together they oversubscribe them.
    ports="# slurmd ports: one per node, on the NodeName lines"
    node_lines=""
    for i in "${!NODE_NAMES[@]}"; do
        node_lines+="NodeName=${NODE_NAMES[$i]} NodeAddr=127.0.0.1 Port=$(( CTLD_PORT + 1 + i ))"
        node_lines+=" CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN"$'\n'
    done
    node_lines="${node_lines%$'\n'}"
fi
node_list="$(IFS=,; echo "${NODE_NAMES[*]}")"
what="a one-node test cluster"
[ "$NODES" = 1 ] || what="a $NODES-node test cluster on one machine"
new_conf="$(mktemp)"
cat >"$new_conf" <<SLURMCONF
# Written by slurm/local_cluster.sh: $what. Edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
# Daemons run as root: this is a throwaway container cluster, not a shared system.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default
# 120 s); keep it short so preemption/requeue round trips are quick here.
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldPort=$CTLD_PORT
$ports
MpiDefault=none
# No cgroups in a container: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# A requeued job becomes eligible when cred_expire has passed, which is no scheduling event:
# the periodic passes start it (backfill every 30 s, the main loop every 60 s by default).
# Every 2 s here, so a requeue round trip takes seconds rather than up to half a minute.
SchedulerParameters=bf_interval=2,sched_interval=2
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
$node_lines
PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
SLURMCONF
conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 0644 "$new_conf" "$CONF"
    conf_changed=1
    log "wrote $CONF (cluster $CLUSTER, nodes ${NODE_NAMES[*]}, CPUs=$CPUS, RealMemory=$REAL_MEM MB)"
else
    touch "$CONF"  # checked against this script: the fast path above may be taken again
fi
rm -f "$new_conf"
# An empty cgroup.conf keeps slurmd from complaining on hosts where it looks for one.
[ -f "$CONF_DIR/cgroup.conf" ] || echo "# cgroups unused (proctrack/linuxproc, task/none)" >"$CONF_DIR/cgroup.conf"

# ---- 4. munge ------------------------------------------------------------------------
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

# ---- 5. slurmctld + slurmd -----------------------------------------------------------
# One slurmd per node; in the one-node layout the node is the host and needs no -N.
slurmd_args() { if [ "$NODES" = 1 ]; then echo "-f $CONF"; else echo "-f $CONF -N $1"; fi; }
if [ "$conf_changed" = 1 ]; then
    # A running daemon holds the old config: restart it with the new one.
    for n in "${NODE_NAMES[@]}" ""; do
        if [ -n "$n" ]; then pf="$(node_pid_file "$n")"; d=slurmd; else pf="$CTLD_PID"; d=slurmctld; fi
        if pid_alive "$pf" "$d"; then
            log "restarting $d${n:+ for node $n} (config changed)"
            kill "$(cat "$pf")" || true
            for _ in $(seq 1 50); do pid_alive "$pf" "$d" || break; sleep 0.2; done
        fi
    done
fi
if ! pid_alive "$CTLD_PID" slurmctld; then
    log "starting slurmctld"
    /usr/sbin/slurmctld -f "$CONF" || die "slurmctld failed to start (see $CTLD_LOG)"
fi
for _ in $(seq 1 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer 'scontrol ping' (see $CTLD_LOG)"
for n in "${NODE_NAMES[@]}"; do
    if ! pid_alive "$(node_pid_file "$n")" slurmd; then
        log "starting slurmd for node $n"
        # shellcheck disable=SC2046
        /usr/sbin/slurmd $(slurmd_args "$n") || die "slurmd for node $n failed to start (see ${SLURMD_LOG//%n/$n})"
    fi
done

# ---- 6. wait for the nodes -------------------------------------------------------------
deadline=$(( $(date +%s) + WAIT_S ))
declare -A resumed=()
while :; do
    if all_nodes_usable; then
        log "up: cluster $CLUSTER, nodes ${NODE_NAMES[*]} (partition debug, $CPUS CPUs each)"
        finish
    fi
    for n in "${NODE_NAMES[@]}"; do
        state="$(node_state "$n")"
        case "$state" in
            down*|drain*|fail*)
                # A node that was down/drained in saved state (e.g. a previous slurmd was
                # killed) stays that way until resumed by hand.
                if [ -z "${resumed[$n]:-}" ]; then
                    reason="$(sinfo -h -N -n "$n" -o '%E' 2>/dev/null || true)"
                    log "node $n is $state (${reason:-no reason}); resuming it"
                    scontrol update nodename="$n" state=resume 2>/dev/null || true
                    resumed[$n]=1
                fi ;;
        esac
    done
    if [ "$(date +%s)" -ge "$deadline" ]; then
        sinfo -N -l >&2 || true
        for n in "${NODE_NAMES[@]}"; do tail -n 20 "${SLURMD_LOG//%n/$n}" >&2 2>/dev/null || true; done
        die "nodes ${NODE_NAMES[*]} not all schedulable after ${WAIT_S}s; see $CTLD_LOG and ${SLURMD_LOG//%n/<node>}"
    fi
    sleep 1
done
