"""Sharded checkpoints in one process: round trip, the typed state registered with the checkpointer (JSON and
tensor-only files, nothing unpickled), retention, verification of damaged checkpoints, refusing non-finite
state, asynchronous saves, and the run directory's lock."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from data_pipeline.masking import build_masked_batch
from parallel.checkpoint.checkpointer import Checkpointer
from parallel.checkpoint.manifest import CheckpointError, check_checkpoint
from parallel.checkpoint.reading import read_weights
from pretrain.config import ConfigError, MemoryConfig, ModelConfig, OptimizerConfig, RunConfig, TrainConfig
from pretrain.train.run_lock import RunDirectoryBusy, RunLock
from tests.helpers import ROOT

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)

CFG = RunConfig(model=ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=48,
                                  seq_len=12),
                memory=MemoryConfig(layer_fraction=0.5), optim=OptimizerConfig(warmup_steps=0),
                train=TrainConfig(global_batch_size=4, micro_batch_size=4, seed=5))


def _batch(index: int):
    ids = np.random.default_rng(index).integers(0, 63, size=(4, 12))
    return build_masked_batch(ids, np.arange(4) + 4 * index, seed=0, epoch=0, num_inner_steps=2, pre_anchor_scale=1.5)


def _engine(topology):
    from pretrain.train.factory import build_training

    return build_training(CFG, topology, 63).engine


class _Saver:
    """A Checkpointer bound to one engine, as the trainer uses it."""

    def __init__(self, checkpointer, engine):
        self.checkpointer, self.engine = checkpointer, engine

    def save(self, step):
        return self.checkpointer.save(step, self.engine)

    def load(self, folder, **options):
        return self.checkpointer.load(folder, self.engine, **options)

    def __getattr__(self, name):
        return getattr(self.checkpointer, name)


def _checkpointer(topology, engine, root, messages=None, **options):
    tokenizer = root / "tokenizer.json"
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.write_text("{}")
    log = messages.append if messages is not None else (lambda m: None)
    return _Saver(Checkpointer(root / "run", topology, {"note": "cfg"}, tokenizer, log=log, **options), engine)


def _trained(topology, steps=2):
    engine = _engine(topology)
    for step in range(steps):
        engine.train_step([_batch(step)], step, 1e-3)
    return engine


def test_round_trip_continues_identically(topology, tmp_path):
    original = _trained(topology)
    saver = _checkpointer(topology, original, tmp_path)
    report = saver.save(2)
    folder = report.folder
    assert folder.name == "step_000002" and report.seconds > 0
    assert (folder.parent / "latest").read_text().strip() == "step_000002"
    assert not list(folder.parent.glob(".staging_*")), "the staging directory is renamed into place"
    assert check_checkpoint(folder) is None
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {".metadata", "train_state.json", "config.json", "tokenizer.json", "rank_states/rank_00000.pt"} <= set(
        manifest["files"])

    restored = _engine(topology)
    loader = _checkpointer(topology, restored, tmp_path)
    assert loader.newest_good() == folder
    assert loader.load(folder).step == 2
    for (name, a), b in zip(original.model.named_parameters(), restored.model.parameters()):
        assert torch.equal(a, b), name
    state_a = original.optimizer.optimizer.state_dict()["state"]
    state_b = restored.optimizer.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[key][field], state_b[key][field]), (key, field)
    after_a = original.train_step([_batch(2)], 2, 1e-3)
    after_b = restored.train_step([_batch(2)], 2, 1e-3)
    assert after_a.loss == after_b.loss and after_a.grad_norm == after_b.grad_norm
    assert all(torch.equal(a, b) for a, b in zip(original.model.parameters(), restored.model.parameters()))
    weights = read_weights(folder)  # what export and the layout tests read: full tensors, one process
    assert set(weights) == {n for n, _ in original.model.named_parameters()}


class _Position:
    """A stand-in for the data feed: a Stateful with a nested JSON state."""

    def __init__(self, batches=0):
        self.batches = batches

    def state_dict(self):
        return {"by_data_rank": [{"format": "mds", "loader": {"epoch": 0, "sample_in_epoch": self.batches}}]}

    def load_state_dict(self, state):
        self.batches = state["by_data_rank"][0]["loader"]["sample_in_epoch"]


def test_registered_state_round_trips_as_json_and_tensors_without_pickle(topology, tmp_path):
    from pretrain.train.state import TrainState

    engine = _trained(topology)
    saver = _checkpointer(topology, engine, tmp_path)
    saver.register("train", TrainState(step=2, updates=1, bad_steps=1, tokens_by_source={"web": 640, "code": 128}))
    saver.register("data", _Position(24))
    folder = saver.save(2).folder
    record = json.loads((folder / "train_state.json").read_text())
    assert record["format"] == "memdlm-dcp-2" and record["step"] == 2 and record["layout"]["world_size"] == 1
    assert record["parts"]["train"] == {"step": 2, "updates": 1, "bad_steps": 1,
                                        "tokens_by_source": {"web": 640, "code": 128}}
    rng = torch.load(folder / "rank_states" / "rank_00000.pt", weights_only=True)  # tensors and numbers only
    assert set(rng) >= {"python", "numpy", "torch"} and rng["numpy"]["keys"].dtype == torch.int64

    state, position = TrainState(), _Position()
    loader = _checkpointer(topology, _engine(topology), tmp_path)
    loader.register("train", state)
    loader.register("data", position)
    assert loader.load(folder, restore_registered=False).parts["train"]["updates"] == 1
    assert state == TrainState() and position.batches == 0, "a roll-back loads the tensors only"
    assert loader.load(folder).step == 2
    assert state == TrainState(step=2, updates=1, bad_steps=1, tokens_by_source={"web": 640, "code": 128})
    assert position.batches == 24


class _Planted:
    """A pickle that creates ``marker`` when it is unpickled (what a hostile checkpoint file would carry)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _replace_and_rehash(folder, name, payload):
    """Put ``payload`` at ``folder/name`` and record it in the manifest, so only its content can refuse it."""
    from parallel.checkpoint.manifest import describe_files

    torch.save(payload, folder / name)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"].update(describe_files(folder, [name]))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert check_checkpoint(folder) is None


