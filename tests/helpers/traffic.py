"""What one training step sends, per process group (``parallel.comm_accounting``), for the tests that check a
layout's traffic with memory on and off."""

from __future__ import annotations


def count_second_step(cfg, topology, batch, groups_of):
    """Build ``cfg``'s model, step and engine on ``topology``, train one step on ``batch`` (DeepSpeed sets up its
    buckets then), and count the collectives of a second one over ``groups_of(topology)`` (name -> group).
    Returns (calls by group and operation, bytes by group and operation, the step, both steps' statistics)."""
    from parallel.comm_accounting import counting, install
    from pretrain.train.factory import build_bilevel_step, build_engine, build_model

    install()  # before DeepSpeed caches any collective
    model = build_model(cfg, topology)
    step = build_bilevel_step(cfg, model, topology, cfg.model.vocab_size - 1)
    engine = build_engine(cfg, model, step, topology)
    first = engine.train_step([batch], step=0, lr=1e-3)
    groups = groups_of(topology)
    with counting(groups) as counter:
        second = engine.train_step([batch], step=1, lr=1e-3)
    return ({name: dict(counter.calls[name]) for name in groups},
            {name: dict(counter.bytes_by_op[name]) for name in groups}, step, (first, second))
