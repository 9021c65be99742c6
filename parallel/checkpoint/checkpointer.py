"""Saving and loading one run's checkpoints (torch.distributed.checkpoint), every method collective.

``OUT_DIR/checkpoints/step_NNNNNN/`` holds:

- ``.metadata`` and ``__<rank>_<n>.distcp``: the DCP files. Every rank writes only what it holds (its
  tensor-parallel shard of its stage's parameters, each replicated piece once); keys are logical
  parameter names (``parallel.checkpoint.sharded_state``), so any layout can load them;
- ``train_state.json``: the step, the layout it was saved with (a record), and the ``state_dict()`` of
  every object registered with ``Checkpointer.register`` (the trainer's ``TrainState``, the data feed's
  loader positions); plain JSON, so reading it runs no code;
- ``rank_states/rank_NNNNN.pt``: each rank's RNG states as tensors (``parallel.checkpoint.rng``; loaded
  with ``weights_only=True``);
- ``config.json`` (the run config and token ids) and ``tokenizer.json``;
- ``manifest.json``, written last: the size and sha256 of every other file (``parallel.checkpoint.manifest``).

A save goes to ``.staging_step_NNNNNN/``, renamed into place once the manifest is written; ``latest``
moves after that, and only the newest ``keep`` checkpoints stay. On resume, checkpoints are tried newest
first: a damaged one is reported with what is wrong and the previous one is used. Nothing non-finite is
ever saved.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from parallel.checkpoint.manifest import (
    FORMAT,
    LATEST,
    MANIFEST,
    CheckpointError,
    check_checkpoint,
    describe_files,
    files_below,
    step_folders,
)
from parallel.checkpoint.rng import load_rng_states, save_rng_states
from parallel.checkpoint.safe_reader import SafeFileSystemReader
from parallel.checkpoint.sharded_state import all_finite, checkpoint_dict, partition_dim
from parallel.experts import split_over_experts

TRAIN_STATE = "train_state.json"
LEGACY_TRAIN_STATE = "trainer_state.pt"  # format memdlm-dcp-1


class Stateful(Protocol):
    """Something whose state a checkpoint carries: ``state_dict()`` gives JSON values (called on every rank,
    so it may be collective; rank 0's is written), ``load_state_dict`` takes them back on every rank."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


TRAIN_PART = "train"  # the name the trainer registers its TrainState under


@dataclass
class SavedState:
    """What a checkpoint records besides the tensors (``train_state.json``)."""

    step: int
    layout: dict = field(default_factory=dict)  # how it was saved (a record: world size, sizes, ZeRO stage)
    parts: dict[str, dict] = field(default_factory=dict)  # each registered object's state_dict(), by name


@dataclass
class SaveReport:
    folder: Path | None  # None when the save was refused (non-finite state)
    seconds: float  # the time the training loop was stopped for
    pending: bool = False  # an asynchronous save still writing


def _barrier(group=None) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=group)


def read_saved_state(folder: Path) -> SavedState:
    """``train_state.json`` of a checkpoint (or the pickled state of the previous format, read with
    ``weights_only=True``: plain containers and numbers only)."""
    path = folder / TRAIN_STATE
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            return SavedState(int(record["step"]), record.get("layout", {}), record.get("parts", {}))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path} cannot be read ({err})") from None
    legacy = folder / LEGACY_TRAIN_STATE
    if not legacy.is_file():
        raise CheckpointError(f"{folder} has no {TRAIN_STATE}; it is not a checkpoint of this trainer")
    try:
        record = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickler refusal names the type it would not build
        raise CheckpointError(f"{legacy} holds something other than plain numbers and containers ({err}); "
                              "it is not loaded") from None
    data = record.get("data") or {}
    parts = {TRAIN_PART: {"step": record["step"], "updates": record.get("updates", record["step"]),
                       "bad_steps": record.get("bad_steps", 0)},
             "data": {"by_data_rank": [data[rank] for rank in sorted(data)]}}
    return SavedState(int(record["step"]), record.get("layout", {}), parts)


