"""Input files -> tokenizer -> packed samples -> MDS and/or webdataset shards + manifest.

Each input file is a unit (``data_pipeline.unit_writer``): read as a stream, tokenized in a process pool
(``data_pipeline.tokenize_pool``) and packed on its own, its shards and record written in a staging folder.
The dataset is assembled from the complete units (the MDS indexes merged in input order, the validation
pieces joined, the manifest written last) and renamed into place, so an interrupted preparation never leaves
something that looks like a finished dataset, and running the same command again resumes: the units already
complete are kept.

A preparation can be cut into parts (``--num-parts N --part I``: unit ``u`` belongs to part ``u mod N``), each
run anywhere (a Slurm array job), into ``OUTPUT/parts/part-I-of-N/``; ``merge_parts`` then assembles them
into OUTPUT: the same dataset, shard for shard, as one preparation of all files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import UsageError
from common.output_folders import check_replaceable, describe, write_marker
from data_pipeline.documents import BadFiles, Fields, input_files, iter_training_text
from data_pipeline.errors import DataError
from data_pipeline.prepare_options import FORMAT_DIRS, PrepareOptions
from data_pipeline.shards import MANIFEST, token_dtype
from data_pipeline.tokenize_pool import Unit, encoded_events
from data_pipeline.tokenizer import (
    TokenizerInfo,
    limit_bytes,
    load_tokenizer,
    read_tokenizer,
    train_bpe,
    vocabulary_sha256,
)
from data_pipeline.tokenizer import (
    describe as describe_tokenizer,
)
from data_pipeline.unit_writer import UNITS_DIR, VAL_DIR, UnitWriter, read_unit_records, remove_unit, write_json_atomic
from data_pipeline.validation import write_validation

FORMAT_VERSION = 2
PROG = "memdlm-prepare-data"
SETTINGS, PART_RECORD, TOKENIZER = "settings.json", "part.json", "tokenizer.json"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- what to prepare ------------------------------------------------------------------------------
def input_units(options: PrepareOptions) -> list[Unit]:
    """Every input file as a unit: the training files in sorted order, then the --val-input files."""
    train = input_files(options.input)
    val = input_files(options.val_input, "--val-input") if options.val_input else []
    return [Unit(i, f, "train") for i, f in enumerate(train)] + \
        [Unit(len(train) + j, f, "val") for j, f in enumerate(val)]


def _settings(options: PrepareOptions, units: list[Unit], info: TokenizerInfo | None) -> dict:
    """What makes two preparations (or two parts) write the same units."""
    return {
        "format_version": FORMAT_VERSION, "seq_len": options.seq_len, "formats": sorted(options.formats),
        "samples_per_shard": options.samples_per_shard, "val_fraction": options.val_fraction,
        "fields": [options.text_field, options.prompt_field, options.response_field],
        "inputs": [[str(u.file), u.file.stat().st_size, u.role] for u in units],
        "tokenizer_sha256": vocabulary_sha256(info.tokenizer) if info is not None else None,
        "eot_token_id": info.eot_id if info is not None else None,
        "mask_token_id": info.mask_id if info is not None else None,
        "pad_token_id": info.pad_id if info is not None else None,
        "vocab_size": options.vocab_size,
    }


@contextlib.contextmanager
def _exclusive(lock_file: Path, what: str):
    """One preparation at a time writes ``what``."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DataError(f"another {PROG} is writing {what} (lock {lock_file}); wait for it to finish") from None
    try:
        yield
    finally:
        handle.close()
        with contextlib.suppress(OSError):
            lock_file.unlink()


