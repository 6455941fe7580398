"""All rank discovery in one place: accelerate launch / torchrun, SLURM srun, submitit.

Whatever launched us, the result is the torch.distributed environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and one Accelerator built from them.
"""

from __future__ import annotations

import logging
import os
import subprocess

import torch

log = logging.getLogger(__name__)


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True, timeout=30
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0]


def export_slurm_env() -> None:
    """Under ``srun`` with one task per GPU (no torchrun), map SLURM's task variables to torch's.

    Does nothing when a launcher already set RANK (accelerate launch, torchrun) or when the job
    has a single task.
    """
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    ntasks = int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")))
    if ntasks <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(ntasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    os.environ.setdefault("MASTER_ADDR", _first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    # One port per job: two jobs sharing a node must not collide.
    job = int(os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "0")) or 0)
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
    os.environ.setdefault("MASTER_PORT", str(20000 + (job * 7 + task) % 20000))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(mixed_precision: str, grad_accum: int):
    """Create the Accelerator; multi-process CPU runs use gloo.

    Without an explicit ``PartialState(backend="gloo")`` first, accelerate on CPU (DeepSpeed
    especially) reports one process on every rank and every rank thinks it is the main one.
    """
    from accelerate import Accelerator, PartialState

    export_slurm_env()
    multi_cpu = world_size_from_env() > 1 and not torch.cuda.is_available()
    if multi_cpu:
        # cpu=True as well: without it accelerate sees LOCAL_RANK, finds no GPU, and falls back
        # to DistributedType.NO, where wait_for_everyone() and gather() silently do nothing.
        PartialState(cpu=not _deepspeed_requested(), backend="gloo")
    from accelerate.utils import DistributedType

    accelerator = Accelerator(
        cpu=multi_cpu and not _deepspeed_requested(),
        mixed_precision=None if _deepspeed_requested() else mixed_precision,
        gradient_accumulation_steps=grad_accum,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _fill_deepspeed_auto(accelerator, mixed_precision)
    if accelerator.num_processes != world_size_from_env():
        # Every rank would train alone on all the data and overwrite the others' files.
        raise RuntimeError(
            f"launched with WORLD_SIZE={world_size_from_env()} but accelerate sees {accelerator.num_processes} "
            f"process(es) ({accelerator.distributed_type}); check the accelerate config"
        )
    return accelerator


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _fill_deepspeed_auto(accelerator, mixed_precision: str) -> None:
    """Precision has one home (train.precision): write it into the DeepSpeed config's 'auto'."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    for key, enabled in (("bf16", mixed_precision == "bf16"), ("fp16", False)):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
