#!/usr/bin/env bash
# Pretrain the 1B config on SLURM:
#
#   sbatch slurm/pretrain_1b.sh [CONFIG] [key=value ...]
#
# CONFIG defaults to configs/pretrain_1b.yaml; key=value overrides go to
# `python -m trainer.train` unchanged. Env NPROC_PER_NODE overrides the processes per
# node (default: the node's GPUs, else 1). sbatch flags override the header below, e.g.
# a one-node CPU run on the local test cluster (make slurm-local):
#
#   NPROC_PER_NODE=2 sbatch --nodes=1 --gres=none slurm/pretrain_1b.sh configs/tiny.yaml
#
# Re-submitting the same command resumes from the last complete checkpoint. Before the
# time limit SLURM sends USR1 to this shell; the run checkpoints, the job requeues itself
# and continues (see slurm/launch.sh). No hyperparameters here: they live in the config.
#
# Edit for your cluster: --gres (GPUs per node), --partition/--account, --time.
#SBATCH --job-name=pretrain-1b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# (--ntasks-per-node=1: one torchrun per node, which starts the per-GPU processes.
#  --exclusive --mem=0: the whole node, all CPUs and memory for data loading.
#  --signal=B:USR1@120: USR1 to the batch shell only, 2 minutes before the time limit.
#  --requeue --open-mode=append: the requeued job keeps one log and one job id.)

set -uo pipefail

# sbatch runs a copy of this script from a spool directory, so find the repository from
# the submit directory (or HARNESS_ROOT, or the submitted script's path).
ROOT="${HARNESS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [ ! -f "$ROOT/slurm/launch.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    cmd="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
    [ -n "$cmd" ] && ROOT="$(cd "$(dirname "$cmd")/.." 2>/dev/null && pwd)"
fi
[ -f "$ROOT/slurm/launch.sh" ] || { echo "cannot find the repository (slurm/launch.sh); submit from its root or set HARNESS_ROOT" >&2; exit 2; }
cd "$ROOT" || exit 2

# The project's virtualenv (make setup), when there is one.
if [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi

# shellcheck source=slurm/launch.sh
source slurm/launch.sh
harness_launch configs/pretrain_1b.yaml "$@"
exit $?
