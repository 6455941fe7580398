"""``python -m radtrain.cluster.run_rank PHASE ARGS...``: ``radtrain PHASE ARGS`` for one training
process of slurm/{mlm,classify}.sbatch, which also touches ``$RADTRAIN_RESUME_MARKER`` when
training exits 75 (EXIT_RESUME: checkpoint saved, run me again to resume).

Why: ``accelerate launch`` turns any non-zero exit of its processes into its own 1, so the batch
script cannot tell "stopped with a checkpoint" from a crash by srun's exit code; it requeues only
when the marker exists.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from radtrain.cli import main as cli_main
    from radtrain.trainer import EXIT_RESUME

    rc = cli_main(sys.argv[1:] if argv is None else argv)
    marker = os.environ.get("RADTRAIN_RESUME_MARKER")
    if rc == EXIT_RESUME and marker:
        Path(marker).touch()
    return rc


if __name__ == "__main__":
    sys.exit(main())
