"""No host synchronisation in the training step, checked on the CPU.

On a GPU a step that reads a value back (``.item()``, ``float(t)``, a data-dependent shape such as a
boolean-mask gather) waits for the device. The step is run here under a dispatch mode that fails on
every operator that would synchronise on CUDA, with the GPU's row padding switched on, so such a
change is caught without a GPU. (The gpu tier repeats this for real under
``torch.cuda.set_sync_debug_mode("error")``.)
"""

import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data_pipeline.masking import build_masked_batch
from pretrain.config import DataConfig, MemoryConfig, ModelConfig, OptimizerConfig, RunConfig, TrainConfig
from pretrain.model import rows as objective

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_consecutive.default,
           aten.unique_dim.default, aten.repeat_interleave.Tensor}


class FailOnSync(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        syncing = func in SYNCING
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            syncing = any(i is not None and i.dtype == torch.bool for i in indices)
        if syncing:
            stack = "".join(traceback.format_stack(limit=10)[:-1])
            # AdamW (foreach, not capturable) keeps its step counts on the host on GPUs too: reading
            # them is what keeps its update free of device reads.
            if not (func is aten._local_scalar_dense.default and "torch/optim/" in stack):
                self.seen.append(f"{func}:\n{stack}")
        return func(*args, **kwargs)


@pytest.fixture
def gpu_row_padding(monkeypatch):
    monkeypatch.setitem(objective.ROW_BUCKET, "cpu", 128)


def _batch(b, l, padded=False, states=1):
    ids = np.random.default_rng(0).integers(0, 60, size=(b, l))
    padding = None
    if padded:
        padding = np.ones((b, l), dtype=bool)
        padding[1, l // 2:] = False
    batch = build_masked_batch(ids, np.arange(b), seed=1, epoch=0, num_inner_steps=states + 1, pre_anchor_scale=1.5,
                               key_padding_mask=padding)
    batch.segment_ids = torch.zeros(b, l, dtype=torch.int32)
    return batch


@pytest.mark.parametrize("memory, padded, documents", [(True, False, False), (True, True, True), (False, False, False)],
                         ids=["memdlm", "memdlm-padding-documents", "mdlm"])
def test_the_step_never_reads_back_from_the_device(topology, gpu_row_padding, memory, padded, documents):
    seen = _syncs_in_a_step(topology, memory, padded, documents, guard=False)
    assert not seen, "operators that synchronise on a GPU ran in the step:\n" + "\n".join(seen[:3])


def test_the_bad_step_guard_reads_the_device_once_per_step(topology, gpu_row_padding, monkeypatch):
    """The guard's verdict needs the host: one copy of its health flags (``.cpu()``, which this CPU
    detector cannot see, so the copies are counted) per step and nothing else that reads
    (``--guard.skip_bad_steps false`` makes the step sync-free, as the gpu test checks)."""
    from parallel.engines.step_guard import StepGuard

    reads = []
    original = StepGuard._local_health
    monkeypatch.setattr(StepGuard, "_local_health", lambda self: reads.append(1) or original(self))
    seen = _syncs_in_a_step(topology, True, False, False, guard=True)
    assert not seen, "\n".join(seen[:3])
    assert len(reads) == 2, "one read in the warm-up step and one in the checked step"


def _syncs_in_a_step(topology, memory, padded, documents, guard):
    from pretrain.config import GuardConfig
    from pretrain.train.factory import build_training

    cfg = RunConfig(model=ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=48,
                                      seq_len=32),
                    memory=MemoryConfig(enabled=memory, layer_fraction=0.5), optim=OptimizerConfig(warmup_steps=0),
                    train=TrainConfig(global_batch_size=8, micro_batch_size=4),
                    data=DataConfig(document_attention=documents), guard=GuardConfig(skip_bad_steps=guard))
    engine = build_training(cfg, topology, 63).engine
    batches = [_batch(4, 32, padded), _batch(4, 32, padded)]
    engine.train_step(batches, 0, 1e-3)  # warm-up outside the check (lazy state creation)
    mode = FailOnSync()
    with mode:
        stats = engine.train_step(batches, 1, 1e-3)
    if guard:
        assert stats.verdict is not None and stats.verdict.accepted
    assert np.isfinite(stats.host().loss)
    return mode.seen


def test_the_detector_catches_a_read_back(topology):
    mode = FailOnSync()
    t = torch.arange(6.0)
    with mode:
        t.sum().item()
        t[t > 2]
    assert len(mode.seen) == 2
