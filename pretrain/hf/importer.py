"""Starting from a Hugging Face checkpoint of the Llama architecture.

- ``memdlm-import-hf HF_DIR OUT_DIR`` (``import_hf``) converts a Llama/Mistral checkpoint into the
  export format (``pretrain.hf.format``): if its tokenizer has no mask token, ``<|mask|>`` is added and
  the embedding and the head grow by one row each, initialised to the mean of the existing rows (and
  the vocabulary is padded to a multiple of 64 so tensor parallelism can split it; those extra rows are
  initialised the same way and never produced by the tokenizer). Tied embeddings are untied (the head
  starts as a copy of the embedding). Everything else is copied unchanged, so exporting a model
  started from the result gives the same tensors back.
- ``--model.init_from DIR`` (``resolve_init_from`` + ``load_hf_weights``) takes the model's shape and
  RoPE settings from ``DIR/config.json``, its tokenizer for the data, and its weights: every rank reads
  only its tensor-parallel slice of each tensor (one layer's q/k/v at a time), at any layout.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from common.errors import UsageError
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import MASK_TOKEN, add_mask_token, describe, find_mask_token
from parallel.checkpoint.sharded_state import partition_dim
from pretrain.config import ConfigError, ModelConfig, RunConfig
from pretrain.hf.files import (
    DEFAULT_SHARD_BYTES,
    StagedDirectory,
    TensorGroup,
    write_json,
    write_remote_code,
    write_safetensors,
    write_tokenizer,
)
from pretrain.hf.format import hf_config, hf_names, merge_qkv, model_fields_from_hf, padded_vocab


class HuggingFaceTensors:
    """The tensors of a Hugging Face directory's safetensors file(s), read one (or one slice) at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(str(self.folder / "model.safetensors"), "pt") as handle:
                self.files = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise UsageError(f"{self.folder} holds no model.safetensors (or index); convert .bin weights to "
                             "safetensors first")
        self._handles = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), "pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def nbytes(self, name: str, rows: int | None = None) -> int:
        """Bytes of the tensor (with ``rows`` rows instead of its own, if given)."""
        view = self._handle(name).get_slice(name)
        shape = list(view.get_shape())
        if rows is not None:
            shape[0] = rows
        width = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}.get(view.get_dtype(), 4)
        return width * int(torch.tensor(shape).prod())

    def get_part(self, name: str, dim: int | None, parts: int, index: int) -> torch.Tensor:
        """Part ``index`` of ``parts`` equal parts along ``dim`` (the whole tensor when ``dim`` is None)."""
        if dim is None or parts == 1:
            return self.get(name)
        view = self._handle(name).get_slice(name)
        size = view.get_shape()[dim] // parts
        bounds = slice(index * size, (index + 1) * size)
        return view[bounds] if dim == 0 else view[:, bounds]


