"""``memdlm-export-hf``: a checkpoint (any layout) -> a Hugging Face model directory.

Streams tensor by tensor from the DCP files (no process group, no model is built): each of our
weights is read at full size, renamed and split into the layout of the chosen ``--format`` (a family of
``pretrain.hf.configs``; by default the family the model was imported from, else ``memdlm``), and written
into safetensors shards of at most ``--max-shard-size`` (with an index when there are several). The directory
also gets ``config.json`` in that family's form (the mask token; for ``memdlm``, bidirectional attention, every
architecture option and the memory settings), ``generation_config.json``, the tokenizer files, and the
modeling files that ``trust_remote_code=True`` loads (ours for ``memdlm``; for ``llada``/``dream`` the family's
published files, copied from ``--code-from``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from common.errors import UsageError
from parallel.checkpoint.checkpointer import read_saved_state
from parallel.checkpoint.manifest import resolve_checkpoint
from parallel.checkpoint.reading import read_tensors
from parallel.checkpoint.safe_reader import SafeFileSystemReader
from pretrain.config import ModelConfig
from pretrain.hf.configs import FAMILIES, PUBLISHED_CODE, export_config, remote_code_note
from pretrain.hf.files import (
    DEFAULT_SHARD_BYTES,
    StagedDirectory,
    TensorGroup,
    write_json,
    write_remote_code,
    write_safetensors,
    write_tokenizer,
)
from pretrain.hf.names import NAMINGS, to_family
from pretrain.model.routing import ROUTING_PART

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
                      family: str | None = None, code_from: Path | None = None,
                      progress: Callable[[str], None] = print) -> Path:
    checkpoint = resolve_checkpoint(checkpoint, verify_hashes=verify)  # a run directory: its newest checkpoint
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    record = json.loads((checkpoint / "config.json").read_text())
    cfg = ModelConfig(**record["model"])
    family = family or cfg.family
    if family not in FAMILIES:
        raise UsageError(f"--format {family}: choose one of {', '.join(FAMILIES)}")
    config = export_config(cfg, family, record.get("tokens", {}), record.get("memory", {}), dtype)  # refuses first
    code_files = _published_code(family, code_from)
    naming = NAMINGS[family]
    tokens = record.get("tokens", {})
    target = DTYPES[dtype]
    metadata = SafeFileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    names = sorted((key[len("model."):] for key in metadata if key.startswith("model.")), key=_order)

    def group(name: str) -> TensorGroup:
        meta = metadata["model." + name]
        nbytes = meta.size.numel() * torch.empty((), dtype=target).element_size()

        def produce():
            ((_, tensor),) = read_tensors(checkpoint, [name])
            parts = _with_zero_biases(name, tensor, cfg, family, naming)
            return [(hf_name, part.to(target)) for hf_name, part in parts]

        return TensorGroup(nbytes, produce)

    groups = [group(n) for n in names] + _expert_bias_groups(checkpoint, cfg, family, naming, target)
    with StagedDirectory(out_dir, "memdlm-export-hf", overwrite) as folder:
        index = write_safetensors(folder, groups, max_shard_bytes, progress)
        write_json(folder, "config.json", config)
        write_json(folder, "generation_config.json", {
            "_from_model_config": False, "mask_token_id": config["mask_token_id"],
            "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]})
        tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        write_tokenizer(folder, tokenizer, config["mask_token_id"], tokens.get("eot_token_id"),
                        tokens.get("pad_token_id"), cfg.seq_len)
        if family == "memdlm":
            write_remote_code(folder)
        for file in code_files:
            shutil.copyfile(file, folder / file.name)
    progress(f"exported {checkpoint} to {out_dir} as {family}: {len(index['weight_map'])} tensors, "
             f"{index['metadata']['total_size'] / 2**20:.1f} MiB ({dtype})")
    if remote_code_note(family) and not code_files:
        progress("note: " + remote_code_note(family))
    return out_dir


def _expert_bias_groups(checkpoint: Path, cfg: ModelConfig, family: str, naming, target) -> list[TensorGroup]:
    """Each MoE layer's expert bias (a checkpoint keeps them in ``train_state.json``, not among the tensors),
    where the family has them: LLaDA2 always, LLaDA-MoE when its code adds them (``moe_bias_in_weights``)."""
    if not naming.expert_bias or (family == "llada_moe" and not cfg.moe_bias_in_weights):
        return []
    state = read_saved_state(checkpoint)
    table = torch.tensor(state.parts.get(ROUTING_PART, {}).get("expert_bias") or [], dtype=torch.float32)
    layers = range(cfg.moe_first_dense_layers, cfg.num_layers)
    if table.numel() == 0:
        table = torch.zeros(len(layers), cfg.moe_num_experts)
    groups = []
    for row, layer in zip(table, layers):
        (name,) = naming.names(f"layers.{layer}.mlp.expert_bias")
        groups.append(TensorGroup(row.numel() * 4, lambda name=name, row=row: [(name, row.clone())]))
    return groups


def _published_code(family: str, code_from: Path | None) -> list[Path]:
    """The family's published modeling files from ``--code-from`` (checked before anything is written)."""
    if code_from is None:
        return []
    if family not in PUBLISHED_CODE or family == "memdlm":
        raise UsageError(f"--code-from: the {family} format needs no modeling files (it is a transformers class or "
                         "ours)")
    wanted = PUBLISHED_CODE[family][2]
    missing = [name for name in wanted if not (Path(code_from) / name).is_file()]
    if missing:
        raise UsageError(f"--code-from {code_from}: no {', '.join(missing)} there; pass the original {family} model's "
                         "folder")
    return [Path(code_from) / name for name in wanted]


def _with_zero_biases(name: str, tensor: torch.Tensor, cfg: ModelConfig, family: str, naming) -> list:
    """The family's tensors for one of ours; Qwen2 and Dream always have q/k/v biases, so a model without them
    gets zero biases there (exact: adding zero)."""
    parts = to_family(name, tensor, cfg, naming)
    if family in ("qwen2", "dream") and not cfg.qkv_bias and name.endswith("attention.qkv.weight"):
        parts += [(n.replace(".weight", ".bias"), torch.zeros(part.shape[0], dtype=part.dtype)) for n, part in parts]
    return parts