# -- the tokenizer ------------------------------------------------------------------------------
def _tokenizer(options: PrepareOptions, units: list[Unit], staging: Path | None) -> TokenizerInfo:
    """The loaded tokenizer, or a BPE trained on the training files (reused from ``staging`` when resuming)."""
    if options.tokenizer:
        return load_tokenizer(options.tokenizer, options.eot_token, options.mask_token, options.add_mask_token)
    kept = staging / TOKENIZER if staging is not None else None
    if kept is not None and kept.is_file():
        return load_tokenizer(kept, options.eot_token, options.mask_token)
    say(f"training a byte-level BPE of {options.bpe_vocab_size} tokens on the input"
        + (f" (its first {options.tokenizer_sample_mb} MB)" if options.tokenizer_sample_mb else ""))
    fields = Fields(options.text_field, options.prompt_field, options.response_field)
    quiet = BadFiles(len(units), report=lambda message: None)  # a bad file is reported when it is tokenized
    texts = iter_training_text([u.file for u in units if u.role == "train"], fields, quiet)
    tokenizer = train_bpe(limit_bytes(texts, options.tokenizer_sample_mb << 20), options.bpe_vocab_size)
    return describe_tokenizer(tokenizer, Path("(trained)"), options.eot_token, options.mask_token)


def _vocab_size(options: PrepareOptions, info: TokenizerInfo) -> int:
    vocab_size = options.vocab_size or (info.vocab_size if options.tokenizer else options.bpe_vocab_size)
    if info.vocab_size > vocab_size:
        raise DataError(f"the tokenizer uses ids up to {info.vocab_size - 1}, beyond --vocab-size {vocab_size}; "
                        "raise it (or leave it at 0 for the tokenizer's size)")
    return vocab_size


# -- the units ------------------------------------------------------------------------------------
def _same_inputs(staging: Path, settings: dict) -> bool:
    """Whether ``staging`` was started on these inputs and settings (the tokenizer aside)."""
    try:
        saved = json.loads((staging / SETTINGS).read_text())
    except (OSError, ValueError):
        return False
    ignore = ("tokenizer_sha256", "eot_token_id", "mask_token_id", "pad_token_id")
    return {k: v for k, v in saved.items() if k not in ignore} == {k: v for k, v in settings.items() if k not in ignore}


def _open_staging(staging: Path, settings: dict) -> dict[int, dict]:
    """The units already complete in ``staging`` if it was started with the same settings (else emptied)."""
    saved = None
    if (staging / SETTINGS).is_file():
        with contextlib.suppress(ValueError, OSError):
            saved = json.loads((staging / SETTINGS).read_text())
    if saved != settings:
        if staging.exists():
            if saved is not None:
                say(f"{staging} was started with other settings or inputs: starting over")
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        write_json_atomic(staging / SETTINGS, settings)
        return {}
    done = read_unit_records(staging)
    if done:
        say(f"resuming: {len(done)} input file(s) already prepared in {staging} are kept")
    return done


def _prepare_units(options: PrepareOptions, units: list[Unit], staging: Path, info: TokenizerInfo,
                   vocab_size: int, done: dict[int, dict]) -> None:
    """Write every unit not in ``done`` into ``staging``."""
    todo = [u for u in units if u.index not in done]
    if not todo:
        return
    pad_id = info.pad_id if info.pad_id is not None else info.eot_id
    fields = Fields(options.text_field, options.prompt_field, options.response_field)
    bad = BadFiles(options.max_bad_files, report=say)
    bad.skipped = [Path(r["file"]) for r in done.values() if r.get("skipped")]
    total = sum(u.file.stat().st_size for u in todo)
    progress = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not options.progress,
                    file=sys.stderr)
    writer, base, samples = None, 0, 0
    events = encoded_events(todo, info.tokenizer.to_str(), info.eot_id, options.num_workers, fields, bad)
    try:
        for event in events:
            if writer is None or writer.unit != event.unit:
                writer = UnitWriter(staging, event.unit, options.formats, options.seq_len, pad_id,
                                    token_dtype(vocab_size), options.samples_per_shard, options.val_fraction)
            if event.kind == "docs":
                for ids, prompt_length in event.documents:
                    writer.add(ids, prompt_length)
            elif event.kind == "end":
                samples += writer.finish()["samples"]
                writer = None
            else:  # unreadable, skipped within the budget: nothing of it is kept
                writer.discard()
                write_json_atomic(staging / UNITS_DIR / f"{event.unit.name}.json", {
                    "unit": event.unit.index, "file": str(event.unit.file), "role": event.unit.role,
                    "bytes": event.unit.file.stat().st_size, "samples": 0, "tokens": 0, "documents": 0,
                    "val_samples": 0, "val_tokens": 0, "formats": {}, "skipped": event.reason})
                writer = None
            if event.kind != "docs":
                base += event.unit.file.stat().st_size
                progress.n = base
            else:
                progress.n = base + min(event.position, event.unit.file.stat().st_size)
            progress.set_postfix(files=f"{event.unit.index + 1}", samples=samples + (writer.num_samples if writer
                                                                                       else 0), refresh=False)
            progress.update(0)
    finally:
        events.close()
        if writer is not None:  # the unit in progress is incomplete: nothing of it stays
            remove_unit(staging, writer.unit.name)
        progress.close()


