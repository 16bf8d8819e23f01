# Shared launch helper for the sbatch scripts in slurm/ (sourced, not run).
#
#   source slurm/launch.sh
#   harness_launch DEFAULT_CONFIG [CONFIG] [key=value ...]
#
# It starts one torchrun per node with srun; torchrun starts NPROC_PER_NODE trainer
# processes per node and they meet through a c10d rendezvous on the job's first node.
# Everything about the run (model, batch, steps, checkpoints) lives in the YAML config
# and the key=value overrides; this file only wires SLURM to `python -m trainer.train`.
#
# Preemption / time limit: submit with `--signal=B:USR1@120 --requeue`. SLURM then sends
# USR1 to this batch shell only (B:). We cannot let the signal reach torchrun: it has no
# USR1 handler, would die, and would never pass the signal on to the trainer. Instead the
# trap touches a stop file on the shared filesystem (HARNESS_STOP_FILE); every rank sees
# it at its next step, finishes that step, writes a checkpoint and exits 0. Then this
# shell runs `scontrol requeue`, and the requeued job resumes from that checkpoint
# because re-running the same command auto-resumes.
#
# Rendezvous: the first node of the allocation hosts torchrun's c10d store (named
# explicitly with is_host, not guessed from hostnames, which fails where several
# "nodes" share an address, or the name resolves to another interface). Its address is
# the node's name when that resolves, else the NodeAddr SLURM knows it by.
#
# On GPU nodes NCCL's flight recorder is on (TORCH_NCCL_TRACE_BUFFER_SIZE,
# TORCH_NCCL_DUMP_ON_TIMEOUT): a collective that times out (parallel.timeout_minutes)
# leaves per-rank traces in nccl-trace-<jobid>/ beside the job log, showing which
# collective each rank was in. Any of these set in the environment wins.
#
# Env knobs:
#   NPROC_PER_NODE   processes per node (default: GPUs on the node, else 1)
#   HARNESS_MASTER_PORT  rendezvous port (default: 20000 + job id % 20000, or the next
#                    free one on the first node)
#   HARNESS_STOP_DIR where stop files go (default: runs/.slurm under the submit dir;
#                    must be on a filesystem every node sees)
#   HARNESS_NO_REQUEUE=1  on a stop request, checkpoint and exit without requeueing

_hl_log() { echo "[launch $(date '+%F %T')] $*"; }

# GPUs on this node: the ones SLURM gave us, else the ones nvidia-smi sees, else 0.
_hl_gpus_on_node() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ] 2>/dev/null; then
        echo "$SLURM_GPUS_ON_NODE"; return
    fi
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    echo "${n:-0}"
}

# Processes per node: NPROC_PER_NODE, else one per GPU, else 1 (a CPU node runs one).
_hl_nproc_per_node() {
    if [ -n "${NPROC_PER_NODE:-}" ]; then echo "$NPROC_PER_NODE"; return; fi
    local n
    n="$(_hl_gpus_on_node)"
    if [ "$n" -gt 0 ] 2>/dev/null; then echo "$n"; else echo 1; fi
}

# The address the other nodes reach NODE at: its name when the name resolves, else the
# NodeAddr SLURM has for it (clusters whose node names are not in DNS). Empty if neither.
_hl_node_addr() {
    local node="$1" addr
    if getent hosts "$node" >/dev/null 2>&1; then echo "$node"; return; fi
    addr="$(scontrol show node "$node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2)"
    if [ -n "$addr" ] && { [[ "$addr" =~ ^[0-9.]+$ ]] || [[ "$addr" == *:* ]] || getent hosts "$addr" >/dev/null 2>&1; }; then
        echo "$addr"
    fi
}

# A port nothing listens on yet: START, or the next free one after it (checked only where
# this shell runs on the rendezvous node, which is where the store will listen).
_hl_free_port() {
    local port="$1" host="$2" i
    for i in $(seq 0 99); do
        if ! (exec 3<>"/dev/tcp/$host/$(( port + i ))") 2>/dev/null; then
            echo $(( port + i )); return
        fi
    done
    echo "$port"
}

