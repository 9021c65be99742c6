"""Checkpoints round-trip: weights, optimizer state and the pointer to the newest one (one process)."""

import json

import numpy as np
import torch

from data_pipeline.masking import build_masked_batch
from pretrain.checkpoint import latest_checkpoint, load_model_weights, load_trainer_state, save_checkpoint
from pretrain.config import MemoryConfig, ModelConfig, OptimizerConfig, RunConfig, TrainConfig

CFG = RunConfig(model=ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=48,
                                  seq_len=12),
                memory=MemoryConfig(layer_fraction=0.5), optim=OptimizerConfig(warmup_steps=0),
                train=TrainConfig(global_batch_size=4, micro_batch_size=4, seed=5))


def _batch(index: int):
    ids = np.random.default_rng(index).integers(0, 63, size=(4, 12))
    return build_masked_batch(ids, np.arange(4) + 4 * index, seed=0, epoch=0, num_inner_steps=2, pre_anchor_scale=1.5)


def _parts(topology, checkpoint=None):
    from pretrain.factory import build_model, build_training

    model = build_model(CFG, topology)
    if checkpoint is not None:
        load_model_weights(model, checkpoint)
    parts = build_training(CFG, topology, 63, model)
    if checkpoint is not None:
        parts.engine.load_optimizer(checkpoint / "optimizer")
    return parts


def test_save_load_round_trip_continues_identically(topology, tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    original = _parts(topology)
    for step in range(2):
        original.engine.train_step([_batch(step)], step, 1e-3)
    folder = save_checkpoint(tmp_path / "run", 2, original.engine, topology, {"note": "cfg"}, tokenizer,
                             {"step": 2, "data": {}})
    assert folder.name == "step_000002" and latest_checkpoint(tmp_path / "run") == folder
    assert not list(folder.parent.glob(".staging_*")), "the staging directory is renamed into place"
    assert json.loads((folder / "config.json").read_text()) == {"note": "cfg"}
    assert load_trainer_state(folder)["step"] == 2

    restored = _parts(topology, folder)
    for (name, a), b in zip(original.model.named_parameters(), restored.model.parameters()):
        assert torch.equal(a, b), name
    state_a = original.engine.optimizer.optimizer.state_dict()["state"]
    state_b = restored.engine.optimizer.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[key][field], state_b[key][field]), (key, field)
    # The next step is the same step in both.
    after_a = original.engine.train_step([_batch(2)], 2, 1e-3)
    after_b = restored.engine.train_step([_batch(2)], 2, 1e-3)
    assert after_a.loss == after_b.loss and after_a.grad_norm == after_b.grad_norm
    for a, b in zip(original.model.parameters(), restored.model.parameters()):
        assert torch.equal(a, b)


def test_only_the_newest_checkpoints_are_kept(topology, tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    engine = _parts(topology).engine
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / "run", step, engine, topology, {}, tokenizer, {"step": step}, keep=2)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_000002", "step_000003"]
    assert latest_checkpoint(tmp_path / "run").name == "step_000003"