def test_a_planted_pickle_in_the_train_state_is_refused_and_never_run(topology, tmp_path):
    saver = _checkpointer(topology, _trained(topology), tmp_path)
    folder = saver.save(2).folder
    marker = tmp_path / "ran"
    (folder / "train_state.json").unlink()  # as a checkpoint of the previous format would be
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["train_state.json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _replace_and_rehash(folder, "trainer_state.pt", {"step": 2, "data": {}, "hook": _Planted(marker)})
    with pytest.raises(CheckpointError, match="trainer_state.pt holds something other than plain numbers"):
        saver.load(folder)
    assert not marker.exists()


def test_a_planted_pickle_in_the_rng_states_is_not_run(topology, tmp_path):
    messages = []
    saver = _checkpointer(topology, _trained(topology), tmp_path, messages)
    folder = saver.save(2).folder
    marker = tmp_path / "ran"
    _replace_and_rehash(folder, "rank_states/rank_00000.pt", {"python": _Planted(marker)})
    assert saver.load(folder).step == 2
    assert not marker.exists()
    assert "the RNG states of step_000002 are not restored" in messages[-1]


def test_a_checkpoint_of_the_previous_format_still_resumes(topology, tmp_path):
    """``trainer_state.pt`` of plain containers (what the previous version wrote) loads with weights_only=True."""
    saver = _checkpointer(topology, _trained(topology), tmp_path)
    folder = saver.save(2).folder
    (folder / "train_state.json").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["train_state.json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    legacy = {"data": {0: {"format": "mds", "loader": {"epoch": 0, "sample_in_epoch": 8}}}, "updates": 2,
              "bad_steps": 0, "layout": {"world_size": 1}, "step": 2, "format": "memdlm-dcp-1"}
    _replace_and_rehash(folder, "trainer_state.pt", legacy)
    from pretrain.train.state import TrainState

    state, position = TrainState(), _Position()
    saver.register("train", state)
    saver.register("data", position)
    assert saver.load(folder).step == 2
    assert state == TrainState(step=2, updates=2, bad_steps=0) and position.batches == 8


def test_only_the_newest_checkpoints_are_kept(topology, tmp_path):
    saver = _checkpointer(topology, _trained(topology, 1), tmp_path, keep=2)
    for step in (1, 2, 3):
        saver.save(step)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_000002", "step_000003"]


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


DAMAGE = {
    "flipped bit in a tensor file": (lambda f: _flip_byte(next(f.glob("*.distcp"))), "does not match its sha256"),
    "truncated file": (lambda f: _truncate(f / "train_state.json"), "train_state.json has"),
    "manifest deleted": (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
    ".metadata deleted": (lambda f: (f / ".metadata").unlink(), ".metadata is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(topology, tmp_path, damage):
    engine = _trained(topology, 1)
    saver = _checkpointer(topology, engine, tmp_path, keep=3)
    good = saver.save(1).folder
    engine.train_step([_batch(1)], 1, 1e-3)
    newest = saver.save(2).folder
    spoil, expected = DAMAGE[damage]
    spoil(newest)
    messages = []
    finder = _checkpointer(topology, _engine(topology), tmp_path, messages, keep=3)
    assert finder.newest_good() == good
    assert len(messages) == 1 and "step_000002 is unusable" in messages[0] and expected in messages[0], messages
    assert "resuming from step_000001" in messages[0]
    finder.load(good)  # and the previous one loads


def test_no_intact_checkpoint_stops_with_a_message(topology, tmp_path):
    saver = _checkpointer(topology, _trained(topology, 1), tmp_path)
    folder = saver.save(1).folder
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*step_000001: manifest.json is missing"):
        saver.newest_good()


def test_hash_checks_can_be_skipped_for_huge_checkpoints(topology, tmp_path):
    saver = _checkpointer(topology, _trained(topology, 1), tmp_path)
    folder = saver.save(1).folder
    _flip_byte(next(folder.glob("*.distcp")))  # same size: only a hash can tell
    assert _checkpointer(topology, _engine(topology), tmp_path, verify_hashes=False).newest_good() == folder
    assert "sha256" in check_checkpoint(folder, verify_hashes=True)


def test_non_finite_state_is_never_saved(topology, tmp_path):
    engine = _trained(topology, 1)
    messages = []
    saver = _checkpointer(topology, engine, tmp_path, messages)
    saver.save(1)
    with torch.no_grad():
        next(engine.model.parameters())[0, 0] = float("nan")
    report = saver.save(2)
    assert report.folder is None and "not saving step 2" in messages[-1]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert not (tmp_path / "run" / "checkpoints" / "step_000002").exists()


def test_asynchronous_save_writes_the_same_state(topology, tmp_path):
    engine = _trained(topology, 2)
    sync = _checkpointer(topology, engine, tmp_path / "sync").save(2).folder
    background = _checkpointer(topology, engine, tmp_path / "async", asynchronous=True)
    report = background.save(2)
    assert report.pending and report.folder is None
    folder = background.wait()
    assert folder.name == "step_000002" and check_checkpoint(folder) is None
    a, b = read_weights(sync), read_weights(folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_live_run_holds_its_directory_and_a_dead_one_does_not(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    with pytest.raises(RunDirectoryBusy, match=f'is in use by a live run: .*"pid": {os.getpid()}'):
        RunLock(tmp_path).acquire()
    lock.release()
    RunLock(tmp_path).acquire()  # released: free again (and released by this process's exit)

    # A holder killed with SIGKILL leaves the file behind but not the lock.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pretrain.train.run_lock import RunLock; "
        "lock = RunLock(sys.argv[2]); lock.acquire(); print('held', flush=True); time.sleep(60)"), str(ROOT),
        str(tmp_path / "other")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirectoryBusy, match=f'"pid": {holder.pid}'):
        RunLock(tmp_path / "other").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    RunLock(tmp_path / "other").acquire()


def test_a_run_of_an_older_version_resumes_with_the_defaults_of_newer_settings(tmp_path, tiny):
    """A checkpoint whose config predates some settings (here: the memory variants' fields) resumes when the
    run keeps those settings at their defaults, and is refused, naming the setting, when it does not."""
    from launch.config_cli import build_config
    from parallel.checkpoint.manifest import describe_files
    from pretrain.train.trainer import train
    from tests.helpers import read_metrics

    out = tmp_path / "run"
    options = [*tiny({"eval.every": 0}), "--train.out_dir", str(out)]
    train(build_config([*options, "--train.steps", "2"]))
    folder = out / "checkpoints" / "step_000002"
    config = json.loads((folder / "config.json").read_text())
    for newer in ("masking_strategy", "inner_loss", "leak_free", "probability", "base_weight"):
        del config["memory"][newer]
    (folder / "config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"].update(describe_files(folder, ["config.json"]))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"different \[memory\] config \(leak_free\)"):
        train(build_config([*options, "--train.steps", "3", "--memory.leak_free", "true"]))
    train(build_config([*options, "--train.steps", "3"]))
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