# -- the dataset from its units ---------------------------------------------------------------------
def assemble(folder: Path, settings: dict, info: TokenizerInfo, vocab_size: int, units: list[Unit]) -> dict:
    """The dataset in ``folder`` from its complete units: merged MDS index, validation file, manifest."""
    records = read_unit_records(folder)
    missing = [u.file for u in units if u.index not in records]
    if missing:
        raise DataError(f"{folder}: {len(missing)} input file(s) are not prepared yet, e.g. {missing[0]}")
    ordered = [records[u.index] for u in units]
    used = [r for r in ordered if r["samples"] > 0]
    if not used:
        raise DataError(f"--input: no documents found in {settings['inputs'][0][0] if settings['inputs'] else ''}"
                        + (" (every document was held out for validation)" if any(r["val_samples"]
                                                                                     for r in ordered) else ""))
    formats = {}
    for name in sorted(settings["formats"]):
        formats[name] = {"dir": FORMAT_DIRS[name], "shards": [s for r in used for s in r["formats"][name]]}
    if "mds" in formats:
        from streaming.base.util import merge_index

        with _quiet_logging():
            merge_index([str(folder / "mds" / f"u-{r['unit']:06d}" / "index.json") for r in used],
                        str(folder / "mds"))
    val_pieces = [folder / VAL_DIR / f"u-{r['unit']:06d}.npz" for r in ordered if r["val_samples"]]
    validation = write_validation(folder, val_pieces, sum(r["val_tokens"] for r in ordered))
    wants_validation = settings["val_fraction"] > 0 or any(u.role == "val" for u in units)
    if wants_validation and validation is None and not settings.get("val_optional"):
        raise DataError("the validation split is empty: raise --val-fraction or give a larger --val-input")
    info.tokenizer.save(str(folder / TOKENIZER))
    manifest = {
        "format_version": FORMAT_VERSION,
        "seq_len": settings["seq_len"],
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": info.vocab_size,
        "tokenizer": TOKENIZER,
        "tokenizer_sha256": vocabulary_sha256(info.tokenizer),
        "mask_token_id": info.mask_id,
        "eot_token_id": info.eot_id,
        "pad_token_id": info.pad_id if info.pad_id is not None else info.eot_id,
        "token_dtype": np.dtype(token_dtype(vocab_size)).name,
        "num_samples": sum(r["samples"] for r in ordered),
        "num_tokens": sum(r["tokens"] for r in ordered),
        "num_documents": sum(r["documents"] for r in ordered),
        "fields": settings["fields"],
        "inputs": [{k: r[k] for k in ("file", "role", "samples", "tokens", "documents", "val_samples")}
                   | ({"skipped": r["skipped"]} if r.get("skipped") else {}) for r in ordered],
        "formats": formats,
    }
    if validation is not None:
        manifest["validation"] = validation
    write_json_atomic(folder / MANIFEST, manifest)
    for leftover in (folder / UNITS_DIR, folder / VAL_DIR, folder / SETTINGS):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        elif leftover.exists():
            leftover.unlink()
    return manifest


