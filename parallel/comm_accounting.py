"""Count collectives and bytes per process group, to check what a step communicates.

``install()`` wraps the ``torch.distributed`` collectives once, before any engine caches them
(DeepSpeed keeps references to some at initialisation); ``counting(groups)`` then records,
while it is open, every call whose group matches one of ``groups`` (by member ranks).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter

import torch
import torch.distributed as dist

_OPS = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
        "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
        "_all_gather_base", "_reduce_scatter_base")
_active: list["CollectiveCount"] = []
_installed = False


class CollectiveCount:
    def __init__(self, groups: dict):
        self.ranks = {name: tuple(dist.get_process_group_ranks(g)) for name, g in groups.items()}
        self.calls: dict[str, Counter] = {name: Counter() for name in groups}
        self.bytes: dict[str, int] = {name: 0 for name in groups}
        self.bytes_by_op: dict[str, Counter] = {name: Counter() for name in groups}

    def record(self, op: str, group, tensors) -> None:
        ranks = tuple(range(dist.get_world_size())) if group is None else tuple(dist.get_process_group_ranks(group))
        for name, members in self.ranks.items():
            if members == ranks:
                size = sum(t.numel() * t.element_size() for t in tensors)
                self.calls[name][op] += 1
                self.bytes[name] += size
                self.bytes_by_op[name][op] += size


def _tensors_of(args, kwargs) -> list[torch.Tensor]:
    found = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
            break  # the first tensor argument is the payload (output buffers are not counted twice)
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            found.extend(value)
            break
    return found


def _wrap(op: str, fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _active:
            try:
                group = signature.bind_partial(*args, **kwargs).arguments.get("group")
            except TypeError:
                group = kwargs.get("group")
            for counter in _active:
                counter.record(op, group, _tensors_of(args, kwargs))
        return fn(*args, **kwargs)

    return wrapper


def install() -> None:
    global _installed
    if _installed:
        return
    for op in _OPS:
        if hasattr(dist, op):
            setattr(dist, op, _wrap(op, getattr(dist, op)))
    _installed = True


@contextlib.contextmanager
def counting(groups: dict):
    install()
    counter = CollectiveCount(groups)
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)