def read_hf_config(folder: Path, option: str = "--model.init_from") -> dict:
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{option}: {folder} has no config.json; pass a Hugging Face model directory")
    try:
        config = json.loads(file.read_text())
    except ValueError as err:
        raise ConfigError(f"{option}: {file} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        hint = (" (it is a checkpoint of this trainer: export it with memdlm-export-hf first, or resume the run with "
                "its --train.out_dir)" if isinstance(config, dict) and "model" in config and "memory" in config
                else "")
        raise ConfigError(f"{option}: {file} has no model_type: it is not a Hugging Face model config{hint}")
    return config


def _head_name(config: dict, tensors: HuggingFaceTensors) -> str:
    """The head's tensor, or the embedding's for a model with tied embeddings."""
    if "lm_head.weight" in tensors:
        return "lm_head.weight"
    if config.get("tie_word_embeddings", False):
        return "model.embed_tokens.weight"
    raise UsageError("the checkpoint has no lm_head.weight and does not tie its embeddings")


# -- memdlm-import-hf ------------------------------------------------------------------------------
def import_hf(hf_dir: Path, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
              progress: Callable[[str], None] = print) -> Path:
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = read_hf_config(hf_dir, "memdlm-import-hf")
    fields = model_fields_from_hf(config, str(hf_dir))
    tokenizer_file = hf_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UsageError(f"{hf_dir} has no tokenizer.json (a fast tokenizer is needed for the data pipeline)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    mask_id = find_mask_token(tokenizer)
    added = mask_id is None
    if added:  # as memdlm-prepare-data --add-mask-token does: the same token at the same id
        mask_id = add_mask_token(tokenizer, MASK_TOKEN)
    info = describe(tokenizer, tokenizer_file)  # also needs an end-of-document token
    old_vocab = fields["vocab_size"]
    vocab = padded_vocab(mask_id + 1) if mask_id >= old_vocab else old_vocab
    tensors = HuggingFaceTensors(hf_dir)
    head = _head_name(config, tensors)

    def grown(name: str, target: str) -> TensorGroup:
        """An embedding-shaped tensor with rows added up to ``vocab`` (the mean of its rows)."""
        def produce():
            value = tensors.get(name)
            if vocab > value.shape[0]:
                extra = value.float().mean(dim=0, keepdim=True).to(value.dtype).expand(vocab - value.shape[0], -1)
                value = torch.cat([value, extra])
            return [(target, value)]

        return TensorGroup(tensors.nbytes(name, vocab), produce)

    def copied(name: str) -> TensorGroup:
        return TensorGroup(tensors.nbytes(name), lambda: [(name, tensors.get(name))])

    layers = sorted((n for n in tensors.files if n.startswith("model.layers.")),
                    key=lambda n: (int(n.split(".")[2]), n))
    # Tied embeddings: the head starts as a copy of the (grown) embedding.
    groups = [grown("model.embed_tokens.weight", "model.embed_tokens.weight"), *(copied(n) for n in layers),
              copied("model.norm.weight"), grown(head, "lm_head.weight")]
    model = ModelConfig(**fields | {"vocab_size": vocab, "mask_token_id": mask_id,
                                    "seq_len": int(config.get("max_position_embeddings", 2048))})
    tokens = {"mask_token_id": mask_id, "eot_token_id": info.eot_id, "pad_token_id": info.pad_id}
    dtype = str(config.get("torch_dtype", "float32"))
    with StagedDirectory(out_dir, "memdlm-import-hf", overwrite) as folder:
        write_safetensors(folder, groups, max_shard_bytes, progress)
        write_json(folder, "config.json", hf_config(model, tokens, {}, dtype) | {"imported_from": str(hf_dir)})
        write_tokenizer(folder, tokenizer, mask_id, info.eot_id, info.pad_id, model.seq_len)
        write_remote_code(folder)
    progress(f"imported {hf_dir} into {out_dir}: {fields['num_layers']} layers, hidden {fields['hidden_size']}, "
             f"vocabulary {old_vocab} -> {vocab}"
             + (f" (added {MASK_TOKEN} as token {mask_id})" if added else f" (mask token {mask_id})"))
    return out_dir


# -- --model.init_from ------------------------------------------------------------------------------
def resolve_init_from(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the model's shape, RoPE, mask token and the data's tokenizer taken from ``init_from``."""
    folder = cfg.model.init_from
    if not folder:
        return cfg
    config = read_hf_config(Path(folder))
    fields = model_fields_from_hf(config, folder)
    try:
        from data_pipeline.tokenizer import load_tokenizer

        info = load_tokenizer(folder)
    except DataError as err:
        raise ConfigError(f"--model.init_from: {err}; `memdlm-import-hf {folder} OUT` adds a mask token (and "
                          "grows the embedding for it); then pass --model.init_from OUT") from None
    if info.mask_id >= fields["vocab_size"]:
        raise ConfigError(f"--model.init_from: {folder}'s mask token {info.mask_id} lies outside its "
                          f"{fields['vocab_size']}-row embedding; convert it with memdlm-import-hf first")
    model = dataclasses.replace(cfg.model, **fields, mask_token_id=info.mask_id)
    data = dataclasses.replace(cfg.data, tokenizer=cfg.data.tokenizer or str(folder))
    return dataclasses.replace(cfg, model=model, data=data)


def check_data_tokenizer(folder: Path, sources) -> None:
    """Refuse training data tokenized otherwise than the model of ``--model.init_from`` (by vocabulary)."""
    from data_pipeline.tokenizer import read_tokenizer, vocabulary_sha256

    model_sha = vocabulary_sha256(read_tokenizer(folder))
    for source in sources:
        if source.tokenizer_sha256 != model_sha:
            raise UsageError(
                f"--model.init_from: the data in {source.root} was tokenized with another vocabulary than "
                f"{folder}'s tokenizer ({source.root}/{source.manifest['tokenizer']} vs {folder}/tokenizer.json); "
                f"prepare the data with --tokenizer {folder}")


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, folder: Path, cfg: ModelConfig, tensor_parallel_size: int = 1,
                    tensor_parallel_rank: int = 0) -> None:
    """This rank's part of every weight of ``model`` from a Hugging Face directory."""
    config = read_hf_config(Path(folder))
    tensors = HuggingFaceTensors(Path(folder))
    head = _head_name(config, tensors)
    for name, param in model.named_parameters():
        sources = [head if n == "lm_head.weight" else n for n in hf_names(name)]
        dim = partition_dim(param)
        if len(sources) == 3:  # q, k, v: merged in our layout, then split like the fused projection
            value = merge_qkv(*(tensors.get(s) for s in sources), cfg)
            value = value.chunk(tensor_parallel_size, dim=0)[tensor_parallel_rank]
        else:
            value = tensors.get_part(sources[0], dim, tensor_parallel_size, tensor_parallel_rank)
        if tuple(value.shape) != tuple(param.shape):
            raise UsageError(f"--model.init_from: {sources[0]} has shape {tuple(value.shape)} on this rank, the "
                             f"model expects {tuple(param.shape)} for {name}")
        param.copy_(value.to(param.dtype))
