"""``memdlm-export-hf``: a checkpoint (any layout) -> a Hugging Face model directory.

Streams tensor by tensor from the DCP files (no process group, no model is built): each of our
weights is read at full size, renamed and split into Llama's layout (``pretrain.hf.format``), and
written into safetensors shards of at most ``--max-shard-size`` (with an index when there are
several). The directory also gets ``config.json`` (a Llama config with ``model_type: memdlm``,
the mask token, bidirectional attention and the memory settings), ``generation_config.json``, the
tokenizer files, and the modeling files that ``trust_remote_code=True`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from common.errors import UsageError
from parallel.checkpoint.manifest import resolve_checkpoint
from parallel.checkpoint.reading import read_tensors
from parallel.checkpoint.safe_reader import SafeFileSystemReader
from pretrain.config import ModelConfig
from pretrain.hf.files import (
    DEFAULT_SHARD_BYTES,
    StagedDirectory,
    TensorGroup,
    write_json,
    write_remote_code,
    write_safetensors,
    write_tokenizer,
)
from pretrain.hf.format import hf_config, to_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _order(name: str) -> tuple:
    """Embedding, then layers in order, then the final norm and the head."""
    if name.startswith("embedding"):
        return (0, 0, name)
    if name.startswith("layers."):
        return (1, int(name.split(".")[1]), name)
    return (2, 0, name)


def export_checkpoint(checkpoint: Path, out_dir: Path, dtype: str = "float32",
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, verify: bool = True, overwrite: bool = False,
                      progress: Callable[[str], None] = print) -> Path:
    checkpoint = resolve_checkpoint(checkpoint, verify_hashes=verify)  # a run directory: its newest checkpoint
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    record = json.loads((checkpoint / "config.json").read_text())
    cfg = ModelConfig(**record["model"])
    tokens = record.get("tokens", {})
    target = DTYPES[dtype]
    metadata = SafeFileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    names = sorted((key[len("model."):] for key in metadata if key.startswith("model.")), key=_order)

    def group(name: str) -> TensorGroup:
        meta = metadata["model." + name]
        nbytes = meta.size.numel() * torch.empty((), dtype=target).element_size()

        def produce():
            ((_, tensor),) = read_tensors(checkpoint, [name])
            return [(hf_name, part.to(target)) for hf_name, part in to_hf(name, tensor, cfg)]

        return TensorGroup(nbytes, produce)

    with StagedDirectory(out_dir, "memdlm-export-hf", overwrite) as folder:
        index = write_safetensors(folder, [group(n) for n in names], max_shard_bytes, progress)
        config = hf_config(cfg, tokens, record.get("memory", {}), dtype)
        write_json(folder, "config.json", config)
        write_json(folder, "generation_config.json", {
            "_from_model_config": False, "mask_token_id": config["mask_token_id"],
            "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]})
        tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        write_tokenizer(folder, tokenizer, config["mask_token_id"], tokens.get("eot_token_id"),
                        tokens.get("pad_token_id"), cfg.seq_len)
        write_remote_code(folder)
    progress(f"exported {checkpoint} to {out_dir}: {len(index['weight_map'])} tensors, "
             f"{index['metadata']['total_size'] / 2**20:.1f} MiB ({dtype})")
    return out_dir
