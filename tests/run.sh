#!/usr/bin/env bash
# The project's test command (README line 2, and what CI runs): install what the tests need,
# start the local one-node SLURM for the `slurm` tests, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch first, as its own step, and an already installed torch is kept rather than replaced. CI's
# pip finds the CPU wheel of this pin in its local wheel folder; elsewhere install torch first
# (README, Install: PyPI's Linux wheel is the CUDA build).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# --no-build-isolation: deepspeed ships as an sdist whose build imports torch; an isolated build
# environment would download a second, multi-GB torch just to build it.
python -m pip install -q setuptools wheel
python -m pip install -q --no-build-isolation -e ".[dev]"

# The slurm tests FAIL (not skip) when the cluster does not answer: a SLURM that did not start must
# not turn into a green run with no SLURM coverage. RADTRAIN_REQUIRE_SLURM=0 opts out (no SLURM here).
export RADTRAIN_REQUIRE_SLURM=${RADTRAIN_REQUIRE_SLURM:-1}
if ! bash slurm/local/start.sh; then
  echo "ERROR: the local SLURM did not start: tests marked 'slurm' will FAIL" \
    "(RADTRAIN_REQUIRE_SLURM=0 skips them instead)" >&2
fi

export TOKENIZERS_PARALLELISM=false WANDB_MODE=offline HF_HUB_OFFLINE=1
exec python -m pytest -q -p no:cacheprovider "$@"
