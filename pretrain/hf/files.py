"""Writing a Hugging Face model directory: safetensors shards (with an index above one shard), the
tokenizer files, the remote-code files; all into a staging directory renamed into place at the end."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from common.output_folders import check_replaceable, write_marker
from pretrain.hf.configs import REMOTE_CODE_FILES

DEFAULT_SHARD_BYTES = 5 * 2**30


@dataclass
class TensorGroup:
    """Tensors that are produced together (one of ours may become several of Llama's)."""

    nbytes: int
    produce: Callable[[], list[tuple[str, torch.Tensor]]]


def write_safetensors(folder: Path, groups: list[TensorGroup], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      progress: Callable[[str], None] = lambda message: None) -> dict:
    """Write ``groups`` in order, at most ``max_shard_bytes`` a file (a larger group gets a file of its own);
    only one shard's tensors are in memory at a time. Returns the index (``weight_map``, total size)."""
    shards, current, size = [], [], 0
    for group in groups:
        if current and size + group.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(group)
        size += group.nbytes
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for group in shard:
            for tensor_name, tensor in group.produce():
                tensors[tensor_name] = tensor.contiguous()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for tensor_name, tensor in tensors.items():
            weight_map[tensor_name] = name
            total += tensor.numel() * tensor.element_size()
        progress(f"wrote {name} ({len(tensors)} tensors)")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index


def write_tokenizer(folder: Path, tokenizer: Tokenizer, mask_id: int, eot_id: int | None, pad_id: int | None,
                    max_length: int) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` that ``AutoTokenizer`` reads (a fast tokenizer)."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "mask_token": tokenizer.id_to_token(mask_id)}
    if eot_id is not None:
        config["eos_token"] = tokenizer.id_to_token(eot_id)
    if pad_id is not None:
        config["pad_token"] = tokenizer.id_to_token(pad_id)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {key: config[key] for key in ("mask_token", "eos_token", "pad_token") if key in config}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def write_remote_code(folder: Path) -> None:
    source = Path(__file__).parent / "remote"
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(source / name, folder / name)


def write_json(folder: Path, name: str, value: dict) -> None:
    (folder / name).write_text(json.dumps(value, indent=2) + "\n")


class StagedDirectory:
    """``with StagedDirectory(out, tool) as folder:`` writes into ``out.staging`` and renames it to ``out`` at the
    end, marked as ``tool``'s output; a failure leaves ``out`` untouched. An existing ``out`` is replaced only
    if it is ``tool``'s own earlier output and ``overwrite`` is set (``common.output_folders``)."""

    def __init__(self, out_dir: Path, tool: str, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.staging = self.out_dir.with_name(self.out_dir.name + ".staging")
        self.tool = tool
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        check_replaceable(self.out_dir, self.tool, self.overwrite)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        write_marker(self.staging, self.tool)
        shutil.rmtree(self.out_dir, ignore_errors=True)
        self.staging.rename(self.out_dir)
