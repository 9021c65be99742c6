"""How close does ``memdlm-prepare-data`` come to the bare tokenizer? Tokens/s of the whole preparation
against ``tokenizers``' ``encode_batch`` alone, on the same documents with the same number of processes.

Documents: the bundled corpus repeated to ``--mb`` megabytes, one document per paragraph, cut into
``--files`` files written three ways: plain text, Parquet (a ``text`` column) and zstd-compressed JSON Lines.
Tokenizer: a byte-level BPE of 4096 tokens trained on the corpus (the default run's).

- bare: ``P`` processes (spawned and warmed up before the clock starts), each running ``encode_batch`` on its
  share of the documents, already in memory, 256 at a time: the tokenizer's rate and nothing else;
- preparation: ``prepare_dataset`` with ``num_workers=P`` on the files, from the command's start to the
  renamed dataset: reading and decompressing, the process pool's start, tokenization, packing, MDS shard
  writing with its hashes, the validation split (2%), the merged index and the manifest.

Ratio = preparation / bare, measured side by side for each format and each ``P``. Target: >= 0.7.

Usage: python benchmarks/prepare_throughput.py [--mb 24] [--files 4] [--processes 1 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Nothing heavy at module level: the spawned pools (ours and the bare one) import this file as their
# __mp_main__, and a worker that imported torch through data_pipeline.prepare would start seconds later.

_tokenizer = None


def _init(tokenizer_json: str) -> None:
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode(documents: list[str]) -> int:
    tokens = 0
    for start in range(0, len(documents), 256):
        tokens += sum(len(e.ids) for e in _tokenizer.encode_batch(documents[start:start + 256],
                                                                  add_special_tokens=False))
    return tokens


def _ready(_: int) -> int:
    return 0


def bare_rate(documents: list[str], tokenizer_json: str, processes: int) -> float:
    """Tokens/s of encode_batch alone over ``processes`` processes (their start excluded)."""
    shares = [documents[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_init, initargs=(tokenizer_json,)) as pool:
        pool.map(_ready, range(processes))
        start = time.perf_counter()
        tokens = sum(pool.map(_encode, shares))
        seconds = time.perf_counter() - start
    return (tokens + len(documents)) / seconds  # + the end-of-text token each document gets


def write_inputs(root: Path, megabytes: int, files: int) -> tuple[dict[str, Path], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from data_pipeline.corpus import BUNDLED_CORPUS

    corpus = BUNDLED_CORPUS.read_text()
    paragraphs = [p + "\n" for p in corpus.split("\n\n") if p.strip()]
    documents, size = [], 0
    while size < megabytes << 20:
        for paragraph in paragraphs:
            documents.append(paragraph)
            size += len(paragraph)
    per_file = -(-len(documents) // files)
    folders = {name: root / name for name in ("text", "parquet", "jsonl.zst")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for i in range(files):
        part = documents[i * per_file:(i + 1) * per_file]
        (folders["text"] / f"{i:03d}.txt").write_text("\n".join(part))
        pq.write_table(pa.table({"text": part}), folders["parquet"] / f"{i:03d}.parquet", row_group_size=4096)
        lines = "".join(json.dumps({"text": d}) + "\n" for d in part).encode()
        (folders["jsonl.zst"] / f"{i:03d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
    return folders, documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=24, help="megabytes of text (default 24)")
    parser.add_argument("--files", type=int, default=4, help="input files per format (default 4)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    args = parser.parse_args()
    from data_pipeline.prepare import PrepareOptions, prepare_dataset

    root = Path(tempfile.mkdtemp(prefix="memdlm-prepare-bench-"))
    try:
        folders, documents = write_inputs(root / "in", args.mb, args.files)
        prepare_dataset(PrepareOptions(input=str(folders["text"] / "000.txt"), output=str(root / "tok"),
                                       tokenizer_only=True, tokenizer_sample_mb=4, progress=False))
        tokenizer_file = root / "tok" / "tokenizer.json"
        tokenizer_json = tokenizer_file.read_text()
        print(f"{len(documents)} documents, {sum(map(len, documents)) / 2**20:.1f} MB of text in {args.files} files "
              f"per format; BPE of 4096 tokens; {os.cpu_count()} CPUs")
        print(f"{'format':<10} {'processes':>9} {'bare tok/s':>12} {'prepare tok/s':>14} {'ratio':>6}")
        for processes in args.processes:
            for name, folder in folders.items():
                bare = bare_rate(documents, tokenizer_json, processes)
                output = root / f"out-{name}-{processes}"
                start = time.perf_counter()
                manifest = prepare_dataset(PrepareOptions(
                    input=str(folder), output=str(output), seq_len=2048, tokenizer=str(tokenizer_file),
                    num_workers=processes, progress=False, val_fraction=0.02))
                seconds = time.perf_counter() - start
                tokens = manifest["num_tokens"] + manifest["validation"]["num_tokens"]
                prepared = tokens / seconds
                print(f"{name:<10} {processes:>9} {bare:>12,.0f} {prepared:>14,.0f} {prepared / bare:>6.2f}",
                      flush=True)
                shutil.rmtree(output)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
