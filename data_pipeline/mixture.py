"""What a run reads: one prepared dataset, or a weighted mixture of several (``--data.sources``).

``--data.sources "web=/data/fineweb:0.7,code=/data/stack:0.2,math=/data/math:0.1"`` names each source, its
prepared dataset and its weight; without weights every source contributes in proportion to its size. The
sources must share the sequence length and the tokenizer (by vocabulary hash). The reader draws them through
mosaicml-streaming's ``Stream`` proportions (MDS only): each epoch takes ``weight * epoch size`` samples of each
source, shuffled together; the sample order depends on the seed alone, resumes exactly, and at another number
of data-parallel ranks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.shards import MANIFEST, read_manifest

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Source:
    name: str
    root: Path
    manifest: dict
    weight: float | None = None  # None: in proportion to its size

    @property
    def tokenizer_sha256(self) -> str:
        if "tokenizer_sha256" in self.manifest:
            return self.manifest["tokenizer_sha256"]
        from data_pipeline.tokenizer import read_tokenizer, vocabulary_sha256  # a dataset from before the hash

        return vocabulary_sha256(read_tokenizer(self.root / self.manifest["tokenizer"]))


def parse_sources(text: str) -> list[tuple[str, str, float | None]]:
    """``NAME=PATH[:WEIGHT],...`` -> (name, path, weight or None)."""
    entries = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, rest = item.partition("=")
        if not sep or not _NAME.fullmatch(name.strip()) or not rest.strip():
            raise DataError(f"--data.sources: {item!r} is not NAME=PATH[:WEIGHT] (names: letters, digits, _ . -); "
                            "e.g. web=/data/fineweb:0.7,code=/data/stack:0.3")
        path, weight = rest.strip(), None
        head, colon, tail = path.rpartition(":")
        if colon:
            try:
                weight = float(tail)
            except ValueError:
                weight = None
            else:
                path = head
                if not weight > 0:
                    raise DataError(f"--data.sources: the weight of {name} must be positive, got {tail}")
        entries.append((name.strip(), path, weight))
    if not entries:
        raise DataError("--data.sources is empty; give NAME=PATH[:WEIGHT],...")
    names = [n for n, _, _ in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"--data.sources: the name(s) {', '.join(repeated)} appear more than once")
    weighted = [w is not None for _, _, w in entries]
    if any(weighted) and not all(weighted):
        raise DataError("--data.sources: give a weight to every source or to none (none: in proportion to their "
                        "sizes)")
    return entries


def open_sources(text: str, seq_len: int) -> list[Source]:
    """The sources of ``--data.sources``, checked against each other and the model's sequence length."""
    sources = []
    for name, path, weight in parse_sources(text):
        root = Path(path)
        if not (root / MANIFEST).is_file():
            raise DataError(f"--data.sources: {name}={path} is not a prepared dataset (no {MANIFEST}); prepare each "
                            "source with memdlm-prepare-data and one --tokenizer shared by all of them")
        sources.append(Source(name, root, read_manifest(root), weight))
    check_compatible(sources, seq_len)
    return sources


def check_compatible(sources: list[Source], seq_len: int) -> None:
    first = sources[0]
    for other in sources[1:]:
        if other.manifest["seq_len"] != first.manifest["seq_len"]:
            raise DataError(f"--data.sources: {first.name} ({first.root}) holds samples of {first.manifest['seq_len']} "
                            f"tokens but {other.name} ({other.root}) of {other.manifest['seq_len']}; prepare every "
                            "source with the same --seq-len")
        if other.tokenizer_sha256 != first.tokenizer_sha256:
            raise DataError(f"--data.sources: {first.name} ({first.root}) and {other.name} ({other.root}) were "
                            "tokenized with different tokenizers (their vocabularies differ); prepare every source "
                            "with the same --tokenizer")
    for source in sources:
        if source.manifest["seq_len"] != seq_len:
            raise DataError(
                f"{source.root} was packed into sequences of {source.manifest['seq_len']} tokens but --model.seq_len "
                f"is {seq_len}; use --model.seq_len {source.manifest['seq_len']} or prepare the data again with "
                f"--seq-len {seq_len}")


def proportions(sources: list[Source]) -> list[float]:
    """Each source's share of the samples drawn (the weights normalised, or the sizes)."""
    weights = [s.weight if s.weight is not None else float(s.manifest["num_samples"]) for s in sources]
    total = sum(weights)
    return [w / total for w in weights]
