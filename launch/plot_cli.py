"""``memdlm-plot``: PNG figures of a run's metrics."""

from __future__ import annotations

import argparse
import sys

from common.errors import UsageError
from launch.messages import fail

PROG = "memdlm-plot"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Plot a run's metrics.jsonl as PNG files: loss.png (the MDLM loss with the held-out "
        "losses, with and without inference-time adaptation), inner_losses.png, lr_grad_norm.png, "
        "tokens_per_s.png and mfu.png. A figure whose quantity the run did not log is left out.")
    parser.add_argument("run", help="a run directory (--train.out_dir of memdlm-pretrain)")
    parser.add_argument("--output", help="where the PNG files go (default: RUN/plots)")
    args = parser.parse_args(argv)
    try:
        from pretrain.train.plots import plot_run

        written = plot_run(args.run, args.output)
    except UsageError as err:
        return fail(PROG, str(err))
    except ImportError as err:
        return fail(PROG, f"matplotlib is needed to plot ({err}); pip install matplotlib")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
