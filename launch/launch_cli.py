"""``memdlm-launch slurm``: write (and optionally submit) the sbatch script of a training run.

The options after ``--`` are ``memdlm-pretrain``'s, unchanged; they are checked here first (config and
layout for the allocation's world size) so a mistake shows before the job waits in the queue.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common.errors import UsageError
from launch.messages import fail
from launch.slurm import PrepareJob, SlurmJob, prepare_scripts, sbatch_script

PROG = "memdlm-launch"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Launch memdlm-pretrain on a cluster. `memdlm-launch slurm [options] -- "
        "<memdlm-pretrain options>` writes OUT/slurm/job.sbatch (OUT: the run's --train.out_dir), prints it, "
        "and with --submit submits it. See README, Clusters.")
    commands = parser.add_subparsers(dest="command", required=True)
    slurm = commands.add_parser("slurm", help="an sbatch script: one srun task per node running torchrun",
                                description="Write the sbatch script of a run: one srun task per node running "
                                "torchrun with the c10d rendezvous on the first node, USR1 before the time limit, "
                                "requeue on preemption, one log per job attempt.")
    slurm.add_argument("--nodes", type=int, required=True, help="nodes (the most nodes, for an elastic run)")
    slurm.add_argument("--min-nodes", type=int, default=0,
                       help="elastic: the run goes on with as few as this many nodes (torchrun --nnodes MIN:MAX); "
                            "0 (default): a fixed number of nodes")
    slurm.add_argument("--max-restarts", type=int, default=3,
                       help="torchrun restarts of the workers on a membership change or failure (default 3)")
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: a CPU run, gloo)")
    slurm.add_argument("--nproc-per-node", type=int, default=0,
                       help="ranks per node (default: one per GPU, or 1 without GPUs)")
    slurm.add_argument("--cpus-per-task", type=int, default=0, help="CPUs for each node's task (all its ranks)")
    slurm.add_argument("--gpu-memory-gb", type=float, default=0.0,
                       help="GiB of memory per GPU: print the run's per-rank plan (memdlm-pretrain --plan) and refuse "
                            "a layout whose ranks would not fit (default 0: no check)")
    slurm.add_argument("--partition", default="", help="Slurm partition (default: the cluster's default)")
    slurm.add_argument("--account", default="", help="Slurm account (default: yours)")
    slurm.add_argument("--time", default="", help="time limit, e.g. 24:00:00 (default: the partition's)")
    slurm.add_argument("--job-name", default="memdlm", help="job name (default memdlm)")
    slurm.add_argument("--grace", type=int, default=120,
                       help="seconds before the time limit at which the run is told to save and requeue (default 120)")
    slurm.add_argument("--python", default=sys.executable, help="the Python that runs torchrun on the nodes "
                                                                "(default: this one)")
    slurm.add_argument("--sbatch-option", action="append", default=[],
                       help="an extra #SBATCH line, e.g. --sbatch-option=--exclusive (repeatable; default: none)")
    mode = slurm.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="write and print the script only (the default)")
    mode.add_argument("--submit", action="store_true", help="also submit it with sbatch and print the job id")
    prepare = commands.add_parser(
        "slurm-prepare", help="prepare a corpus on many nodes: a Slurm array of memdlm-prepare-data parts, then "
        "the merge", description="Write (and with --submit submit) two sbatch scripts in OUT/slurm/ (OUT: the "
        "--output after --): an array job whose task I runs `memdlm-prepare-data ... --num-parts N --part I`, and "
        "the `--merge OUT` job, submitted to start once every part succeeded. The options after -- are "
        "memdlm-prepare-data's (--input, --output and a shared --tokenizer are required; train one first with "
        "--tokenizer-only). Resubmitting after a failure redoes only the parts not finished.")
    prepare.add_argument("--parts", type=int, required=True, help="parts (array tasks) to cut the input files into")
    prepare.add_argument("--max-parallel", type=int, default=0,
                         help="at most this many parts running at once (default 0: no limit)")
    prepare.add_argument("--cpus-per-task", type=int, default=0,
                         help="CPUs per part; its tokenization processes are one fewer (default: Slurm's default)")
    prepare.add_argument("--partition", default="", help="Slurm partition (default: the cluster's default)")
    prepare.add_argument("--account", default="", help="Slurm account (default: yours)")
    prepare.add_argument("--time", default="", help="time limit per part, e.g. 4:00:00 (default: the partition's)")
    prepare.add_argument("--job-name", default="memdlm-prepare", help="job name (default memdlm-prepare)")
    prepare.add_argument("--python", default=sys.executable, help="the Python on the nodes (default: this one)")
    prepare.add_argument("--sbatch-option", action="append", default=[],
                         help="an extra #SBATCH line for both jobs (repeatable; default: none)")
    mode = prepare.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="write and print the scripts only (the default)")
    mode.add_argument("--submit", action="store_true", help="also submit both and print the job ids")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, train_args = argv[:split], argv[split + 1:]
    args = _parser().parse_args(argv)
    if args.command == "slurm-prepare":
        return _slurm_prepare(args, train_args)
    try:
        job = _job(args, train_args)
    except UsageError as err:
        return fail(PROG, str(err))
    (path,) = _write_scripts(job.out_dir / "slurm", {"job.sbatch": sbatch_script(job)})
    if not args.submit:
        return 0
    try:
        job_id = _submit(path)
    except UsageError as err:
        return fail(PROG, str(err))
    print(f"submitted job {job_id}; logs in {job.out_dir / 'slurm'}")
    return 0


def _write_scripts(folder: Path, scripts: dict[str, str]) -> list[Path]:
    """Write each script into ``folder`` and print it (the paths to standard error); the paths, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in scripts]
    for path, script in zip(paths, scripts.values()):
        path.write_text(script)
        print(script, end="")
    print(f"# written to {' and '.join(str(p) for p in paths)}", file=sys.stderr)
    return paths