class Checkpointer:
    """Saves and finds checkpoints of one run; every method is collective (all ranks call it).

    ``layout``: a record of this run's layout, saved with each checkpoint (RNG states are restored only
    at the same world size)."""

    def __init__(self, out_dir: Path, topology, config_record: dict, tokenizer_file: Path, keep: int = 2,
                 asynchronous: bool = False, verify_hashes: bool = True, log: Callable[[str], None] = print,
                 layout: dict | None = None):
        self.root = Path(out_dir) / "checkpoints"
        self.topology = topology
        self.config_record = config_record
        self.tokenizer_file = Path(tokenizer_file)
        self.keep = keep
        self.asynchronous = asynchronous
        self.verify_hashes = verify_hashes
        self.layout = layout if layout is not None else dict(topology.layout)
        self.log = log if topology.is_main else (lambda message: None)
        self.stateful: dict[str, Stateful] = {}
        # Checkpoint traffic gets its own gloo group: an asynchronous save talks from a background
        # thread while training uses the default group (nccl on GPUs).
        self.group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        self._mesh = None
        self._expert_mesh = None
        self._pending = None  # (future of this rank's file hashes, step, staging folder, started)
        self._hasher = ThreadPoolExecutor(max_workers=1) if asynchronous else None

    def register(self, name: str, state: Stateful) -> None:
        """Carry ``state`` in every checkpoint under ``name``; ``load`` gives it back."""
        self.stateful[name] = state

    # -- where the state goes ---------------------------------------------------------------------
    def _state_dict(self, engine, values: bool = True):
        if self._mesh is None:
            self._mesh = self.topology.stage_mesh()
            if self.topology.expert_parallel_size > 1:
                self._expert_mesh = self.topology.expert_mesh()
        states = engine.parameter_states(values)
        dims = {name: partition_dim(p) for name, p in engine.model.named_parameters()}
        experts = frozenset(name for name, p in engine.model.named_parameters() if split_over_experts(p))
        return states, checkpoint_dict(states, dims, self._mesh, self._expert_mesh, experts)

    # -- save -----------------------------------------------------------------------------------
    def save(self, step: int, engine) -> SaveReport:
        """Save ``engine``'s state and every registered object's at ``step``."""
        started = time.perf_counter()
        self.wait()  # one save at a time
        states, state_dict = self._state_dict(engine)
        parts = {name: state.state_dict() for name, state in self.stateful.items()}
        finite = torch.tensor([1 if all_finite(states) else 0])
        if self.group is not None:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.group)
        if not bool(finite.item()):
            self.log(f"not saving step {step}: the weights or optimizer state hold non-finite values; the "
                     "newest checkpoint stays the last good one")
            return SaveReport(None, time.perf_counter() - started)
        staging = self.root / f".staging_step_{step:06d}"
        if self.topology.is_main:
            for old in self.root.glob(".staging_step_*"):  # left by a save that never finished
                shutil.rmtree(old, ignore_errors=True)
            (staging / "rank_states").mkdir(parents=True)
        _barrier(self.group)
        self._write_small_files(staging, SavedState(step, self.layout, parts))
        if self.asynchronous:
            written = dcp.async_save(state_dict, checkpoint_id=str(staging), process_group=self.group)
            # Each rank hashes the files it wrote as soon as they are written, in the background too.
            hashes = self._hasher.submit(lambda: (written.result(), self._hash_own_files(staging))[1])
            self._pending = (hashes, step, staging, started)
            return SaveReport(None, time.perf_counter() - started, pending=True)
        dcp.save(state_dict, checkpoint_id=str(staging), process_group=self.group)
        folder = self._finish(step, staging, self._hash_own_files(staging))
        return SaveReport(folder, time.perf_counter() - started)

    def _hash_own_files(self, staging: Path) -> dict[str, dict]:
        """Sizes and sha256 of the files this rank wrote (rank 0 also takes the shared ones)."""
        rank = self.topology.rank
        mine = [f"__{rank}_", f"rank_states/rank_{rank:05d}."]
        others = [f"__{r}_" for r in range(self.topology.world_size)] + ["rank_states/"]
        files = [name for name in files_below(staging)
                 if any(name.startswith(m) for m in mine)
                 or (rank == 0 and not any(name.startswith(o) for o in others))]
        return describe_files(staging, files)

    def _write_small_files(self, staging: Path, saved: SavedState) -> None:
        save_rng_states(staging / "rank_states" / f"rank_{self.topology.rank:05d}.pt")
        if self.topology.is_main:
            (staging / "config.json").write_text(json.dumps(self.config_record, indent=2))
            shutil.copyfile(self.tokenizer_file, staging / "tokenizer.json")
            record = {"format": FORMAT, "step": saved.step, "layout": saved.layout, "parts": saved.parts}
            (staging / TRAIN_STATE).write_text(json.dumps(record, indent=1))

    def poll(self) -> Path | None:
        """Finish an asynchronous save whose files are all written (collective); its folder, or None."""
        if self._pending is None:
            return None
        done = torch.tensor([1 if self._pending[0].done() else 0])
        if self.group is not None:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.group)
        return self.wait() if bool(done.item()) else None

    def wait(self) -> Path | None:
        """Block until a pending asynchronous save is written, then finish it."""
        if self._pending is None:
            return None
        hashes, step, staging, started = self._pending
        self._pending = None
        folder = self._finish(step, staging, hashes.result())
        self.log(f"asynchronous checkpoint {folder.name} complete {time.perf_counter() - started:.1f} s after it "
                 "started")
        return folder

    def _finish(self, step: int, staging: Path, mine: dict[str, dict]) -> Path:
        """Manifest (the ranks' sizes and hashes of what each wrote), rename, ``latest``, pruning."""
        world = self.topology.world_size
        parts = [None] * world
        if self.group is not None:
            dist.all_gather_object(parts, mine, group=self.group)
        else:
            parts = [mine]
        final = self.root / f"step_{step:06d}"
        if self.topology.is_main:
            described = {name: entry for part in parts for name, entry in part.items()}
            manifest = {"format": FORMAT, "step": step, "files": dict(sorted(described.items()))}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            pointer = self.root / (LATEST + ".tmp")
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.root / LATEST)
            for old in step_folders(self.root)[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.group)
        return final

    # -- find and load ----------------------------------------------------------------------------
    def newest_good(self) -> Path | None:
        """The newest intact checkpoint (collective); damaged ones are reported and passed over.

        Raises ``CheckpointError`` when checkpoints exist but none is intact."""
        candidates = step_folders(self.root) if self.root.is_dir() else []
        for unfinished in sorted(self.root.glob(".staging_step_*")) if self.root.is_dir() else []:
            self.log(f"ignoring {unfinished.name}: a save that did not finish (it is removed at the next save)")
        problems = []
        for folder in candidates:
            problem = self._check_everywhere(folder)
            if problem is None:
                for name, text in problems:
                    self.log(f"checkpoint {name} is unusable: {text}; resuming from {folder.name} instead")
                return folder
            problems.append((folder.name, problem))
        if problems:
            listing = "; ".join(f"{name}: {text}" for name, text in problems)
            raise CheckpointError(
                f"no usable checkpoint in {self.root} ({listing}); move the damaged ones aside, or pass "
                "--train.resume false --train.overwrite true (or a new --train.out_dir) to start over"
            )
        return None

    def _check_everywhere(self, folder: Path) -> str | None:
        """``check_checkpoint`` with the hashing shared out over the ranks; every rank gets the verdict."""
        hashed = None
        manifest_file = folder / MANIFEST
        try:
            recorded = sorted(json.loads(manifest_file.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        if recorded is not None and self.topology.world_size > 1:
            world, rank = self.topology.world_size, self.topology.rank
            present = [n for n in recorded[rank::world] if (folder / n).is_file()]
            mine = describe_files(folder, present, self.verify_hashes)
            parts = [None] * world
            dist.all_gather_object(parts, mine, group=self.group)
            hashed = {name: entry for part in parts for name, entry in part.items()}
            hashed.update({n: {"size": -1} for n in recorded if n not in hashed})  # missing files are named below
        verdict = [check_checkpoint(folder, self.verify_hashes, hashed) if self.topology.is_main else None]
        if self.group is not None:
            dist.broadcast_object_list(verdict, src=0, group=self.group)
        return verdict[0]

    def load(self, folder: Path, engine, restore_registered: bool = True) -> SavedState:
        """Weights and optimizer state from ``folder`` into ``engine`` at this run's layout, and (unless
        ``restore_registered`` is false) every registered object's state; returns what the checkpoint
        records besides the tensors."""
        states, state_dict = self._state_dict(engine, values=False)
        SafeFileSystemReader(str(folder)).read_metadata()  # a refusal as a one-line error, not inside DCP's report
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(str(folder)), process_group=self.group)
        engine.load_parameter_states(states)
        saved = read_saved_state(folder)
        if restore_registered:
            for name, state in self.stateful.items():
                if name not in saved.parts:
                    raise CheckpointError(f"{folder} holds no {name!r} state (it has: {', '.join(saved.parts)})")
                state.load_state_dict(saved.parts[name])
        rank_file = folder / "rank_states" / f"rank_{self.topology.rank:05d}.pt"
        if rank_file.is_file() and saved.layout.get("world_size") == self.topology.world_size:
            try:
                load_rng_states(rank_file)
            except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, ValueError) as err:
                # the previous format pickled NumPy objects (refused by weights_only): not loaded, not needed
                self.log(f"the RNG states of {folder.name} are not restored ({type(err).__name__}); the step "
                         "draws its noise from (seed, step), so training is unaffected")
        return saved
