"""Read the history rows of an offline wandb run (the ``.wandb`` file) for tests.

The file is a LevelDB-style log (wandb's "datastore" format): a 7-byte header (":W&B",
magic 0xBEE1, version), then 32 KiB blocks of records, each with a 7-byte header (crc32c,
length, type: 1 full, 2 first, 3 middle, 4 last) around a protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a wandb run file")
    out, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:  # block trailer padding
            offset += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER])
        payload = data[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 2):
            pending = payload
        else:
            pending += payload
        if kind in (1, 4):
            out.append(pending)
    return out


def history_rows(run_file: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
