"""``memdlm-pretrain``: train a masked diffusion LM with MemDLM's bi-level step.

With no options it trains the embedded default: a ~4M-parameter model, memory on, on the
bundled TinyShakespeare corpus, on the CPU, in a few minutes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading

from common.errors import UsageError
from launch.config_cli import build_config, format_help
from launch.messages import fail
from launch.process_guard import die_with_parent, started_by_torchrun

PROG = "memdlm-pretrain"
DESCRIPTION = (
    "Pretrain a masked diffusion language model with MemDLM's bi-level step (inner fast-weight\n"
    "updates along a simulated denoising trajectory, outer MDLM loss). Every config field below\n"
    "can be given as --section.field VALUE. Outputs go to --train.out_dir: metrics.jsonl (one JSON\n"
    "line per optimizer step), checkpoints/ (resumable; the latest is resumed automatically) and\n"
    "wandb/ (an offline run unless WANDB_MODE or --logging.wandb_mode says otherwise)."
)


LAUNCH_OPTIONS = [
    ("--nproc-per-node N", "start N ranks on this machine through torchrun (same as `torchrun "
                           "--nproc-per-node N -m launch.pretrain_cli ...`)"),
    ("--plan", "print the per-rank memory (weights, gradients, optimizer state by ZeRO stage, fast weights, "
               "activations, largest logits block) and FLOPs/step time of this run, and exit: no training, no "
               "process group"),
    ("--plan-world-size N", "ranks the plan is for (default: --nproc-per-node, else 1)"),
    ("--plan-mfu F", "model-FLOP utilisation the plan's step time assumes (default 0.4)"),
    ("--plan-peak-tflops F", "peak TFLOP/s per rank for the plan's step time (default 989.4, an H100's bf16)"),
]
PLAN_VALUES = {"--plan-world-size": int, "--plan-mfu": float, "--plan-peak-tflops": float}


def _split_plan_options(argv: list[str]) -> tuple[dict | None, list[str]]:
    """Take ``--plan`` and its ``--plan-*`` values out of ``argv``; None when no plan is asked for."""
    rest, values, wanted = [], {}, False
    tokens = iter(argv)
    for token in tokens:
        name, has_value, value = token.partition("=")
        if token == "--plan":
            wanted = True
        elif name in PLAN_VALUES:
            value = value if has_value else next(tokens, None)
            try:
                values[name] = PLAN_VALUES[name](value)
            except (TypeError, ValueError):
                raise UsageError(f"{name} expects a {PLAN_VALUES[name].__name__}, got {value!r}") from None
        else:
            rest.append(token)
    if values and not wanted:
        raise UsageError(f"{next(iter(values))} only goes with --plan")
    return (values if wanted else None), rest


def _print_plan(cfg, values: dict, nproc: int | None) -> int:
    from pretrain.train.plan import launch_plan

    text, _ = launch_plan(cfg, values.get("--plan-world-size", nproc or 1), values.get("--plan-mfu", 0.4),
                          values.get("--plan-peak-tflops", 989.4))
    print(text)
    return 0


def _split_launch_options(argv: list[str]) -> tuple[int | None, list[str]]:
    """Take ``--nproc-per-node N`` (or ``=N``) out of ``argv``."""
    rest, nproc = [], None
    tokens = iter(argv)
    for token in tokens:
        if token in ("--nproc-per-node", "--nproc_per_node"):
            nproc = next(tokens, None)
        elif token.startswith(("--nproc-per-node=", "--nproc_per_node=")):
            nproc = token.split("=", 1)[1]
        else:
            rest.append(token)
            continue
        if nproc is None or not nproc.isdigit() or int(nproc) < 1:
            raise UsageError(f"--nproc-per-node expects a positive integer, got {nproc!r}")
    return (int(nproc) if nproc is not None else None), rest


def _launch_with_torchrun(nproc: int, argv: list[str], out_dir: str) -> int:
    """One process per rank on this machine, through torchrun (restarts resume from checkpoints).

    The agent gets SIGTERM if this process dies (it then stops its ranks), and each rank dies with the
    agent (``launch.process_guard``), so no rank outlives the command that started it. The agent's standard
    error passes through this process: once rank 0 has recorded a usage error in ``MEMDLM_ERROR_FILE``, the
    rest (torchrun's report of the failed ranks) is dropped and this process prints the error as one line and
    exits 2, as for a usage error found before the ranks start."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "launch.pretrain_cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Time for the ranks to finish their step and save after a signal, before torchrun kills them.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    # Ctrl-C raises KeyboardInterrupt here even if this process was started with SIGINT ignored (an inherited
    # SIG_IGN survives exec, and Python then leaves it): the agent reacts to it, so this process must know.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="memdlm-launch-") as scratch:
        error_file = os.path.join(scratch, "usage_error")
        env[ERROR_FILE_VARIABLE] = error_file
        agent = subprocess.Popen(command, env=env, stderr=subprocess.PIPE,
                                 preexec_fn=lambda: die_with_parent(signal.SIGTERM))
        relay = threading.Thread(target=_relay, args=(agent.stderr, error_file), daemon=True)
        relay.start()
        interrupted = False
        while True:
            try:
                code = agent.wait()
                break
            except KeyboardInterrupt:  # the agent got the same Ctrl-C and stops its ranks; wait for it
                interrupted = True
        relay.join(timeout=10)
        if os.path.exists(error_file):
            with open(error_file) as handle:
                return fail(PROG, handle.read())
    if interrupted:
        print(f"{PROG}: interrupted; {_newest_checkpoint_text(out_dir)}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return _requeue_code(code, out_dir)


ERROR_FILE_VARIABLE = "MEMDLM_ERROR_FILE"


def _relay(stream, error_file: str) -> None:
    """Copy the agent's standard error to ours as it comes, until a rank has recorded a usage error."""
    out = sys.stderr.buffer
    for chunk in iter(lambda: os.read(stream.fileno(), 1 << 16), b""):
        if os.path.exists(error_file):
            continue  # torchrun's report of the ranks that stopped: the one line said it all
        out.write(chunk)
        out.flush()


def _fail(message: str) -> int:
    """Only rank 0 reports: every rank of a launch checks the same options. Under our launcher the message is
    also recorded, so that the launcher exits 2 without torchrun's report."""
    if not _is_main_rank():
        return 2
    error_file = os.environ.get(ERROR_FILE_VARIABLE)
    if not error_file:
        return fail(PROG, message)
    with open(error_file + ".tmp", "w") as handle:  # the launcher prints it
        handle.write(message)
    os.replace(error_file + ".tmp", error_file)
    return 2


SHUTDOWN_TIMEOUT_S = 600


def _requeue_code(code: int, out_dir: str) -> int:
    """Ranks under torchrun exit 0 after a stop on a signal (else the elastic agent would restart them);
    the run directory's REQUEUE marker tells the caller to run the job again."""
    from pretrain.train.resilience import REQUEUE, REQUEUE_EXIT_CODE

    return REQUEUE_EXIT_CODE if code == 0 and os.path.exists(os.path.join(out_dir, REQUEUE)) else code


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(format_help(PROG, DESCRIPTION, LAUNCH_OPTIONS), end="")
        return 0
    try:
        nproc, argv = _split_launch_options(argv)
        plan, argv = _split_plan_options(argv)
        cfg = build_config(argv)
        if plan is not None:
            return _print_plan(cfg, plan, nproc)
    except UsageError as err:
        return _fail(str(err))
    if nproc is not None and "RANK" not in os.environ:
        from pretrain.train.preflight import preflight

        try:
            preflight(cfg, nproc)  # what would stop every rank at its start, said before any starts
        except UsageError as err:
            return _fail(str(err))
        return _launch_with_torchrun(nproc, argv, cfg.train.out_dir)

    from launch.slurm import ranks_from_slurm

    os.environ.update(ranks_from_slurm(os.environ))  # `srun python -m launch.pretrain_cli`: one task per rank
    if started_by_torchrun():
        die_with_parent(signal.SIGKILL)  # the launcher is gone: nobody could coordinate a save
    from launch.preemption import stop_on_signals
    from parallel.topology import shutdown_topology
    from pretrain.train.resilience import REQUEUE_EXIT_CODE, TrainingStopped
    from pretrain.train.trainer import train

    under_torchrun = started_by_torchrun()
    try:
        with stop_on_signals(announce=_is_main_rank() and not under_torchrun,
                             second_interrupt_aborts=not under_torchrun) as stop_flag:
            summary = train(cfg, stop_flag)
    except UsageError as err:
        return _fail(str(err))
    except TrainingStopped as err:
        if _is_main_rank():
            print(f"{PROG}: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if _is_main_rank():
            print(f"{PROG}: interrupted; {_newest_checkpoint_text(cfg.train.out_dir)}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    finally:
        shutdown_topology()
    if _is_main_rank():
        print(_summary_text(summary, cfg))
    if summary.stopped_early and not under_torchrun:
        # A checkpoint is saved: run the same command again to resume.
        return INTERRUPTED_EXIT_CODE if stop_flag.interrupted else REQUEUE_EXIT_CODE
    return 0


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _newest_checkpoint_text(out_dir: str) -> str:
    """Where a rerun of the same command resumes, or that nothing was saved."""
    latest = os.path.join(out_dir, "checkpoints", "latest")
    if os.path.isfile(latest):
        with open(latest) as handle:
            name = handle.read().strip()
        return (f"the newest checkpoint is {os.path.join(out_dir, 'checkpoints', name)}: rerun the same command to "
                "resume from it")
    return f"no checkpoint was saved in {out_dir}: a rerun starts from the beginning"


def _summary_text(summary, cfg) -> str:
    method = "MemDLM bi-level step" if cfg.memory.enabled else "plain MDLM (memory off)"
    wandb_line = f" The wandb run is in {summary.wandb_dir} (`wandb sync` uploads it)." if summary.wandb_dir else ""
    steps = f"{summary.steps_this_attempt} steps"
    if summary.start_step:
        steps += f" (steps {summary.start_step + 1}-{summary.steps_done}, resumed from {summary.resumed_from})"
    stopped = ""
    if summary.stopped_early:
        stopped = (f", stopped early at step {summary.steps_done} of {cfg.train.steps} (a checkpoint is saved: rerun "
                   "the same command to resume)")
    held_out = ""
    if summary.last_eval:
        from pretrain.train.metrics import held_out_line

        held_out = f" Held-out at {held_out_line(summary.last_eval)}."
    return (
        f"\nSummary: trained a {summary.num_parameters / 1e6:.2f}M-parameter diffusion LM with the {method} for "
        f"{steps}{stopped} in {summary.seconds / 60:.1f} min. The MDLM loss went from "
        f"{summary.first_loss:.3f} (mean of the first 10 steps {summary.first_losses_mean:.3f}) to "
        f"{summary.last_loss:.3f} (mean of the last 10 steps {summary.last_losses_mean:.3f}), at "
        f"{summary.tokens_per_s:.0f} tokens/s.{held_out} Metrics are in {summary.metrics_file}, the final "
        f"checkpoint in {summary.checkpoint}.{wandb_line}"
    )


if __name__ == "__main__":
    sys.exit(main())