# NCCL's flight recorder on GPU nodes: ranks record their last collectives and dump them
# when a collective times out, so a hang leaves a trace of who waited for what.
_hl_nccl_trace_env() {
    local dir="$1"
    [ "$(_hl_gpus_on_node)" -gt 0 ] 2>/dev/null || return 0
    export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
    export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
    if [ -z "${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-}" ]; then
        mkdir -p "$dir"
        export TORCH_NCCL_DEBUG_INFO_TEMP_FILE="$dir/rank_"
    fi
    _hl_log "NCCL flight recorder on: traces of a timed-out collective go to ${TORCH_NCCL_DEBUG_INFO_TEMP_FILE}<rank>"
}

harness_launch() {
    local default_config="$1"; shift

    [ -n "${SLURM_JOB_ID:-}" ] || { echo "harness_launch: not inside a SLURM job (submit with sbatch)" >&2; return 2; }

    # The first argument is the config when it looks like one; the rest are overrides.
    local config="$default_config"
    case "${1:-}" in
        *.yaml|*.yml) config="$1"; shift ;;
    esac
    [ -f "$config" ] || { echo "harness_launch: config not found: $config (cwd $PWD)" >&2; return 2; }

    # Rendezvous on the job's first node. The port is derived from the job id so that two
    # jobs sharing a node do not collide, and a requeued job (same id) reuses it; when
    # something already listens there (this shell runs on the first node), the next free
    # port is taken instead.
    local master_node master_addr
    master_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    master_addr="$(_hl_node_addr "$master_node")"
    [ -n "$master_addr" ] || { echo "harness_launch: cannot resolve the first node '$master_node' (not in DNS/hosts, and SLURM has no NodeAddr for it)" >&2; return 2; }
    # (HARNESS_MASTER_PORT, not MASTER_PORT: sbatch exports the submitting shell's env,
    # and a stray MASTER_PORT from an earlier torchrun session must not leak in.)
    local master_port="${HARNESS_MASTER_PORT:-}"
    if [ -z "$master_port" ]; then
        master_port=$(( 20000 + SLURM_JOB_ID % 20000 ))
        if [ "${SLURMD_NODENAME:-}" = "$master_node" ]; then
            master_port="$(_hl_free_port "$master_port" "$master_addr")"
        fi
    fi
    local nproc
    nproc="$(_hl_nproc_per_node)"
    local nnodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"

    # Stop file: named by job id (stable across requeues). A stale one from the previous
    # (stopped) start would stop this start at its first step, so remove it first.
    local stop_dir="${HARNESS_STOP_DIR:-$PWD/runs/.slurm}"
    mkdir -p "$stop_dir"
    export HARNESS_STOP_FILE="$stop_dir/stop-$SLURM_JOB_ID"
    rm -f "$HARNESS_STOP_FILE"

    _HL_STOP=0
    _HL_TERM=0
    # USR1: SLURM's --signal=B:USR1@N before the time limit, or `scancel -b -s USR1`:
    # checkpoint, stop, requeue.
    # TERM: scancel, preemption or a node going away. SLURM signals the job steps too
    # and then cancels (or itself requeues) the job, so we only ask the trainer to
    # checkpoint in the KillWait grace period, and never requeue: a requeue here would
    # resurrect a job the user just cancelled.
    trap '_HL_STOP=1; touch "$HARNESS_STOP_FILE"; _hl_log "USR1: asked the trainer to checkpoint and stop ($HARNESS_STOP_FILE)"' USR1
    trap '_HL_TERM=1; touch "$HARNESS_STOP_FILE"; _hl_log "TERM: asked the trainer to checkpoint and stop; no requeue"' TERM

    local restarts
    restarts="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2)"
    _hl_log "start job=$SLURM_JOB_ID restarts=${restarts:-0} nodes=$nnodes ($SLURM_JOB_NODELIST) nproc_per_node=$nproc" \
        "rdzv=$master_addr:$master_port config=$config overrides: $*"
    _hl_log "master (rendezvous host) is node $master_node ($master_addr:$master_port);" \
        "this batch shell runs on ${SLURMD_NODENAME:-$(hostname -s)}"

    local log_dir
    log_dir="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=\(.*\)$/\1/p' | head -n1)"
    log_dir="$(dirname "${log_dir:-$PWD/x}")"
    _hl_nccl_trace_env "$log_dir/nccl-trace-$SLURM_JOB_ID"

    # Unbuffered: the job log (--output) shows progress as it happens.
    export PYTHONUNBUFFERED=1

    # srun starts one torchrun per node (--ntasks-per-node=1); --kill-on-bad-exit stops
    # the other nodes when one fails. The node rank must be read on each node, hence the
    # inner shell (with c10d rendezvous torchrun assigns ranks itself anyway).
    # --cpus-per-task: give the one task per node all of the node's CPUs (since 22.05
    # srun does not inherit the batch job's --cpus-per-task), so torchrun and its workers
    # are not confined to one core where SLURM binds tasks.
    # SLURM_JOB_CPUS_PER_NODE looks like "64(x2),32": take the smallest node's count.
    local srun_cpus=() node_cpus
    node_cpus="$(echo "${SLURM_JOB_CPUS_PER_NODE:-}" | sed 's/(x[0-9]*)//g' | tr ',' '\n' | grep -E '^[0-9]+$' | sort -n | head -n1)"
    if [ -n "$node_cpus" ]; then srun_cpus=(--cpus-per-task="$node_cpus"); fi
    # Run in the background and `wait`: bash runs a trap only between commands, so a
    # foreground srun would delay the USR1 handling until training had ended.
    # Node 0 hosts the rendezvous store (is_host), the others connect to it.
    srun --kill-on-bad-exit=1 --nodes="$nnodes" --ntasks-per-node=1 "${srun_cpus[@]}" \
        bash -c 'host=false; [ "$SLURM_NODEID" = 0 ] && host=true
                 echo "[launch] node ${SLURMD_NODENAME:-$(hostname -s)}: torchrun (SLURM node $SLURM_NODEID), rendezvous host=$host"
                 exec torchrun --rdzv-conf="is_host=$host" "$@"' torchrun \
        --nnodes="$nnodes" --nproc-per-node="$nproc" \
        --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port" --rdzv-id="$SLURM_JOB_ID" \
        -m trainer.train "$config" "$@" &
    local srun_pid=$!

    # `wait` returns early (status > 128) when a trapped signal arrives; keep waiting
    # until srun itself has exited, then take its status.
    local rc
    while :; do
        wait "$srun_pid"; rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    rm -f "$HARNESS_STOP_FILE"

    if [ "$_HL_TERM" = 1 ]; then
        _hl_log "terminated (srun exit $rc); not requeueing"
        return "$rc"
    fi
    if [ "$_HL_STOP" = 1 ]; then
        if [ "${HARNESS_NO_REQUEUE:-0}" = 1 ]; then
            _hl_log "stopped on USR1 (srun exit $rc); HARNESS_NO_REQUEUE=1, not requeueing"
            return "$rc"
        fi
        _hl_log "stopped on USR1 (srun exit $rc); requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
        if scontrol requeue "$SLURM_JOB_ID"; then
            return 0
        fi
        _hl_log "scontrol requeue failed (was the job submitted with --requeue? JobRequeue=0?)"
        return 1
    fi
    if [ "$rc" != 0 ]; then
        _hl_log "FAILED (srun exit $rc): a trainer process or node failed; the first errors above say which" \
            "(a peer that hung or died ends the others after parallel.timeout_minutes at most)." \
            "Re-submit the same command to resume from the last complete checkpoint."
        return "$rc"
    fi
    _hl_log "done (srun exit $rc)"
    return "$rc"
}
