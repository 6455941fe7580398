"""``radtrain submit JOB.yaml``: the two-phase pipeline as SLURM job arrays, through submitit.

One job file describes an experiment: shared run settings (the ``data``/``model``/``train``/
``tracking`` sections of any radtrain config), one section per phase with its sweep and its
cluster resources, and the selection step. ``submit`` turns it into at most three SLURM jobs::

    mlm       array, one member per sweep point
    classify  array, afterok:<mlm>; each member starts from its own MLM member's best/ or the best one
    select    afterok:<classify>; best member by validation metric -> test split once -> publish/copy

Every member is one multi-process job: ``tasks_per_node`` tasks (one per GPU) on ``nodes`` nodes,
each task one training process whose rank comes from SLURM (submitit's distributed environment).
An accelerate YAML named in the job file (DDP, DeepSpeed ZeRO, FSDP) is turned into the very
environment variables ``accelerate launch`` would set, and they are set in-process before the
Accelerator exists.

Preemption and time limits (who owns the signal): SLURM sends USR2 to every task
``signal_delay_s`` before the limit (submitit's ``--signal=USR2@N``; ``scancel --signal=USR2`` or
a preemption does the same). While the training loop runs, its StopFlag owns USR2/SIGTERM on every
rank: the ranks agree at the next optimizer step (one all-reduce), all save the checkpoint (a
collective that ends in a barrier) and raise ``ResumeRequested``; after USR1/USR2 the member then
requeues its own job (``scontrol requeue``, rank 0 only, after every rank has saved) and exits
without a result, so submitit sees the job as unfinished. After SIGTERM/SIGINT (``scancel``; a
preemption with PreemptMode=REQUEUE, which SLURM requeues itself) it saves and exits the same way
but does not requeue: a cancelled member stays cancelled. Outside the loop (data loading, test evaluation) submitit's
own handler keeps USR2 on rank 0: it calls ``checkpoint()`` (there is nothing to save there) and
requeues. The rerun has the same job id and the same run directory (named by member, not by job
id), so it resumes from the newest checkpoint and continues the same tracking run. ``max_requeues``
caps both paths (SLURM_RESTART_COUNT counts the reruns); past it the member fails, keeping its
checkpoints, and resubmitting the same job file continues it.

Nothing heavy is imported at module level: this module is unpickled first thing in every job and
must set the environment (offline flags, accelerate variables) before transformers is imported.

Modules: jobfile (the job file -> Pipeline of Steps and Members), launch_env (accelerate YAML ->
environment), jobs (MemberJob, SelectJob: what runs in the jobs), submit (sbatch rendering,
dry run, submission, the CLI).
"""

from radtrain.cluster.jobfile import (
    EVENTS_FILE,
    PHASES,
    PIPELINE_FILE,
    SELECTION_FILE,
    STEPS,
    Member,
    Pipeline,
    Resources,
    Step,
    load_job,
    member_name,
    sweep_points,
)
from radtrain.cluster.jobs import MemberJob, SelectJob, pick_best, restart_count
from radtrain.cluster.launch_env import accelerate_env
from radtrain.cluster.submit import (
    cmd_submit,
    describe,
    dry_run,
    log_folder,
    register_cli,
    sbatch_script,
    submit,
    submitit_command,
)

__all__ = [
    "EVENTS_FILE",
    "PHASES",
    "PIPELINE_FILE",
    "SELECTION_FILE",
    "STEPS",
    "Member",
    "MemberJob",
    "Pipeline",
    "Resources",
    "SelectJob",
    "Step",
    "accelerate_env",
    "cmd_submit",
    "describe",
    "dry_run",
    "load_job",
    "log_folder",
    "member_name",
    "pick_best",
    "register_cli",
    "restart_count",
    "sbatch_script",
    "submit",
    "submitit_command",
    "sweep_points",
]
