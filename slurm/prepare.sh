#!/usr/bin/env bash
# Prepare a config's data on a CPU node, before the GPU job:
#
#   sbatch slurm/prepare.sh [CONFIG] [key=value ...]
#   sbatch --dependency=afterok:<this job id> slurm/pretrain_1b.sh [CONFIG] [key=value ...]
#
# CONFIG defaults to configs/pretrain_1b.yaml; pass the same CONFIG and overrides as the
# training job, so both find the same data cache (data.cache_dir, default run.out_dir/.cache,
# which must be on a filesystem the GPU nodes see). One process per allocated CPU tokenizes
# (`python -m trainer.prepare --workers N`). The job is resumable: if it is killed or hits its
# time limit, it requeues and the rerun keeps every finished shard. No GPUs, no
# hyperparameters here. Edit for your cluster: --partition/--account, --cpus-per-task, --time.
#SBATCH --job-name=prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

# sbatch runs a copy of this script from a spool directory: find the repository from the
# submit directory (or HARNESS_ROOT).
ROOT="${HARNESS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$ROOT/trainer/prepare.py" ] || { echo "cannot find the repository (trainer/prepare.py); submit from its root or set HARNESS_ROOT" >&2; exit 2; }
cd "$ROOT" || exit 2
if [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi

config=configs/pretrain_1b.yaml
case "${1:-}" in
    *.yaml|*.yml) config="$1"; shift ;;
esac
workers="${SLURM_CPUS_PER_TASK:-$(nproc)}"
echo "[prepare $(date '+%F %T')] $config $* with $workers workers on $(hostname)"
# One tokenizer thread per worker process; SentencePiece's own threads would oversubscribe.
export OMP_NUM_THREADS=1
exec python -m trainer.prepare "$config" "$@" --workers "$workers"
