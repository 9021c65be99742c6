"""``memdlm-plot``: a run's ``metrics.jsonl`` as PNG figures, one per quantity a user watches: the MDLM loss
with the held-out losses, the inner losses, the learning rate and gradient norm, tokens per second, MFU."""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import UsageError

FIGURES = ("loss", "inner_losses", "lr_grad_norm", "tokens_per_s", "mfu")


def read_run_metrics(run: Path) -> list[dict]:
    """The run's records in step order (a resumed run's repeated steps: the last line of a step wins)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{run} has no metrics.jsonl; pass a run directory (--train.out_dir of a run)")
    by_step = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short when a run was killed mid-write
    if not by_step:
        raise UsageError(f"{path} holds no complete record yet")
    return [by_step[step] for step in sorted(by_step)]


def plot_run(run: Path, output: Path | None = None) -> list[Path]:
    """Write the figures into ``output`` (default ``RUN/plots``); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_run_metrics(run)
    output = Path(output) if output else Path(run) / "plots"
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--output {output} cannot be made ({err.strerror})") from None
    steps = [r["step"] for r in records]

    def series(key):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in points], [v for _, v in points]

    written = []

    def figure(name: str, title: str, ylabel: str, curves: list[tuple[str, tuple[list, list]]], log: bool = False):
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for label, (x, y) in curves:
            if x:
                marker = "o" if len(x) < len(steps) / 4 else None
                ax.plot(x, y, label=label, marker=marker, markersize=3)
                drawn += 1
        if not drawn:
            plt.close(fig)
            return
        ax.set(title=f"{title}: {Path(run).name}", xlabel="step", ylabel=ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        path = output / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    figure("loss", "MDLM loss", "nats per token", [("training loss", series("loss")),
                                                   ("held-out", series("eval_loss")),
                                                   ("held-out, adapted", series("eval_adapted_loss"))])
    inner = max((len(r.get("inner_losses") or []) for r in records), default=0)
    figure("inner_losses", "inner losses", "loss", [
        (f"inner step {k + 1}", ([r["step"] for r in records if len(r.get("inner_losses") or []) > k],
                                 [r["inner_losses"][k] for r in records if len(r.get("inner_losses") or []) > k]))
        for k in range(inner)])
    figure("lr_grad_norm", "learning rate and gradient norm", "value",
           [("learning rate", series("lr")), ("gradient norm", series("grad_norm"))], log=True)
    figure("tokens_per_s", "throughput", "tokens / s", [("tokens/s", series("tokens_per_s"))])
    figure("mfu", "model FLOP utilisation", "fraction of peak",
           [("mfu_model", series("mfu_model")), ("mfu_total", series("mfu_total"))])
    return written
