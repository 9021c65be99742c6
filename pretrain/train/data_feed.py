"""The trainer's data: the prepared dataset (raw input prepared on first use) or mixture of datasets, each
replica's stream of masked micro-batches (read on one rank, broadcast to the replica's other ranks), the
loader positions that checkpoints carry, and the held-out validation batches of each source.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.errors import DataError
from data_pipeline.loader import ReaderOptions, open_batches
from data_pipeline.mixture import Source, proportions
from data_pipeline.readers import MaskingSpec
from data_pipeline.source import resolve_sources
from data_pipeline.validation import validation_batches
from parallel.collectives import broadcast_batch
from parallel.topology import Topology
from pretrain.config import RunConfig
from pretrain.eval.heldout import evaluation_collates


class DataFeed:
    """This replica's micro-batches on every one of its ranks, and the loader positions a checkpoint carries.

    A ``Stateful`` of the checkpointer: ``state_dict()`` (collective) gives every data rank's loader position,
    ``load_state_dict`` takes it back before ``start()`` opens the stream there. ``prefetch()`` starts the next
    micro-batch's read and copy while a step runs; the position a checkpoint records is the one from before
    that read, so a resumed run reads that batch again."""

    def __init__(self, cfg: RunConfig, topology: Topology, sources: list[Source]):
        self.cfg, self.topology, self.sources = cfg, topology, sources
        self.resume_from: dict | None = None  # this data rank's loader position, from a checkpoint
        self.data = self.stream = None
        trajectory = cfg.memory.trajectory
        self.shape = (cfg.train.micro_batch_size, cfg.model.seq_len, trajectory.num_states,
                      trajectory.pad_mode == "inner")
        self.ahead, self.state_before_ahead = None, None

    def start(self) -> None:
        """Open this replica's stream (collective), at the loaded position if there is one."""
        self.data = open_data(self.cfg, self.topology, self.sources, self.resume_from)
        self.stream = iter(self.data) if self.data is not None else None

    def next(self):
        """The next micro-batch on this rank's device (the prefetched one if there is one)."""
        batch, self.ahead = (self.ahead, None) if self.ahead is not None else (self._fetch(), None)
        return batch

    def prefetch(self) -> None:
        self.state_before_ahead = self.data.state_dict() if self.data is not None else None
        self.ahead = self._fetch()

    def _fetch(self):
        """Read (on the replica's reading rank), share with the replica's other ranks on the host, then
        copy to this rank's device without blocking (from pinned memory on GPUs)."""
        topology = self.topology
        local = next(self.stream) if self.stream is not None else None
        batch = broadcast_batch(local, self.shape, topology.data_source_rank, topology.model_parallel_cpu_group,
                                torch.device("cpu"))
        if topology.device.type == "cuda" and not batch.input_ids.is_pinned():
            batch = batch.pin_memory()  # a batch received from the reading rank
        return batch.to(topology.device, non_blocking=True)

    def state_dict(self) -> dict:
        """Every data-parallel rank's loader position, in data-rank order (collective)."""
        gathered = [None] * self.topology.world_size
        position = self.state_before_ahead if self.ahead is not None else (
            self.data.state_dict() if self.data is not None else None)
        entry = (self.topology.data_parallel_rank, position) if self.data is not None else None
        if dist.is_initialized() and self.topology.world_size > 1:
            dist.all_gather_object(gathered, entry)
        else:
            gathered = [entry]
        by_rank = dict(filter(None, gathered))
        return {"by_data_rank": [by_rank[rank] for rank in sorted(by_rank)]}

    def load_state_dict(self, state: dict) -> None:
        self.resume_from = resume_position(state["by_data_rank"], self.cfg.data.format,
                                           self.topology.data_parallel_rank)


class Validation:
    """This data rank's share of the first ``eval.num_samples`` validation samples of each source with a
    validation split, masked from the evaluation's seed (and, for adaptation, the same samples masked at
    ``memory.prompt_mask_ratio``). Every rank reads the small validation files itself."""

    def __init__(self, cfg: RunConfig, topology: Topology, sources: list[Source]):
        self.names, self.batches, self.prompts, self.weights = [], [], [], []
        shares = proportions(sources)
        collates = evaluation_collates(cfg.eval.seed, cfg.memory, cfg.diffusion.eps, cfg.model.seq_len,
                                       cfg.model.vocab_size, cfg.eval.adaptation, cfg.eval.context_fraction,
                                       unscored_token(cfg, sources[0].manifest))
        for source, share in zip(sources, shares):
            if source.manifest.get("validation") is None:
                continue
            total = min(cfg.eval.num_samples, source.manifest["validation"]["num_samples"])
            if total < topology.data_parallel_size:
                raise DataError(f"--eval.num_samples: {total} validation samples of {source.root} cannot be shared "
                                f"by {topology.data_parallel_size} data-parallel ranks; evaluate more samples")
            indices = list(range(topology.data_parallel_rank, total, topology.data_parallel_size))
            masked = [[b.to(topology.device) for b in batches] for batches in
                      validation_batches(source.root, source.manifest, collates, indices, cfg.eval.micro_batch_size)]
            self.names.append(source.name)
            self.batches.append(masked[0])
            self.prompts.append(masked[1] if cfg.eval.adaptation else None)
            self.weights.append(share)


