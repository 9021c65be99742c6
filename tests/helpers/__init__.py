"""What the tests share, so that no test module imports another: the repository root, the tiny run's
options, reading a run's metrics. Sub-modules: ``ranks`` (gloo process groups), ``data`` (small corpora),
``layouts`` (the layout table and the single-process comparison), ``processes`` (launching and killing real
runs), ``models`` (tiny models for inference tests), ``reference_step`` (the float64 oracle),
``wandb_reader``, ``traffic`` (what a step sends per process group)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_CORPUS = ROOT / "data_pipeline" / "corpus" / "tinyshakespeare.txt"

# The tiny run most command-line tests start from: 2 layers of width 32 on 32-token samples, 4 sequences per
# step, in this process's thread, no wandb and no progress bar.
TINY = {
    "model.vocab_size": 512, "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2,
    "model.ffn_hidden_size": 64, "model.seq_len": 32, "train.global_batch_size": 4, "train.micro_batch_size": 2,
    "data.num_workers": 0, "logging.progress_bar": False, "logging.wandb": False, "train.num_threads": 1,
}


def options(values: dict) -> list[str]:
    """``{"section.field": value}`` as command-line options."""
    flat = []
    for name, value in values.items():
        flat += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flat


def tiny_options(changes: dict | None = None) -> list[str]:
    """The tiny run's options with ``changes`` (``{"section.field": value}``) applied."""
    return options({**TINY, **(changes or {})})


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
