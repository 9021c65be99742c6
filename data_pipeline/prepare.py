"""Text -> tokenizer -> packed samples -> MDS and/or webdataset shards + manifest.

Input is streamed (documents are read, tokenized and packed in batches; nothing holds the
corpus), tokenization runs in a process pool with results kept in input order, and the
dataset is built in a staging folder renamed into place at the end, so an interrupted run
never leaves something that looks like a finished dataset.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from common.errors import UsageError
from common.output_folders import check_replaceable
from data_pipeline.documents import Document, input_files, iter_documents, iter_training_text
from data_pipeline.errors import DataError
from data_pipeline.packing import Packer
from data_pipeline.prepare_options import FORMAT_DIRS, PrepareOptions
from data_pipeline.shards import MANIFEST, MDSSink, WebDatasetSink, token_dtype
from data_pipeline.tokenizer import describe, limit_bytes, load_tokenizer, train_bpe
from data_pipeline.validation import ValidationSink, held_out

FORMAT_VERSION = 1
_DOCS_PER_TASK = 256


# -- tokenization workers ----------------------------------------------------------------------
_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode(task: tuple[list[Document], int]) -> list[tuple[np.ndarray, int]]:
    """Documents -> (token ids with the end-of-document token, prompt length)."""
    documents, eot_id = task
    texts = [d.text for d in documents]
    prompts = [d.prompt or "" for d in documents]
    encoded = _worker_tokenizer.encode_batch(texts, add_special_tokens=False)
    encoded_prompts = _worker_tokenizer.encode_batch(prompts, add_special_tokens=False)
    out = []
    for body, prompt in zip(encoded, encoded_prompts):
        ids = np.asarray(prompt.ids + body.ids + [eot_id], dtype=np.int32)
        out.append((ids, len(prompt.ids)))
    return out


def _batches(documents: Iterator[Document], eot_id: int) -> Iterator[tuple[list[Document], int]]:
    while chunk := list(islice(documents, _DOCS_PER_TASK)):
        yield chunk, eot_id


def _encoded_stream(files, tokenizer_json: str, eot_id: int, num_workers: int, progress: tqdm):
    def account(task_result, task):
        progress.update(sum(len(d.text) + len(d.prompt or "") for d in task[0]))
        return task_result

    tasks = _batches(iter_documents(files), eot_id)
    if num_workers == 0:
        _init_worker(tokenizer_json)
        for task in tasks:
            yield from account(_encode(task), task)
        return
    pending: list = []
    # Spawned, not forked: a fork copies the locks of the caller's other threads (a trainer or a test
    # process has loader threads), and a worker that inherits a held one never starts (seen: a hang).
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_json,)) as pool:
        # A bounded window of tasks in flight keeps memory flat while results stay in input order.
        for task in tasks:
            pending.append((pool.apply_async(_encode, (task,)), task))
            if len(pending) >= 4 * num_workers:
                result, done = pending.pop(0)
                yield from account(result.get(), done)
        for result, done in pending:
            yield from account(result.get(), done)


# -- the whole preparation -------------------------------------------------------------------
def prepare_dataset(options: PrepareOptions) -> dict:
    options.check()
    files = input_files(options.input)
    output = Path(options.output)
    try:  # only an earlier prepared dataset may be replaced, and only with --overwrite
        check_replaceable(output, "memdlm-prepare-data", options.overwrite, own_kind="dataset")
    except UsageError as err:
        raise DataError(f"--output: {err}") from None
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _prepare_into(options, files, staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _prepare_into(options: PrepareOptions, files: list[Path], staging: Path) -> dict:
    # 1. Tokenizer: loaded, or trained on (a prefix of) the input.
    if options.tokenizer:
        info = load_tokenizer(options.tokenizer)
        tokenizer = info.tokenizer
    else:
        tokenizer = train_bpe(limit_bytes(iter_training_text(files), options.tokenizer_sample_mb << 20),
                              options.vocab_size)
    tokenizer_file = staging / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    info = describe(tokenizer, tokenizer_file)
    if info.vocab_size > options.vocab_size:
        raise DataError(
            f"the tokenizer has {info.vocab_size} tokens, more than --vocab-size {options.vocab_size}; raise it"
        )
    pad_id = info.pad_id if info.pad_id is not None else info.eot_id
    dtype = token_dtype(options.vocab_size)

    # 2. Tokenize in parallel, pack, write every sink.
    sinks = []
    if "mds" in options.formats:
        sinks.append(("mds", MDSSink(staging, options.seq_len, dtype, options.samples_per_shard)))
    if "webdataset" in options.formats:
        sinks.append(("webdataset", WebDatasetSink(staging, options.samples_per_shard)))
    packer = Packer(options.seq_len, pad_id, dtype)
    validation = ValidationSink(options.seq_len, pad_id, dtype)
    val_files = input_files(options.val_input) if options.val_input else []
    total_bytes = sum(f.stat().st_size for f in files + val_files)
    progress = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not options.progress)
    num_samples = 0

    def emit(samples) -> None:
        nonlocal num_samples
        for sample in samples:
            for _, sink in sinks:
                sink.write(num_samples, sample)
            num_samples += 1
        progress.set_postfix(samples=num_samples, refresh=False)

    encoded = _encoded_stream(files, tokenizer.to_str(), info.eot_id, options.num_workers, progress)
    for document, (ids, prompt_length) in enumerate(encoded):
        if options.val_fraction and held_out(document, options.val_fraction):
            validation.add(ids, prompt_length)
        else:
            emit(packer.add(ids, prompt_length))
    emit(packer.finish())
    if val_files:
        for ids, prompt_length in _encoded_stream(val_files, tokenizer.to_str(), info.eot_id, options.num_workers,
                                                  progress):
            validation.add(ids, prompt_length)
    progress.close()
    if num_samples == 0:
        raise DataError(f"--input: no documents found in {options.input}")

    formats = {name: {"dir": FORMAT_DIRS[name], "shards": sink.close()} for name, sink in sinks}
    manifest = {
        "format_version": FORMAT_VERSION,
        "seq_len": options.seq_len,
        "vocab_size": options.vocab_size,
        "tokenizer_vocab_size": info.vocab_size,
        "tokenizer": "tokenizer.json",
        "mask_token_id": info.mask_id,
        "eot_token_id": info.eot_id,
        "pad_token_id": pad_id,
        "token_dtype": np.dtype(dtype).name,
        "num_samples": num_samples,
        "num_tokens": packer.num_tokens,
        "num_documents": packer.num_documents,
        "sources": [str(f) for f in files],
        "formats": formats,
    }
    if (options.val_fraction or options.val_input) and not (options.val_optional and validation.is_empty()):
        manifest["validation"] = validation.save(staging)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