@contextlib.contextmanager
def _quiet_logging():
    """merge_index logs a warning about its temporary folder on every call."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


# -- the commands ---------------------------------------------------------------------------------
def prepare_dataset(options: PrepareOptions) -> dict:
    """Prepare ``options.input`` into ``options.output`` (or one part of it, or only its tokenizer)."""
    options.check()
    if options.tokenizer_only:
        return prepare_tokenizer(options)
    units = input_units(options)
    if options.split:
        return prepare_part(options, units)
    output = Path(options.output)
    try:  # only an earlier prepared dataset may be replaced, and only with --overwrite
        check_replaceable(output, PROG, options.overwrite, own_kind="dataset")
    except UsageError as err:
        raise DataError(f"--output: {err}") from None
    staging = output.parent / f".{output.name}.partial"
    with _exclusive(output.parent / f".{output.name}.lock", str(output)):
        resumable = _same_inputs(staging, _settings(options, units, None) | {"val_optional": options.val_optional})
        info = _tokenizer(options, units, staging if resumable else None)
        vocab_size = _vocab_size(options, info)
        settings = _settings(options, units, info) | {"val_optional": options.val_optional}
        done = _open_staging(staging, settings)
        info.tokenizer.save(str(staging / TOKENIZER))  # a trained one is reused when resuming
        try:
            _prepare_units(options, units, staging, info, vocab_size, done)
        except DataError as err:
            if not read_unit_records(staging):
                shutil.rmtree(staging, ignore_errors=True)
                raise
            raise DataError(f"{err} (the input files prepared so far are kept in {staging}: the same command "
                            "resumes there)") from None
        manifest = assemble(staging, settings, info, vocab_size, units)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    return manifest


def part_name(part: int, num_parts: int) -> str:
    return f"part-{part:05d}-of-{num_parts:05d}"


def check_split_output(output: Path) -> None:
    """Parts are written into ``output``: it must be missing, empty or this tool's (not a finished dataset)."""
    kind = describe(output)
    if kind == "dataset":
        raise DataError(f"--output: {output} is already a prepared (merged) dataset; choose another directory")
    if kind not in ("missing", "empty", f"output of {PROG}"):
        try:
            check_replaceable(output, PROG, False)
        except UsageError as err:
            raise DataError(f"--output: {err}") from None


def prepare_tokenizer(options: PrepareOptions) -> dict:
    """``--tokenizer-only``: OUTPUT/tokenizer.json, for the parts to share."""
    output = Path(options.output)
    check_split_output(output)
    units = input_units(options)
    info = _tokenizer(options, units, None)
    output.mkdir(parents=True, exist_ok=True)
    write_marker(output, PROG)
    info.tokenizer.save(str(output / TOKENIZER))
    return {"tokenizer": str(output / TOKENIZER), "vocab_size": info.vocab_size, "eot_token_id": info.eot_id,
            "mask_token_id": info.mask_id}


def prepare_part(options: PrepareOptions, units: list[Unit]) -> dict:
    """Part ``options.part`` of ``options.num_parts`` into ``OUTPUT/parts/``; a finished part is not redone."""
    output = Path(options.output)
    check_split_output(output)
    output.mkdir(parents=True, exist_ok=True)
    if not (output / ".memdlm-output.json").exists():
        write_marker(output, PROG)
    name = part_name(options.part, options.num_parts)
    final, staging = output / "parts" / name, output / "parts" / f".{name}.partial"
    info = load_tokenizer(options.tokenizer, options.eot_token, options.mask_token, options.add_mask_token)
    vocab_size = _vocab_size(options, info)
    settings = _settings(options, units, info) | {"num_parts": options.num_parts}
    mine = [u for u in units if u.index % options.num_parts == options.part]
    if (final / PART_RECORD).is_file():
        record = json.loads((final / PART_RECORD).read_text())
        if record["settings"] == settings:
            say(f"{name} is already prepared in {final}: nothing to do")
            return record
        raise DataError(f"{final} was prepared with other settings or inputs; remove it to prepare it again")
    with _exclusive(output / "parts" / f".{name}.lock", f"{name} of {output}"):
        done = _open_staging(staging, settings)
        _prepare_units(options, mine, staging, info, vocab_size, done)
        records = read_unit_records(staging)
        record = {"part": options.part, "num_parts": options.num_parts, "settings": settings,
                  "vocab_size": vocab_size, "units": [u.index for u in mine],
                  "samples": sum(records[u.index]["samples"] for u in mine)}
        info.tokenizer.save(str(staging / TOKENIZER))
        write_json_atomic(staging / PART_RECORD, record)
        staging.rename(final)
    return record


def merge_parts(output: str | Path, progress: bool = True) -> dict:
    """``--merge OUTPUT``: the parts in OUTPUT/parts/ assembled into the dataset OUTPUT."""
    output = Path(output)
    parts_dir = output / "parts"
    if (output / MANIFEST).is_file() and not parts_dir.exists():
        raise DataError(f"--merge: {output} is already a merged dataset")
    parts = sorted(parts_dir.glob("part-*-of-*")) if parts_dir.is_dir() else []
    if not parts:
        raise DataError(f"--merge: {parts_dir} holds no prepared parts; run memdlm-prepare-data --num-parts N "
                        "--part I for every I first")
    records = [json.loads((p / PART_RECORD).read_text()) for p in parts if (p / PART_RECORD).is_file()]
    num_parts = records[0]["num_parts"] if records else int(parts[0].name.rsplit("-", 1)[1])
    have = {r["part"] for r in records}
    missing = [i for i in range(num_parts) if i not in have]
    if missing:
        unfinished = sorted(p.name for p in parts_dir.glob(".part-*.partial"))
        raise DataError(f"--merge: {len(missing)} of {num_parts} parts are not prepared yet (parts "
                        f"{_ranges(missing)}" + (f"; unfinished: {', '.join(unfinished)}" if unfinished else "")
                        + "); run them (a finished part is skipped), then merge")
    settings = records[0]["settings"]
    for record in records[1:]:
        if record["settings"] != settings or record["num_parts"] != num_parts:
            differing = sorted(k for k in settings if settings[k] != record["settings"].get(k))
            raise DataError(f"--merge: part {record['part']} was prepared with other settings than part "
                            f"{records[0]['part']} (they differ in {', '.join(differing) or 'num_parts'}); "
                            "prepare every part with the same command")
    with _exclusive(output / ".merge.lock", f"the merge of {output}"):
        # The special tokens as the parts chose them (--eot-token, --mask-token), not searched for again.
        info = TokenizerInfo(read_tokenizer(parts[0] / TOKENIZER), parts[0] / TOKENIZER, settings["eot_token_id"],
                             settings["mask_token_id"], settings["pad_token_id"])
        for part in parts:  # move every unit's pieces into place (a rerun finds those already moved)
            for source in [*(part / f for f in FORMAT_DIRS), part / VAL_DIR, part / UNITS_DIR]:
                if not source.is_dir():
                    continue
                target = output / source.name
                target.mkdir(parents=True, exist_ok=True)
                for piece in sorted(source.iterdir()):
                    if (target / piece.name).exists():
                        shutil.rmtree(target / piece.name) if (target / piece.name).is_dir() \
                            else (target / piece.name).unlink()
                    piece.rename(target / piece.name)
        units = [Unit(i, Path(f), role) for i, (f, _, role) in enumerate(settings["inputs"])]
        manifest = assemble(output, settings, info, records[0]["vocab_size"], units)
        shutil.rmtree(parts_dir)
    return manifest


def _ranges(numbers: list[int]) -> str:
    text, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            text.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(text)

