#!/bin/bash
# The two-phase pipeline with plain sbatch (no submitit): MLM, then the classifier from the MLM
# export, chained with --dependency=afterok (the classifier starts only if the MLM job succeeded;
# if it failed, --kill-on-invalid-dep cancels the classifier instead of leaving it pending).
#
#   slurm/pipeline.sh ROOT [radtrain overrides for both phases ...]
#   slurm/pipeline.sh runs/rocov2 --config my_run.yaml data.source=eltorio/ROCOv2-radiology
#
# Writes ROOT/mlm/ and ROOT/classify/ (run directories) and ROOT/logs/{mlm,classify}-<jobid>.out;
# prints the two job ids. Environment:
#   SBATCH_ARGS        extra sbatch options for both jobs, e.g. "--partition=gpu --nodes=2 --time=08:00:00"
#   MLM_ARGS           radtrain overrides for the MLM phase only, e.g. "train.epochs=3 train.lr=1e-4"
#   CLASSIFY_ARGS      radtrain overrides for the classifier only, e.g. "train.epochs=10"
#   ACCELERATE_CONFIG, PROCS_PER_NODE, MAX_REQUEUES   see slurm/mlm.sbatch (passed on to the jobs)
# For sweeps, array jobs and the selection step use `radtrain submit jobs/<experiment>.yaml`.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 ROOT [radtrain overrides ...]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
root=$(mkdir -p "$1" && cd "$1" && pwd)
shift
mkdir -p "$root/logs"
read -r -a sbatch_args <<< "${SBATCH_ARGS:-}"
read -r -a mlm_args <<< "${MLM_ARGS:-}"
read -r -a classify_args <<< "${CLASSIFY_ARGS:-}"

mlm=$(sbatch --parsable "${sbatch_args[@]}" --output="$root/logs/mlm-%j.out" \
    "$here/mlm.sbatch" --output-dir "$root/mlm" "$@" "${mlm_args[@]}")
mlm=${mlm%%;*}
classify=$(sbatch --parsable "${sbatch_args[@]}" --dependency="afterok:$mlm" --kill-on-invalid-dep=yes --output="$root/logs/classify-%j.out" \
    "$here/classify.sbatch" --output-dir "$root/classify" "$@" "model.init_from=$root/mlm/best" "${classify_args[@]}")
classify=${classify%%;*}

echo "mlm      job $mlm -> $root/mlm  (log $root/logs/mlm-$mlm.out)"
echo "classify job $classify (afterok:$mlm) -> $root/classify  (log $root/logs/classify-$classify.out)"