def has_validation(sources: list[Source]) -> bool:
    return any(s.manifest.get("validation") is not None for s in sources)


def unscored_token(cfg: RunConfig, manifest: dict) -> int:
    """The token never masked nor scored: the end-of-text token unless it is a target (--data.eot_target)."""
    return -1 if cfg.data.eot_target else int(manifest["eot_token_id"])


def resume_position(saved: list[dict], data_format: str, data_parallel_rank: int) -> dict | None:
    """The loader position this data rank resumes from (``saved``: every data rank's, in order). MDS ranks
    all save the same position, which resumes at any number of ranks; webdataset's is per rank (its loader
    refuses another layout)."""
    if not saved:
        return None
    if data_format == "mds" or data_parallel_rank >= len(saved):
        return saved[0]
    return saved[data_parallel_rank]


def open_data(cfg: RunConfig, topology: Topology, sources: list[Source], state):
    streaming_world = _streaming_world(topology)
    if not topology.reads_data:
        return None
    manifest = sources[0].manifest
    spec = MaskingSpec(cfg.train.seed, cfg.memory.trajectory, cfg.diffusion.eps, cfg.model.seq_len,
                       cfg.model.vocab_size, unscored_token=unscored_token(cfg, manifest),
                       random_length_fraction=cfg.data.random_length_fraction,
                       pad_id=int(manifest["pad_token_id"]))
    reader = ReaderOptions(
        data_format=cfg.data.format, num_workers=cfg.data.num_workers, shuffle=cfg.data.shuffle,
        num_canonical_nodes=cfg.data.num_canonical_nodes, shuffle_block_size=cfg.data.shuffle_block_size,
        verify_hashes=cfg.data.verify_hashes, max_skipped_samples=cfg.data.max_skipped_samples,
        pin_memory=topology.device.type == "cuda",
    )
    os.environ.update(streaming_world)
    readers_only = topology.replica_size > 1
    return open_batches(sources, spec, cfg.train.micro_batch_size, reader,
                        topology.data_parallel_rank, topology.data_parallel_size, state,
                        barrier_group=topology.data_parallel_group if readers_only else None)


STREAMING_WORLD = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def restored_environment(names):
    """Put ``names`` back as they were afterwards (a later run in this process must see its own world)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _shared_memory_key() -> str:
    """What identifies this process's /dev/shm: processes with the same key share mosaicml-streaming's
    shared memory, whatever their hostnames say (two emulated Slurm nodes on one machine do)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        shm = os.stat("/dev/shm")
        return f"{boot}:{shm.st_dev}:{shm.st_ino}"
    except OSError:
        return socket.gethostname()


def _streaming_world(topology: Topology) -> dict[str, str]:
    """The world mosaicml-streaming should see (it takes it from RANK / WORLD_SIZE / LOCAL_*): only the
    reading ranks (one per model replica) read, numbered by data-parallel rank, and a "node" is a set of
    readers that share shared memory (else two readers on one machine that torchrun placed on different
    nodes would race for the same shared-memory names). Collective over every rank."""
    if topology.world_size == 1:
        return {}
    mine = (topology.data_parallel_rank, _shared_memory_key()) if topology.reads_data else None
    gathered = [None] * topology.world_size
    dist.all_gather_object(gathered, mine, group=topology.control_group)
    readers = sorted(r for r in gathered if r is not None)
    keys = [key for _, key in readers]
    per_node = keys.count(keys[0])
    chunks = [keys[i:i + per_node] for i in range(0, len(keys), per_node)]
    regular = len(keys) % per_node == 0 and all(len(set(c)) == 1 for c in chunks) \
        and len({c[0] for c in chunks}) == len(chunks)
    if not regular:  # uneven or interleaved placement: one reader per node, each its own cache prefix
        per_node = 1
    rank = topology.data_parallel_rank
    return {"RANK": str(rank), "WORLD_SIZE": str(topology.data_parallel_size), "LOCAL_RANK": str(rank % per_node),
            "LOCAL_WORLD_SIZE": str(per_node)}


def prepare_data(cfg: RunConfig, topology: Topology) -> list[Source]:
    """Rank 0 prepares raw input if needed while the others wait; then every rank reads the manifests."""
    data = cfg.data
    args = (data.path, data.sources, data.tokenizer, cfg.model.seq_len, cfg.model.vocab_size, data.cache_dir)
    options = {"prepare_workers": data.prepare_workers, "val_fraction": data.val_fraction,
               "announce": (lambda message: print(message, flush=True)) if topology.is_main else None}
    if topology.world_size > 1:
        failure = None
        if topology.is_main:
            try:
                resolve_sources(*args, prepare=True, **options)
            except Exception as err:  # re-raised after the barrier, so no rank waits forever
                failure = err
        dist.barrier()
        if failure is not None:
            raise failure
    return resolve_sources(*args, prepare=topology.is_main, **options)
