"""All rank discovery in one place: accelerate launch / torchrun, SLURM srun, submitit.

Whatever launched us, the result is the torch.distributed environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and one Accelerator built from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator

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


def slurm_master_port() -> int:
    """One port per job (two jobs sharing a node must not collide): the one rule for every launch
    path: srun tasks, submitit members, and slurm/{mlm,classify}.sbatch (which repeat it in bash)."""
    job = int(os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "0")) or 0)
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
    return 20000 + (job * 7 + task) % 20000


def export_slurm_env(overwrite: bool = False) -> None:
    """Under ``srun`` with one task per GPU (no torchrun), map SLURM's task variables to torch's.

    Does nothing when the job has a single task, nor (unless ``overwrite``) when a launcher already
    set RANK (accelerate launch, torchrun). ``overwrite=True`` is for submitit members, whose
    processes are SLURM tasks: a job submitted from inside another job must not keep its parent's
    ranks. All GPUs of the node stay visible: accelerate selects cuda:LOCAL_RANK itself. An explicit
    MASTER_PORT (e.g. from the job file's env section) is kept in both cases.
    """
    if "SLURM_PROCID" not in os.environ or ("RANK" in os.environ and not overwrite):
        return
    ntasks = _slurm_ntasks()
    if ntasks <= 1:
        return
    ranks = {
        "RANK": os.environ["SLURM_PROCID"],
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
        "MASTER_ADDR": _first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
    }
    for key, value in ranks.items():
        if overwrite or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(slurm_master_port()))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _slurm_ntasks() -> int:
    return int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1)


def launched_processes() -> int:
    """How many processes the launcher started for this command: WORLD_SIZE (accelerate launch,
    torchrun), or the SLURM task count where export_slurm_env would map srun's tasks to ranks."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        return max(world_size_from_env(), _slurm_ntasks())
    return world_size_from_env()


def _quiet_deepspeed_deprecations() -> None:
    """DeepSpeed (0.19) calls collectives that torch >= 2.13 deprecates; the FutureWarning came
    back at every call (something in the stack resets the warnings registry: 1,016 lines in a
    15-step ZeRO-3 run), drowning the run's own output. It is DeepSpeed's to fix, not the user's."""
    import warnings

    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )


def make_accelerator(
    mixed_precision: str,
    grad_accum: int,
    *,
    micro_batch: int | None = None,
    max_grad_norm: float | None = None,
):
    """Create the Accelerator; multi-process CPU runs use gloo.

    ``micro_batch`` (train.batch_size) and ``max_grad_norm`` fill the DeepSpeed JSON's "auto"
    entries when launched with a DeepSpeed config; without them (evaluation, prediction) nothing
    is prepared for training and DeepSpeed needs neither.

    Without an explicit ``PartialState(backend="gloo")`` first, accelerate on CPU (DeepSpeed
    especially) reports one process on every rank and every rank thinks it is the main one.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    export_slurm_env()
    deepspeed = _deepspeed_requested()
    if deepspeed:
        _quiet_deepspeed_deprecations()
    multi_cpu = world_size_from_env() > 1 and not torch.cuda.is_available()
    if deepspeed and not torch.cuda.is_available():
        _skip_deepspeed_shm_op()
    if multi_cpu:
        # cpu=True as well (DDP): without it accelerate sees LOCAL_RANK, finds no GPU, and falls
        # back to DistributedType.NO, where wait_for_everyone() and gather() silently do nothing.
        # Under DeepSpeed cpu must stay False, or accelerate picks MULTI_CPU instead of DEEPSPEED.
        PartialState(cpu=not deepspeed, backend="gloo")
    from accelerate.utils import DistributedType

    # Under DeepSpeed accelerate writes the precision it is given into the JSON's bf16/fp16 "auto"
    # entries (and passing None would mean ACCELERATE_MIXED_PRECISION, i.e. "no": bf16 silently
    # off on a GPU). A second Accelerator in one process (`radtrain demo`: mlm, then classify)
    # shares the state, which under DeepSpeed records "no": it must pass None or accelerate refuses.
    second = deepspeed and bool(AcceleratorState._shared_state)
    accelerator = Accelerator(
        cpu=multi_cpu and not deepspeed,
        mixed_precision=None if second else mixed_precision,
        gradient_accumulation_steps=grad_accum,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, mixed_precision, grad_accum, micro_batch, max_grad_norm)
    if accelerator.num_processes != world_size_from_env():
        # Every rank would train alone on all the data and overwrite the others' files.
        raise RuntimeError(
            f"launched with WORLD_SIZE={world_size_from_env()} but accelerate sees {accelerator.num_processes} "
            f"process(es) ({accelerator.distributed_type}); check the accelerate config"
        )
    return accelerator


@contextlib.contextmanager
def plain_model_loading() -> Iterator[None]:
    """``from_pretrained`` builds an ordinary, whole model here, even inside a ZeRO-3 run.

    accelerate registers its DeepSpeed config with transformers whenever ZeRO-3 is active
    (whatever ``zero3_init_flag`` says), and transformers then builds every ``from_pretrained``
    model under ``deepspeed.zero.Init``: parameters partitioned to empty shards, usable only inside
    a DeepSpeed engine. That is right for the model being trained (``model.init_from``) but wrong
    for the exported model every rank loads whole for the test evaluation: its forward fails
    ("Padding_idx must be within num_embeddings").
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    registered = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered is not None:
            hf_deepspeed.set_hf_deepspeed_config(registered)


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _skip_deepspeed_shm_op() -> None:
    """CPU only: keep DeepSpeed from JIT-compiling its shared-memory all-reduce op.

    On the CPU accelerator DeepSpeed's communication backend compiles ``deepspeed_shm_comm`` (C++,
    measured ~66 s on our 2-core machine, and it needs a compiler) the first time it starts. The op
    serves only ``inference_all_reduce`` (tensor-parallel inference); training collectives go
    through torch.distributed/gloo either way. ``deepspeed.ops.__compatible_ops__`` is a module-level
    dict that DeepSpeed documents as persistent, so marking the op incompatible skips the build.
    """
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception as exc:  # noqa: BLE001 - an optimisation only; DeepSpeed then builds the op
        log.debug("could not disable DeepSpeed's shm op: %s", exc)


