"""accelerate YAML -> the environment ``accelerate launch`` would give its processes."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from radtrain.config import ConfigError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- accelerate configs


ACCELERATE_ENV_PREFIXES = ("ACCELERATE_", "FSDP_", "MEGATRON_LM_", "PARALLELISM_CONFIG_")


def accelerate_env(config_file: str | Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file F`` gives its processes, for processes that
    SLURM starts instead (one task per GPU): computed by accelerate's own launch code, so DeepSpeed
    (ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_CONFIG_FILE, ..._ZERO_STAGE, ...), FSDP and DDP
    settings match ``accelerate launch`` exactly. Launch-only keys of the YAML (num_processes,
    num_machines, machine_rank, main_process_ip/port) are ignored: the job's resources decide those.
    """
    path = Path(str(config_file)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"accelerate_config {config_file} does not exist (paths are relative to the submit directory)"
        )
    path = path.resolve()
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(path), "--module", "radtrain"])
    accel_log = logging.getLogger("accelerate.commands.launch")
    level = accel_log.level
    accel_log.setLevel(logging.ERROR)  # "values were not passed to accelerate launch" noise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the port-in-use check is about a launch that never happens
            args, defaults, mp_from_config = _validate_launch_command(args)
            if args.use_deepspeed:
                # As accelerate's launch_command does before deepspeed_launcher.
                fields = list(defaults.deepspeed_config.keys()) if defaults else []
                if mp_from_config:
                    fields.append("mixed_precision")
                args.deepspeed_fields_from_accelerate_config = ",".join(fields)
                _, env = prepare_deepspeed_cmd_env(args)
            elif args.use_fsdp or args.multi_gpu or args.use_megatron_lm:
                env = prepare_multi_gpu_env(args)
            else:
                _, env = prepare_simple_launcher_cmd_env(args)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"accelerate_config {path}: accelerate rejects it: {exc}") from exc
    finally:
        accel_log.setLevel(level)
    out = {k: str(v) for k, v in sorted(env.items()) if k.startswith(ACCELERATE_ENV_PREFIXES)}
    ds_file = out.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds_file and ds_file != "none":
        # accelerate launch reads it relative to the launch directory; jobs may start elsewhere.
        candidates = [Path(ds_file).expanduser(), path.parent / ds_file]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"accelerate_config {path}: its deepspeed_config_file {ds_file} does not exist")
        out["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(found.resolve())
    return out
