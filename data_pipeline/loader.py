"""The trainer's endless stream of masked micro-batches, with a resumable state.

``open_batches`` returns an object that iterates micro-batches forever (epoch after epoch)
and whose ``state_dict()`` taken between steps, passed back as ``state``, continues the
stream exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from streaming import Stream
from streaming.base import StreamingDataLoader
from torch.utils.data import DataLoader

from data_pipeline.errors import DataError
from data_pipeline.mixture import Source
from data_pipeline.readers import IndexedStreamingDataset, MaskingCollate, MaskingSpec, WebDatasetStream
from data_pipeline.shards import check_shards


@dataclass(frozen=True)
class ReaderOptions:
    data_format: str = "mds"
    num_workers: int = 1
    shuffle: bool = True
    num_canonical_nodes: int = 1
    shuffle_block_size: int = 0
    verify_hashes: bool = True
    max_skipped_samples: int = 0
    pin_memory: bool = False


def ignore_interrupts(worker_id: int = 0) -> None:
    """A loader worker's start: ignore SIGINT. A terminal's Ctrl-C reaches the whole process group; the
    trainer turns it into a stop that still reads the batches of the step in flight and saves, so its
    workers must not die of it first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class MaskedStreamingDataLoader(StreamingDataLoader):
    """mosaicml-streaming's resumable loader, told how many samples a ``MaskedBatch`` holds."""

    def _get_batch_size(self, batch) -> int:
        return batch.num_sequences


@contextlib.contextmanager
def _barriers_on(group):
    """mosaicml-streaming calls ``torch.distributed.barrier()`` on the default group while it sets
    up; when only some ranks read data, those calls must stay among the reading ranks."""
    if group is None:
        yield
        return
    original = dist.barrier
    dist.barrier = functools.partial(original, group=group)
    try:
        yield
    finally:
        dist.barrier = original


PREFIX_LOCK = "memdlm-streaming-prefix.lock"