def _submit(script: Path, *options: str) -> str:
    """Submit ``script``; its job id (a ``UsageError`` when sbatch is missing or fails)."""
    try:
        result = subprocess.run(["sbatch", "--parsable", *options, str(script)], capture_output=True, text=True,
                                timeout=120)
    except FileNotFoundError:
        raise UsageError("sbatch is not on PATH; run this on a Slurm login node") from None
    if result.returncode != 0:
        raise UsageError(f"sbatch failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def _slurm_prepare(args, prepare_args: list[str]) -> int:
    from data_pipeline.errors import DataError
    from data_pipeline.prepare import check_split_output
    from launch.prepare_cli import build_parser, options_from

    try:
        if args.parts < 1:
            raise UsageError("--parts must be positive")
        if any(a.split("=")[0] in ("--num-parts", "--part", "--merge") for a in prepare_args):
            raise UsageError("give the number of parts as slurm-prepare's --parts; --num-parts, --part and --merge "
                             "are set by the jobs")
        parsed = build_parser().parse_args(prepare_args)
        if not parsed.input or not parsed.output:
            raise UsageError("memdlm-prepare-data's --input and --output are required after --")
        options = options_from(parsed)
        options.num_parts, options.part = args.parts, 0
        options.check()
        from data_pipeline.prepare import input_units

        input_units(options)  # the input files exist and are readable
        output = Path(options.output).absolute()
        check_split_output(output)
    except (UsageError, DataError) as err:
        return fail(PROG, str(err))
    job = PrepareJob(parts=args.parts, output=output, prepare_args=prepare_args, cpus_per_task=args.cpus_per_task,
                     partition=args.partition, account=args.account, time=args.time, job_name=args.job_name,
                     python=args.python, workdir=os.getcwd(), max_parallel=args.max_parallel,
                     extra_sbatch=args.sbatch_option)
    from common.output_folders import write_marker

    output.mkdir(parents=True, exist_ok=True)
    write_marker(output, "memdlm-prepare-data")
    array_script, merge_script = prepare_scripts(job)
    paths = _write_scripts(output / "slurm", {"prepare.sbatch": array_script, "merge.sbatch": merge_script})
    if not args.submit:
        return 0
    try:
        array_id = _submit(paths[0])
        merge_id = _submit(paths[1], f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes")
    except UsageError as err:
        return fail(PROG, str(err))
    print(f"submitted array job {array_id} ({args.parts} parts) and merge job {merge_id}; logs in {output / 'slurm'}")
    return 0


def _job(args, train_args: list[str]) -> SlurmJob:
    from launch.config_cli import build_config
    from pretrain.train.factory import check_run_layout

    if args.nodes < 1:
        raise UsageError("--nodes must be positive")
    if args.min_nodes and not 1 <= args.min_nodes <= args.nodes:
        raise UsageError(f"--min-nodes {args.min_nodes} must lie in 1..--nodes {args.nodes}")
    if any(a.startswith("--nproc-per-node") or a.startswith("--nproc_per_node") for a in train_args):
        raise UsageError("give ranks per node as memdlm-launch's --nproc-per-node, not after --")
    cfg = build_config(train_args)
    job = SlurmJob(nodes=args.nodes, out_dir=Path(cfg.train.out_dir).absolute(), train_args=train_args,
                   gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
                   cpus_per_task=args.cpus_per_task, min_nodes=args.min_nodes, max_restarts=args.max_restarts,
                   partition=args.partition, account=args.account, time=args.time, job_name=args.job_name,
                   grace_s=args.grace, python=args.python, workdir=os.getcwd(), extra_sbatch=args.sbatch_option)
    for nodes in range(args.min_nodes or args.nodes, args.nodes + 1):
        try:
            check_run_layout(cfg, nodes * job.ranks_per_node)
        except UsageError as err:
            which = f"with {nodes} of the elastic run's nodes" if args.min_nodes else f"on {nodes} nodes"
            raise UsageError(f"{which} ({nodes * job.ranks_per_node} ranks): {err}") from None
    if args.gpu_memory_gb:
        _check_memory(cfg, args.nodes * job.ranks_per_node, args.gpu_memory_gb)
    if cfg.train.out_dir == "runs/default" and not Path(cfg.train.out_dir).is_absolute():
        print(f"{PROG}: note: the run writes to {job.out_dir} (--train.out_dir)", file=sys.stderr)
    return job


def _check_memory(cfg, world_size: int, gpu_memory_gb: float) -> None:
    """Print the plan; refuse when its largest rank exceeds the stated GPU memory."""
    from pretrain.train.plan import GIB, launch_plan

    text, largest = launch_plan(cfg, world_size)
    print(text, file=sys.stderr)
    needed = largest / GIB
    if needed > gpu_memory_gb:
        raise UsageError(
            f"the plan needs {needed:.1f} GiB on its fullest rank but --gpu-memory-gb is {gpu_memory_gb:g}: raise "
            "--parallel.zero_stage, --parallel.tensor_parallel_size or --parallel.pipeline_parallel_size, lower "
            "--train.micro_batch_size, or use --train.recompute full")


if __name__ == "__main__":
    sys.exit(main())
