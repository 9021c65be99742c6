"""The sbatch script of a Slurm run, and the ``srun python`` path's rank variables.

One ``srun`` task per node runs ``torchrun`` (``--nproc-per-node`` ranks) with the c10d rendezvous on the
allocation's first node (``scontrol show hostnames``) on a port derived from the job id. Elastic runs
(``--min-nodes``) allocate the most nodes and give torchrun ``--nnodes MIN:MAX`` and ``--max-restarts``:
when a node is lost the agents left re-form the group and every rank restarts from the newest checkpoint
at the new data-parallel size; the rendezvous settles in seconds (``last_call_timeout``, fast keep-alives)
instead of torchrun's 30-40 s defaults.

Preemption: Slurm sends USR1 to the batch shell ``grace`` seconds before the time limit
(``--signal=B:USR1@grace``), ``scancel --signal=USR1 --batch`` does the same; the shell forwards it to
srun, srun to the torchrun agents, and the agents (``--signals-to-handle``) to the ranks, which agree on a
stop step, save one checkpoint and exit. The shell then requeues the job unless the run wrote its DONE
marker (a signal after the last step must not start the run again). A rank stopped by a signal sent to it
alone leaves a REQUEUE marker, which also requeues. Each attempt logs to
``OUT/slurm/job-<id>.attempt-<n>.log`` (``SLURM_RESTART_COUNT``).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

RENDEZVOUS_CONF = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=120"


@dataclass
class SlurmJob:
    nodes: int
    out_dir: Path
    train_args: list[str]
    gpus_per_node: int = 0
    nproc_per_node: int = 0  # 0: one per GPU, or 1 without GPUs
    cpus_per_task: int = 0
    min_nodes: int = 0  # 0: not elastic
    max_restarts: int = 3
    partition: str = ""
    account: str = ""
    time: str = ""
    job_name: str = "memdlm"
    grace_s: int = 120
    python: str = "python"
    workdir: str = ""
    extra_sbatch: list[str] = field(default_factory=list)

    @property
    def ranks_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1


def sbatch_script(job: SlurmJob) -> str:
    out = shlex.quote(str(job.out_dir))
    # An allocation never grows: it asks for the most nodes; the run goes on with as few as --min-nodes.
    directives = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
                  f"--signal=B:USR1@{job.grace_s}", "--requeue", "--open-mode=append",
                  f"--output={job.out_dir}/slurm/%x-%j.batch.log"]
    if job.gpus_per_node:
        directives.append(f"--gpus-per-node={job.gpus_per_node}")
    directives += resource_directives(job)
    nnodes = f"{job.min_nodes}:{job.nodes}" if job.min_nodes else str(job.nodes)
    torchrun = [job.python, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
                f"--nproc-per-node={job.ranks_per_node}", "--rdzv-backend=c10d", '--rdzv-endpoint="$HEAD:$PORT"',
                '--rdzv-id="$SLURM_JOB_ID"', f"--rdzv-conf={RENDEZVOUS_CONF}", f"--max-restarts={job.max_restarts}",
                "--signals-to-handle=SIGTERM,SIGUSR1,SIGINT", "-m", "launch.pretrain_cli",
                *(shlex.quote(a) for a in job.train_args)]
    # srun does not inherit --cpus-per-task from sbatch (Slurm 22.05+): without it every rank of a node may share
    # one CPU. A fixed-size run ends when one node's task fails; an elastic run lets the others go on.
    srun = ["srun", f"--kill-on-bad-exit={0 if job.min_nodes else 1}", "--ntasks-per-node=1"]
    if job.cpus_per_task:
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    lines = ["#!/bin/bash", "# written by memdlm-launch slurm; submit with sbatch (or memdlm-launch --submit)"]
    lines += [f"#SBATCH {d}" for d in directives]
    lines += [
        "set -u",
        f"OUT={out}",
        'ATTEMPT=${SLURM_RESTART_COUNT:-0}',
        'LOG="$OUT/slurm/job-$SLURM_JOB_ID.attempt-$ATTEMPT.log"',
        'mkdir -p "$OUT/slurm"',
        'if [ -f "$OUT/DONE" ]; then echo "$OUT/DONE exists: the run is finished, nothing to do"; exit 0; fi',
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'PORT=$(( 29500 + SLURM_JOB_ID % 20000 ))',
        # Each rank's share of its task's CPUs (Slurm's count on the node, not the submitting machine's).
        f"CPUS=${{SLURM_CPUS_PER_TASK:-${{SLURM_CPUS_ON_NODE:-1}}}}; THREADS=$(( CPUS / {job.ranks_per_node} ))",
        '[ "$THREADS" -ge 1 ] || THREADS=1',
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS} WANDB_MODE=${WANDB_MODE:-offline}",
        # The time torchrun's agents give their ranks to save after a signal before killing them.
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{max(30, job.grace_s - 10)}}}",
        'echo "attempt $ATTEMPT of job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, rendezvous $HEAD:$PORT, log $LOG"',
        "SIGNALLED=0",
        "SRUN=",
        "forward() { SIGNALLED=1; echo \"batch shell: $1, forwarded to srun\"; "
        '[ -n "$SRUN" ] && kill -s "$1" "$SRUN" 2>/dev/null; }',
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        " ".join(srun) + " " + " ".join(torchrun) + ' >> "$LOG" 2>&1 &',
        "SRUN=$!",
        "# wait returns early when a trapped signal arrives: wait again until srun has exited",
        'while :; do wait "$SRUN"; CODE=$?; kill -0 "$SRUN" 2>/dev/null || break; done',
        'if [ -f "$OUT/DONE" ]; then echo "finished (srun exit $CODE)"; exit 0; fi',
        'if [ "$SIGNALLED" = 1 ] || [ -f "$OUT/REQUEUE" ]; then',
        '  echo "stopped early with a checkpoint (srun exit $CODE): requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'echo "srun exited $CODE without finishing; see $LOG"',
        'exit "$CODE"',
    ]
    return "\n".join(lines) + "\n"


def ranks_from_slurm(environ: dict) -> dict[str, str]:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` for a rank started directly by
    ``srun python -m launch.pretrain_cli`` (one task per rank), from Slurm's variables; empty when this is
    not such a process (torchrun or a user already set RANK, or no Slurm step)."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_ID" not in environ:
        return {}
    values = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
              "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
              "LOCAL_WORLD_SIZE": environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]}
    if "MASTER_ADDR" not in environ:
        values["MASTER_ADDR"] = _first_host(environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", ""))
    if "MASTER_PORT" not in environ:
        values["MASTER_PORT"] = str(29500 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    return values


def _first_host(nodelist: str) -> str:
    import subprocess

    try:
        names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        names = []
    return names[0] if names else "127.0.0.1"


# -- preparing a corpus on many nodes ---------------------------------------------------------------
@dataclass
class PrepareJob:
    """``memdlm-prepare-data`` as a Slurm array (one task per part), then the merge once every part succeeded."""

    parts: int
    output: Path
    prepare_args: list[str]  # memdlm-prepare-data's options, without --num-parts / --part
    cpus_per_task: int = 0
    partition: str = ""
    account: str = ""
    time: str = ""
    job_name: str = "memdlm-prepare"
    python: str = "python"
    workdir: str = ""
    max_parallel: int = 0  # at most this many parts at once (0: no limit)
    extra_sbatch: list[str] = field(default_factory=list)


def resource_directives(job: SlurmJob | PrepareJob) -> list[str]:
    """The #SBATCH lines both kinds of job take from their options: CPUs, partition, account, time, working
    directory and the user's extra lines."""
    directives = [f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else []
    for flag, value in (("partition", job.partition), ("account", job.account), ("time", job.time)):
        if value:
            directives.append(f"--{flag}={value}")
    if job.workdir:
        directives.append(f"--chdir={job.workdir}")
    return directives + list(job.extra_sbatch)


def _common_directives(job: PrepareJob) -> list[str]:
    return ["--ntasks=1", *resource_directives(job)]


def prepare_scripts(job: PrepareJob) -> tuple[str, str]:
    """(the array job's script, the merge job's script). Each array task prepares part
    ``$SLURM_ARRAY_TASK_ID`` (a finished part is skipped, an interrupted one resumes, so resubmitting the array
    redoes only what is missing); the merge runs after the whole array succeeded (``afterok``)."""
    logs = f"{job.output}/slurm"
    throttle = f"%{job.max_parallel}" if job.max_parallel else ""
    array = [f"--job-name={job.job_name}", f"--array=0-{job.parts - 1}{throttle}",
             f"--output={logs}/prepare-%A-part-%a.log", *_common_directives(job)]
    workers = "--num-workers=$(( ${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-2}} > 1 ? " \
              "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-2}} - 1 : 1 ))"
    prepare = [job.python, "-m", "launch.prepare_cli", *(shlex.quote(a) for a in job.prepare_args),
               f"--num-parts={job.parts}", '--part="$SLURM_ARRAY_TASK_ID"', "--no-progress"]
    if not any(a.startswith("--num-workers") for a in job.prepare_args):
        prepare.append(workers)
    head = ["#!/bin/bash", "# written by memdlm-launch slurm-prepare"]
    array_script = head + [f"#SBATCH {d}" for d in array] + [
        "set -eu", "export OMP_NUM_THREADS=1",
        'echo "part $SLURM_ARRAY_TASK_ID of ' + str(job.parts) + ' on $(hostname)"',
        " ".join(prepare)]
    merge = [f"--job-name={job.job_name}-merge", f"--output={logs}/merge-%j.log", *_common_directives(job)]
    merge_script = head + [f"#SBATCH {d}" for d in merge] + [
        "set -eu", f"{job.python} -m launch.prepare_cli --merge {shlex.quote(str(job.output))} --no-progress"]
    return "\n".join(array_script) + "\n", "\n".join(merge_script) + "\n"