@contextlib.contextmanager
def _prefix_lock():
    """A machine-wide lock (in /dev/shm, where the prefixes live, else the temporary directory)."""
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else \
        Path(tempfile.gettempdir())
    with open(folder / PREFIX_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_streaming_dataset(group=None, **kwargs) -> "IndexedStreamingDataset":
    """mosaicml-streaming picks the first free shared-memory prefix by looking, then creating: two jobs
    starting at once on one machine can pick the same one, and the slower gets ``FileExistsError`` (seen with
    two test workers; under several ranks the leader's failure also leaves its ranks at mismatched barriers).
    So each node's leader rank finds and creates its prefix under a machine-wide lock, and the other ranks of
    its node take the prefix their leader found (``_leaders_prefix``) rather than looking themselves: looking
    while another job registers, they could see another prefix free than their leader did, and then find that
    job's directories there. A process alone (no process group) also tries again after a random pause, against
    jobs that do not take the lock. ``group``: the ranks that open the dataset together (default: all)."""
    import streaming.base.shared.prefix as prefixes
    from streaming.base.world import World

    world = World.detect()
    alone = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
    find = prefixes._check_and_find_retrying
    if not alone:
        prefixes._check_and_find_retrying = _leaders_prefix(find, world, group)
    try:
        for attempt in range(6 if alone else 1):
            try:
                with _prefix_lock() if world.is_local_leader else contextlib.nullcontext():
                    return IndexedStreamingDataset(**kwargs)
            except FileExistsError:
                if attempt == 5 or not alone:
                    raise
                time.sleep(random.uniform(0.05, 0.5))
    finally:
        prefixes._check_and_find_retrying = find


def _leaders_prefix(find, world, group):
    """mosaicml-streaming's prefix search as each node's leader does it, its result handed to the node's other
    ranks (one all-gather over ``group`` per search; every rank searches as often)."""
    def search(*args, **kwargs):
        mine = find(*args, **kwargs) if world.is_local_leader else None
        found = [None] * dist.get_world_size(group)
        dist.all_gather_object(found, (world.node, mine), group=group)
        return next(value for node, value in found if node == world.node and value is not None)

    return search


class MDSBatches:
    def __init__(self, folders: list[tuple[Path, float | None]], micro_batch_size: int, collate: MaskingCollate,
                 options: ReaderOptions, seed: int, state: dict | None, barrier_group=None):
        if len(folders) == 1 and folders[0][1] is None:
            where = {"local": str(folders[0][0]), "remote": None}
        else:  # a mixture: one stream per source, drawn in proportion to its weight (or its size)
            where = {"streams": [Stream(local=str(folder), proportion=weight) for folder, weight in folders]}
        with _barriers_on(barrier_group):
            self.dataset = open_streaming_dataset(
                group=barrier_group,
                **where, shuffle=options.shuffle, shuffle_seed=seed,
                num_canonical_nodes=options.num_canonical_nodes, batch_size=micro_batch_size,
                shuffle_block_size=options.shuffle_block_size or None,
            )
        self.loader = MaskedStreamingDataLoader(
            self.dataset, batch_size=micro_batch_size, num_workers=options.num_workers, collate_fn=collate,
            pin_memory=options.pin_memory, drop_last=True,
            prefetch_factor=4 if options.num_workers > 0 else None, worker_init_fn=ignore_interrupts,
        )
        if state is not None:
            self.loader.load_state_dict(state["loader"])

    def __iter__(self):
        empty_epochs = 0
        while True:
            yielded = False
            for batch in self.loader:
                yielded = True
                yield batch
            # An epoch can be empty once: right after resuming at its very end.
            empty_epochs = 0 if yielded else empty_epochs + 1
            if empty_epochs >= 2:
                raise DataError("the dataset holds fewer samples than one micro-batch per rank")

    def state_dict(self) -> dict:
        return {"format": "mds", "loader": self.loader.state_dict()}


class WebDatasetBatches:
    def __init__(self, folder: Path, shards: list[dict], micro_batch_size: int, collate: MaskingCollate,
                 options: ReaderOptions, seed: int, rank: int, num_ranks: int, state: dict | None):
        self.layout = {"ranks": num_ranks, "workers": options.num_workers, "micro_batch_size": micro_batch_size}
        self.consumed = 0
        if state is not None:
            saved = {k: state[k] for k in self.layout}
            if saved != self.layout:
                raise DataError(
                    f"webdataset resume needs the layout it was saved with {saved}, not {self.layout}: its sample "
                    "order depends on ranks, workers and micro-batch size (use MDS for elastic resume)"
                )
            self.consumed = state["batches"]
        stream = WebDatasetStream(
            str(folder), shards, micro_batch_size, collate, seed, rank, num_ranks,
            start_batches=self.consumed, max_skipped=options.max_skipped_samples, shuffle=options.shuffle,
        )
        self.loader = DataLoader(
            stream, batch_size=None, num_workers=options.num_workers, pin_memory=options.pin_memory,
            prefetch_factor=4 if options.num_workers > 0 else None, worker_init_fn=ignore_interrupts,
        )

    def __iter__(self):
        for batch in self.loader:
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"format": "webdataset", "batches": self.consumed, **self.layout}


def open_batches(sources: list[Source], spec: MaskingSpec, micro_batch_size: int, options: ReaderOptions,
                 rank: int = 0, num_ranks: int = 1, state: dict | None = None, barrier_group=None):
    """Micro-batches of this data-parallel rank from the prepared dataset(s) ``sources`` (a mixture when
    several; ``data_pipeline.mixture``).

    ``barrier_group``: the group of the ranks that read (when not every rank does)."""
    if state is not None and state.get("format") != options.data_format:
        raise DataError(
            f"the checkpoint's data state is for format {state.get('format')!r}, not --data.format "
            f"{options.data_format}; resume with the same format"
        )
    folders = [(check_shards(s.root, s.manifest, options.data_format, options.verify_hashes), s.weight)
               for s in sources]
    collate = MaskingCollate(spec)
    if options.data_format == "mds":
        return MDSBatches(folders, micro_batch_size, collate, options, spec.seed, state, barrier_group)
    if len(sources) > 1:
        raise DataError("--data.sources reads MDS shards only (mixing webdataset shards by weight, resumably, is "
                        "not supported); prepare the sources with --format mds (or both) and use --data.format mds")
    shards = sources[0].manifest["formats"]["webdataset"]["shards"]
    return WebDatasetBatches(folders[0][0], shards, micro_batch_size, collate, options, spec.seed, rank, num_ranks,
                             state)
