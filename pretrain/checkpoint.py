"""Sharded, verified, reshardable checkpoints on torch.distributed.checkpoint (DCP).

``OUT_DIR/checkpoints/step_NNNNNN/`` holds:

- ``.metadata`` and ``__<rank>_<n>.distcp``: the DCP files. Every rank writes only what it holds
  (its tensor-parallel shard of its stage's parameters, each replicated piece once); keys are logical
  parameter names (see ``parallel.sharded_state``), so any layout can load them;
- ``trainer_state.pt``: step, the data loader state of each data-parallel rank, the layout it was
  saved with (for the record only); ``rank_states/rank_NNNNN.pt``: each rank's RNG states (Python,
  NumPy, torch CPU and CUDA);
- ``config.json`` (the run config and token ids) and ``tokenizer.json``;
- ``manifest.json``, written last: the size and sha256 of every other file.

A save goes to ``.staging_step_NNNNNN/``, which is renamed into place once the manifest is written;
``latest`` (a one-line file naming the newest complete checkpoint) moves after that, and only the
newest ``keep`` checkpoints stay. On resume, checkpoints are tried newest first: one whose manifest
is missing, or whose files are missing, of another size or (unless switched off) another sha256, is
reported with what is wrong and the previous one is used. Nothing non-finite is ever saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from data_pipeline.errors import UsageError
from parallel.sharded_state import all_finite, checkpoint_dict, partition_dim

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = "memdlm-dcp-1"


class CheckpointError(UsageError):
    """No usable checkpoint where one was expected; the message says what is wrong with each."""


@dataclass
class SaveReport:
    folder: Path | None  # None when the save was refused (non-finite state)
    seconds: float  # the time the training loop was stopped for
    pending: bool = False  # an asynchronous save still writing


def _barrier(group=None) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=group)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path, files: list[str], hashes: bool = True, threads: int = 8) -> dict[str, dict]:
    """``{file: {"size", "sha256"}}`` for ``files`` in ``folder``, hashed in parallel threads."""
    def one(name):
        path = folder / name
        entry = {"size": path.stat().st_size}
        if hashes:
            entry["sha256"] = _sha256(path)
        return name, entry

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return dict(pool.map(one, files))


def _files_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def check_checkpoint(folder: Path, verify_hashes: bool = True, hashed: dict[str, dict] | None = None) -> str | None:
    """What is wrong with ``folder`` as a checkpoint, or None if it is complete and intact.

    ``hashed``: the files' sizes and hashes if already computed (by several ranks)."""
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        return f"{MANIFEST} is missing (the save did not finish, or the file was removed)"
    try:
        manifest = json.loads(manifest_file.read_text())
        recorded = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} cannot be read ({err})"
    if ".metadata" not in recorded:
        return f"{MANIFEST} lists no .metadata file"
    missing = [name for name in recorded if not (folder / name).is_file()]
    if missing:
        return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    found = hashed if hashed is not None else describe_files(folder, list(recorded), verify_hashes)
    for name, entry in recorded.items():
        got = found[name]
        if got["size"] != entry["size"]:
            return f"{name} has {got['size']} bytes but the manifest records {entry['size']}"
        if verify_hashes and got.get("sha256") != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest (the file is damaged)"
    return None


def _step_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


