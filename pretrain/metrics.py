"""Per-step metrics: one JSON line in ``metrics.jsonl``, a wandb record, the progress bar.

wandb runs offline unless ``--logging.wandb_mode`` or ``$WANDB_MODE`` says otherwise; an
offline run lives under ``OUT_DIR/wandb`` and ``wandb sync`` uploads it later. A resumed
run appends to the same metrics file and continues the same wandb run id.
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
    def __init__(self, out_dir: Path, cfg: LoggingConfig, run_config: dict, total_steps: int, start_step: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run owns its metrics file
        self.file = open(self.path, "a")
        self.run = self._start_wandb(cfg, run_config)
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not cfg.progress_bar,
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

    @property
    def wandb_dir(self) -> str | None:
        return None if self.run is None else str(Path(self.run.dir).parent)

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

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.run is not None:
            self.run.finish()


class NullLogger:
    """What ranks other than 0 log: nothing."""

    wandb_dir = None

    def log(self, record: dict) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass
