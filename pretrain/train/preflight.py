"""What can be checked before any rank starts, so that a usage error under ``--nproc-per-node`` is one line
and exit status 2 within a second, not a traceback from every rank after they have started: the layout, the
run directory, the data path and ``--model.init_from``. Reads files only; makes nothing."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.source import auto_prepared_dir, is_prepared, resolve_sources
from pretrain.config import RunConfig
from pretrain.hf.importer import check_data_tokenizer, resolve_init_from
from pretrain.train.factory import check_run_layout
from pretrain.train.run_directory import check_start_over, check_writable


def preflight(cfg: RunConfig, world_size: int) -> None:
    """Raise the ``UsageError`` a run of ``cfg`` on ``world_size`` ranks would stop with at its start."""
    cfg = resolve_init_from(cfg)
    check_run_layout(cfg, world_size)
    out_dir = Path(cfg.train.out_dir)
    check_writable(out_dir)
    if not cfg.train.resume:
        check_start_over(out_dir, cfg.train.overwrite)
    data = cfg.data
    if data.sources or is_prepared(data.path):
        sources = resolve_sources(data.path, data.sources, data.tokenizer, cfg.model.seq_len, cfg.model.vocab_size,
                                  data.cache_dir, prepare=False)
        if cfg.model.init_from:
            check_data_tokenizer(Path(cfg.model.init_from), sources)
    else:  # raw input: its files must be there and be text (it is prepared by the ranks, on first use)
        auto_prepared_dir(data.path, data.tokenizer, cfg.model.seq_len, cfg.model.vocab_size, data.cache_dir)
