"""``memdlm-pretrain``: train a masked diffusion LM with MemDLM's bi-level step.

With no options it trains the embedded default: a ~4M-parameter model, memory on, on the
bundled TinyShakespeare corpus, on the CPU, in a few minutes.
"""

from __future__ import annotations

import os
import sys

from data_pipeline.errors import DataError
from launch.config_cli import build_config, format_help
from pretrain.config import ConfigError

PROG = "memdlm-pretrain"
DESCRIPTION = (
    "Pretrain a masked diffusion language model with MemDLM's bi-level step (inner fast-weight\n"
    "updates along a simulated denoising trajectory, outer MDLM loss). Every config field below\n"
    "can be given as --section.field VALUE. Outputs go to --train.out_dir: metrics.jsonl (one JSON\n"
    "line per optimizer step), checkpoints/ (resumable; the latest is resumed automatically) and\n"
    "wandb/ (an offline run unless WANDB_MODE or --logging.wandb_mode says otherwise)."
)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(format_help(PROG, DESCRIPTION), end="")
        return 0
    try:
        cfg = build_config(argv)
    except ConfigError as err:
        return _fail(str(err))
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.train.num_threads or os.cpu_count() or 1))

    from launch.preemption import stop_on_signals
    from parallel.topology import shutdown_topology
    from pretrain.trainer import train

    try:
        with stop_on_signals() as stop_flag:
            summary = train(cfg, stop_flag)
    except (ConfigError, DataError) as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        shutdown_topology()
    print(_summary_text(summary, cfg))
    return 0


def _summary_text(summary, cfg) -> str:
    stopped = " (stopped early on a signal; rerun the same command to resume)" if summary.stopped_early else ""
    memory = "MemDLM bi-level step" if cfg.memory.enabled else "plain MDLM (memory off)"
    wandb_line = f" The wandb run is in {summary.wandb_dir} (`wandb sync` uploads it)." if summary.wandb_dir else ""
    return (
        f"\nSummary: trained a {summary.num_parameters / 1e6:.2f}M-parameter diffusion LM with the {memory} for "
        f"{summary.steps_done} steps{stopped} in {summary.seconds / 60:.1f} min. The MDLM loss went from "
        f"{summary.first_loss:.3f} (mean of the first 10 steps {summary.first_losses_mean:.3f}) to "
        f"{summary.last_loss:.3f} (mean of the last 10 steps {summary.last_losses_mean:.3f}), at "
        f"{summary.tokens_per_s:.0f} tokens/s. Metrics are in {summary.metrics_file}, the final checkpoint in "
        f"{summary.checkpoint}.{wandb_line}"
    )


if __name__ == "__main__":
    sys.exit(main())
