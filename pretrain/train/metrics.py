"""Per-step metrics: one JSON line in ``metrics.jsonl``, a wandb record, the progress bar.

wandb runs offline unless ``--logging.wandb_mode`` or ``$WANDB_MODE`` says otherwise; an
offline run lives under ``OUT_DIR/wandb`` and ``wandb sync`` uploads it later. A resumed
run keeps the metrics file's lines up to its checkpoint's step, appends after them, and continues
the same wandb run id.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from tqdm import tqdm

from pretrain.config import LoggingConfig


def wandb_mode(cfg: LoggingConfig) -> str:
    if not cfg.wandb:
        return "disabled"
    return cfg.wandb_mode or os.environ.get("WANDB_MODE") or "offline"


class MetricsLogger:
    """Created before the run knows where it starts; ``start(step)`` opens the file, wandb and the bar."""

    def __init__(self, out_dir: Path, cfg: LoggingConfig, run_config: dict, total_steps: int):
        self.out_dir = Path(out_dir)
        self.cfg, self.run_config, self.total_steps = cfg, run_config, total_steps
        self.path = self.out_dir / "metrics.jsonl"
        self.file = self.run = self.bar = None
        self.wandb_dir: str | None = None  # the offline run's directory, once started

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, start_step: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # A fresh run owns its metrics file; a resumed one drops the steps after its checkpoint
            # (a run that died after them will now compute them again).
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if _step_of(line) is not None and _step_of(line) <= start_step]
            self.path.write_text("".join(kept))
        self.file = open(self.path, "a")
        self.run = self._start_wandb(self.cfg, self.run_config)
        self.wandb_dir = None if self.run is None else str(Path(self.run.dir).parent)
        self.bar = tqdm(
            total=self.total_steps, initial=start_step, disable=not self.cfg.progress_bar,
            unit="step", dynamic_ncols=True, desc="train",
        )

    def _start_wandb(self, cfg: LoggingConfig, run_config: dict):
        mode = wandb_mode(cfg)
        if mode == "disabled":
            return None
        import wandb

        id_file = self.out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=cfg.wandb_project,
            name=cfg.run_name or self.out_dir.name,
            dir=str(self.out_dir),
            mode=mode,
            id=run_id,
            resume="allow",
            config=run_config,
            settings=wandb.Settings(silent=True, console="off"),
        )


    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.run is not None:
            flat = {k: v for k, v in record.items() if not isinstance(v, list) and k != "step"}
            for i, value in enumerate(record.get("inner_losses", [])):
                flat[f"inner_loss/{i}"] = value
            self.run.log(flat, step=record["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if "eval_loss" in record:
            self.write(held_out_line(record))

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.bar is None:
            print(message, flush=True)
        else:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.file.close()
        if self.run is not None:
            self.run.finish()
        self.file = self.run = self.bar = None


def held_out_line(record: dict) -> str:
    """``step N: held-out loss X nats/token (Y bits), with inference-time adaptation Z``."""
    line = (f"step {record['step']}: held-out loss {record['eval_loss']:.4f} nats/token "
            f"({record['eval_bits_per_token']:.4f} bits)")
    if "eval_adapted_loss" in record:
        line += f", with inference-time adaptation {record['eval_adapted_loss']:.4f}"
    return line


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a line cut short when a run was killed mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class NullLogger:
    """What ranks other than 0 log: nothing."""

    wandb_dir = None

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start(self, start_step: int) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass
