"""Input documents, streamed: plain text, JSON Lines (plain or compressed), Parquet, or a directory or glob of
them.

- ``*.jsonl`` / ``*.json``, also compressed as ``.gz``, ``.zst``, ``.bz2``, ``.xz`` (decompressed as they are
  read): one JSON object per line, with a text field (``text`` unless told otherwise) or prompt and response
  fields (the prompt is context: never masked, no loss);
- ``*.parquet``: the same fields as columns, read one row group at a time (never a whole file in memory);
- anything else: UTF-8 text, one document per run of non-blank lines.

A directory is walked recursively in sorted order (hidden files skipped) and a glob is expanded in sorted
order, so the document order, and with it the packed samples, are the same on every run. A file that cannot
be read is named with the reason (a corrupt Parquet footer, a missing column and the columns there are, a
bad compression frame, invalid UTF-8 at byte N, a line that is not JSON).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from data_pipeline.errors import DataError

JSON_SUFFIXES = {".jsonl", ".json"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bzip2", ".xz": "xz"}
PARQUET_BATCH_ROWS = 1024


@dataclass
class Document:
    text: str  # the response for prompt/response documents
    prompt: str | None = None


@dataclass(frozen=True)
class Fields:
    """Which JSON fields / Parquet columns hold a document."""

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"


def file_kind(file: Path) -> tuple[str, str | None]:
    """(``jsonl``, ``parquet`` or ``text``; its compression or None)."""
    suffixes = [s.lower() for s in file.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if compression and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if inner == ".parquet" and compression is None:
        return "parquet", None
    if inner in JSON_SUFFIXES:
        return "jsonl", compression
    return "text", compression


def input_files(path: str | Path, option: str = "--input") -> list[Path]:
    """The files of a file, a directory (recursively) or a glob pattern, in sorted order."""
    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{option}: the pattern {text} matches no file")
    else:
        root = Path(path)
        if not root.exists():
            raise DataError(f"{option}: {root} does not exist; pass a text/JSONL/Parquet file, a directory or a glob")
        if root.is_file():
            files = [root]
        else:
            files = sorted(
                p for p in root.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            )
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise DataError(f"{option}: {path} holds no non-empty files; pass text, JSONL or Parquet files")
    return files


def _open_binary(raw: IO[bytes], compression: str | None) -> IO[bytes]:
    """The decompressed stream of the file object ``raw`` (whose position then says how far the reading got)."""
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bzip2":
        return bz2.BZ2File(raw, "rb")
    if compression == "xz":
        return lzma.LZMAFile(raw, "rb")
    if compression == "zstd":
        return io.BufferedReader(_ZstdFrames(raw), 1 << 20)
    return raw


class _ZstdFrames(io.RawIOBase):
    """The concatenated zstd frames of ``raw``, decompressed as they are read. A stream that ends inside a
    frame (a truncated file) is an error: zstandard's own stream reader would just stop there."""

    def __init__(self, raw: IO[bytes]):
        import zstandard

        self.raw, self.new = raw, zstandard.ZstdDecompressor().decompressobj
        self.frame, self.in_frame = self.new(), False
        self.pending, self.offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset >= len(self.pending):
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self.pending, self.offset = self._decompress(chunk), 0
        count = min(len(buffer), len(self.pending) - self.offset)
        buffer[:count] = self.pending[self.offset:self.offset + count]
        self.offset += count
        return count

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self.frame.decompress(data))
            self.in_frame = not self.frame.eof
            if self.frame.eof:  # the next frame starts in what is left
                data, self.frame = self.frame.unused_data, self.new()
            else:
                data = b""
        return b"".join(out)


def _lines(file: Path, compression: str | None, position: list[int]) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, decompressed as it is read; ``position[0]`` follows the bytes of
    the file read so far (for the progress bar)."""
    with open(file, "rb") as raw, _open_binary(raw, compression) as stream:
        reader = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(stream, 1 << 20)
        offset = 0
        for number, line in enumerate(reader, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                where = "of the decompressed stream" if compression else "of the file"
                raise DataError(f"{file}: invalid UTF-8 at byte {offset + err.start} {where} ({err.reason})") \
                    from None
            offset += len(line)
            position[0] = raw.tell()
            yield number, text


def _record_document(record, fields: Fields, where: str) -> Document:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with '{fields.text}' or '{fields.prompt}'/"
                        f"'{fields.response}'")
    if fields.text in record:
        return Document(str(record[fields.text]))
    if fields.prompt in record and fields.response in record:
        return Document(str(record[fields.response]), prompt=str(record[fields.prompt]))
    raise DataError(f"{where}: a JSON line needs a '{fields.text}' field or '{fields.prompt}' and "
                    f"'{fields.response}' fields, found {sorted(record)[:8]}; name the field with --text-field")


def _json_documents(file: Path, compression: str | None, fields: Fields, position: list[int]) -> Iterator[Document]:
    for number, line in _lines(file, compression, position):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{file}:{number}: not valid JSON ({err.msg})") from None
        yield _record_document(record, fields, f"{file}:{number}")


TEXT_BLOCK_BYTES = 1 << 20
_BLANK_LINES = re.compile(r"(?:(?<=\n)|^)(?:[^\S\n]*\n)+")  # whole lines of whitespace alone
_BLANK_TAIL = re.compile(r"(?<=\n)[^\S\n]+$")  # a last line of whitespace alone, without its newline


def _text_blocks(file: Path, compression: str | None, position: list[int]) -> Iterator[str]:
    """The UTF-8 text of a file in blocks of about ``TEXT_BLOCK_BYTES``, decompressed as it is read; a block
    never ends inside a character. Invalid UTF-8 is named with its byte offset."""
    with open(file, "rb") as raw, _open_binary(raw, compression) as stream:
        offset, pending = 0, b""
        while True:
            block = stream.read(TEXT_BLOCK_BYTES)
            data = pending + block
            try:
                text, pending = data.decode("utf-8"), b""
            except UnicodeDecodeError as err:
                if block and err.reason == "unexpected end of data" and err.start >= len(data) - 3:
                    text, pending = data[:err.start].decode("utf-8"), data[err.start:]  # a character cut in two
                else:
                    where = "of the decompressed stream" if compression else "of the file"
                    raise DataError(f"{file}: invalid UTF-8 at byte {offset + err.start} {where} ({err.reason})") \
                        from None
            offset += len(data) - len(pending)
            position[0] = raw.tell()
            if text:
                yield text
            if not block:
                return


def _text_documents(file: Path, compression: str | None, position: list[int]) -> Iterator[Document]:
    """One document per run of non-blank lines (a line of whitespace alone separates), each line with its
    newline; split block by block with one regular expression. The paragraph a block leaves open is kept as
    its complete lines (``head``, never scanned again) and its unfinished last line (``tail``, scanned with the
    next block), so a document of any length costs time in proportion to it."""
    head: list[str] = []
    tail = ""
    for block in _text_blocks(file, compression, position):
        parts = _BLANK_LINES.split(tail + block)
        last = parts.pop()  # may continue in the next block
        if parts:
            parts[0] = "".join(head) + parts[0]
            head = []
            for part in parts:
                if part:
                    yield Document(part)
        cut = last.rfind("\n") + 1
        if cut:
            head.append(last[:cut])
        tail = last[cut:]
    rest = _BLANK_TAIL.sub("", "".join(head) + tail)
    if rest.strip():
        yield Document(rest)


def _parquet_documents(file: Path, fields: Fields, position: list[int]) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file}: not a readable Parquet file (corrupt or missing footer?): {err}") from None
    columns = parquet.schema_arrow.names
    if fields.text in columns:
        wanted = [fields.text]
    elif fields.prompt in columns and fields.response in columns:
        wanted = [fields.prompt, fields.response]
    else:
        raise DataError(f"{file} has no column '{fields.text}' (nor '{fields.prompt}' and '{fields.response}'); its "
                        f"columns are {', '.join(columns[:20])}: name the text column with --text-field")
    total_rows, size, rows_read = max(parquet.metadata.num_rows, 1), file.stat().st_size, 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            values = [batch.column(name).to_pylist() for name in wanted]
            rows_read += batch.num_rows
            position[0] = size * rows_read // total_rows
            for row in zip(*values):
                if len(row) == 1:
                    if row[0] is not None:
                        yield Document(str(row[0]))
                elif row[1] is not None:
                    yield Document(str(row[1]), prompt=str(row[0] or ""))
    except pa.ArrowException as err:
        raise DataError(f"{file}: a row group cannot be read ({err})") from None


def file_documents(file: Path, fields: Fields = Fields(), position: list[int] | None = None) -> Iterator[Document]:
    """The documents of one file; a ``DataError`` names the file and what is wrong with it. ``position[0]``
    follows how many bytes of the file were read (about: decompression and Parquet read ahead)."""
    kind, compression = file_kind(file)
    position = position if position is not None else [0]
    try:
        if kind == "parquet":
            yield from _parquet_documents(file, fields, position)
        elif kind == "jsonl":
            yield from _json_documents(file, compression, fields, position)
        else:
            yield from _text_documents(file, compression, position)
    except DataError:
        raise
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as err:  # a damaged compressed stream
        what = f"{compression} stream" if compression else "file"
        raise DataError(f"{file}: the {what} cannot be read ({type(err).__name__}: {err})") from None
    except Exception as err:  # zstandard.ZstdError and other decoder errors
        if type(err).__module__.startswith("zstd"):
            raise DataError(f"{file}: the zstd stream cannot be read ({err})") from None
        raise


class BadFiles:
    """The ``--max-bad-files`` budget: unreadable files skipped, each named, until the budget is spent."""

    def __init__(self, budget: int = 0, report=print):
        self.budget, self.report, self.skipped = budget, report, []

    def skip(self, file: Path, error: DataError) -> None:
        if len(self.skipped) >= self.budget:
            hint = f" (the {self.budget} skipped already: {', '.join(map(str, self.skipped))})" if self.skipped else ""
            raise DataError(f"{error}{hint}; fix or remove the file, or allow skipping with --max-bad-files") \
                from None
        self.skipped.append(file)
        self.report(f"warning: skipping {error} ({len(self.skipped)} of --max-bad-files {self.budget})")


def iter_documents(files: list[Path], fields: Fields = Fields(), bad: BadFiles | None = None) -> Iterator[Document]:
    """Every file's documents in order; an unreadable file stops with its reason, or (``bad``) is skipped after
    the documents read before the damage."""
    for file in files:
        try:
            yield from file_documents(file, fields)
        except DataError as err:
            if bad is None:
                raise
            bad.skip(file, err)


def iter_training_text(files: list[Path], fields: Fields = Fields(), bad: BadFiles | None = None) -> Iterator[str]:
    """All text of the documents (prompts and responses), for training a tokenizer."""
    for document in iter_documents(files, fields, bad):
        if document.prompt:
            yield document.prompt
        yield document.text