class Checkpointer:
    """Saves and finds checkpoints of one run; every method is collective (all ranks call it)."""

    def __init__(self, out_dir: Path, topology, config_record: dict, tokenizer_file: Path, keep: int = 2,
                 asynchronous: bool = False, verify_hashes: bool = True, log: Callable[[str], None] = print):
        self.root = Path(out_dir) / "checkpoints"
        self.topology = topology
        self.config_record = config_record
        self.tokenizer_file = Path(tokenizer_file)
        self.keep = keep
        self.asynchronous = asynchronous
        self.verify_hashes = verify_hashes
        self.log = log if topology.is_main else (lambda message: None)
        # Checkpoint traffic gets its own gloo group: an asynchronous save talks from a background
        # thread while training uses the default group (nccl on GPUs).
        self.group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        self._mesh = None
        self._pending = None  # (future of this rank's file hashes, step, staging folder, started)
        self._hasher = ThreadPoolExecutor(max_workers=1) if asynchronous else None

    # -- where the state goes ---------------------------------------------------------------------
    def _state_dict(self, engine, values: bool = True):
        if self._mesh is None:
            self._mesh = self.topology.stage_mesh()
        states = engine.parameter_states(values)
        dims = {name: partition_dim(p) for name, p in engine.model.named_parameters()}
        return states, checkpoint_dict(states, dims, self._mesh)

    # -- save -----------------------------------------------------------------------------------
    def save(self, step: int, engine, trainer_state: dict) -> SaveReport:
        """Save ``engine``'s state at ``step``; ``trainer_state`` (data states, ...) is written by rank 0."""
        started = time.perf_counter()
        self.wait()  # one save at a time
        states, state_dict = self._state_dict(engine)
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
        self._write_small_files(staging, step, trainer_state)
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
        files = [name for name in _files_below(staging)
                 if any(name.startswith(m) for m in mine)
                 or (rank == 0 and not any(name.startswith(o) for o in others))]
        return describe_files(staging, files)

    def _write_small_files(self, staging: Path, step: int, trainer_state: dict) -> None:
        rank = self.topology.rank
        torch.save(_rng_states(), staging / "rank_states" / f"rank_{rank:05d}.pt")
        if self.topology.is_main:
            (staging / "config.json").write_text(json.dumps(self.config_record, indent=2))
            shutil.copyfile(self.tokenizer_file, staging / "tokenizer.json")
            torch.save({**trainer_state, "step": step, "format": FORMAT}, staging / "trainer_state.pt")

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
        self.log(f"asynchronous checkpoint {folder.name} complete {time.perf_counter() - started:.1f} s after it started")
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
            for old in _step_folders(self.root)[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.group)
        return final

    # -- find and load ----------------------------------------------------------------------------
    def newest_good(self) -> Path | None:
        """The newest intact checkpoint (collective); damaged ones are reported and passed over.

        Raises ``CheckpointError`` when checkpoints exist but none is intact."""
        candidates = _step_folders(self.root) if self.root.is_dir() else []
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
                "--train.resume false (or a new --train.out_dir) to start over"
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

    def load(self, folder: Path, engine) -> dict:
        """Weights and optimizer state from ``folder`` into ``engine`` at this run's layout; returns the
        trainer state."""
        states, state_dict = self._state_dict(engine, values=False)
        dcp.load(state_dict, checkpoint_id=str(folder), process_group=self.group)
        engine.load_parameter_states(states)
        trainer_state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
        rank_file = folder / "rank_states" / f"rank_{self.topology.rank:05d}.pt"
        saved_world = trainer_state.get("layout", {}).get("world_size")
        if rank_file.is_file() and saved_world == self.topology.world_size:
            _set_rng_states(torch.load(rank_file, map_location="cpu", weights_only=False))
        return trainer_state


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def read_tensors(folder: Path, names: list[str] | None = None, prefix: str = "model."):
    """Yield ``(name, full tensor)`` of a checkpoint's weights, one at a time, in one process (no
    process group, no model): what export and tests use."""
    metadata = FileSystemReader(str(folder)).read_metadata()
    keys = [k for k in metadata.state_dict_metadata if k.startswith(prefix)]
    if names is not None:
        wanted = {prefix + n for n in names}
        keys = [k for k in keys if k in wanted]
    for key in sorted(keys):
        meta = metadata.state_dict_metadata[key]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: tensor}, checkpoint_id=str(folder), no_dist=True)
        yield key[len(prefix):], tensor


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint at full size (small models and tests)."""
    return dict(read_tensors(folder))