# DeepSpeed JSON keys whose value the training loop decides: the JSON says "auto" and radtrain
# fills them, so each hyperparameter keeps one home (radtrain's config).
_LOOP_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def configure_deepspeed(
    accelerator,
    mixed_precision: str,
    grad_accum: int,
    micro_batch: int | None,
    max_grad_norm: float | None,
) -> None:
    """Fill the DeepSpeed config's "auto" entries from radtrain's config, refuse contradictions.

    Must run before ``accelerator.prepare``: DeepSpeed reads the dict at ``deepspeed.initialize``.
    accelerate alone would fill gradient_clipping with a hard-coded 1.0 and fail on the micro batch
    (it derives it from a DataLoader, and the loop has none).
    """
    from radtrain.config import ConfigError

    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    # Keys we filled for an earlier Accelerator of this process may be refilled with new values.
    owned: set[str] = getattr(plugin, "_radtrain_filled", set())
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": None if max_grad_norm is None else float(max_grad_norm),
    }
    for key, value in wanted.items():
        if value is None:
            continue
        current = ds.get(key, "auto")
        if current == "auto" or key in owned:
            ds[key] = value
            owned.add(key)
        elif float(current) != float(value):
            home = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps":
                    "train.grad_accum", "gradient_clipping": "train.max_grad_norm"}[key]
            raise ConfigError(
                f"{source} sets {key}={current} but radtrain's {home}={value}; write \"auto\" for {key} in "
                f"the DeepSpeed JSON and set {home} instead (one home per hyperparameter)"
            )
    if micro_batch is not None:
        global_batch = int(ds["train_micro_batch_size_per_gpu"]) * grad_accum * accelerator.num_processes
        if ds.get("train_batch_size", "auto") not in ("auto", global_batch) and "train_batch_size" not in owned:
            raise ConfigError(
                f"{source} sets train_batch_size={ds['train_batch_size']} but radtrain's global batch is "
                f"{global_batch} (train.batch_size x train.grad_accum x processes); write \"auto\""
            )
        ds["train_batch_size"] = global_batch
        owned.add("train_batch_size")
    plugin._radtrain_filled = owned

    # accelerate has already resolved "auto" precision from what make_accelerator passed; an
    # explicit true/false in the JSON that disagrees with train.precision is a second home.
    for key, enabled in (("bf16", mixed_precision == "bf16"), ("fp16", mixed_precision == "fp16")):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto" or "precision" in owned:
            section["enabled"] = enabled
        elif bool(section["enabled"]) != enabled:
            raise ConfigError(
                f"{source} sets {key}.enabled={section['enabled']} but train.precision resolves to "
                f"{mixed_precision!r}; write \"enabled\": \"auto\" in the JSON and choose train.precision"
            )
    owned.add("precision")

    zero = ds.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        # best/ is written from accelerator.get_state_dict, which under ZeRO-3 gathers the shards
        # only when this is true ("auto" means false): without it the export fails after epoch 1.
        log.info("ZeRO-3: setting stage3_gather_16bit_weights_on_model_save=true (needed for the best/ export)")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        plugin.zero3_save_16bit_model = True
    offload = zero.get("offload_optimizer", {}).get("device", "none")
    if offload not in (None, "none") and not torch.cuda.is_available():
        # DeepSpeedCPUAdam (what accelerate swaps AdamW for under offload) is a C++ op compiled at
        # first use; on a CPU-only machine offloading gains nothing, so keep the torch AdamW.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if accelerator.is_main_process:
        log.info(
            "DeepSpeed ZeRO-%s: micro batch %s x accumulation %s x %d processes = global batch %s; "
            "clipping %s; bf16 %s",
            zero.get("stage"), ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps"),
            accelerator.num_processes, ds.get("train_batch_size"), ds.get("gradient_clipping"),
            ds["bf16"]["enabled"],
        )
