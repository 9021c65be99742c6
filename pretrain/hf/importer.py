"""Starting from a Hugging Face checkpoint of a supported family (``pretrain.hf.configs``: Llama/Mistral, Qwen2,
Qwen3, LLaDA, Dream, or our own export). The family is read from ``config.json``; no code of the model folder
is ever run (only its JSON files and safetensors are read).

- ``memdlm-import-hf HF_DIR OUT_DIR`` (``import_hf``) converts it into our export format (Llama-style names,
  ``memdlm`` config recording the source family, so ``memdlm-export-hf`` gives it back in that family's form):
  if its tokenizer has no mask token, ``<|mask|>`` is added and the embedding and the head grow by one row
  each, initialised to the mean of the existing rows (and the vocabulary is padded to a multiple of 64 so
  tensor parallelism can split it; those extra rows are initialised the same way and never produced by the
  tokenizer). Tied embeddings stay tied (``--untie-embeddings``: the head starts as a copy of the embedding,
  as pipeline parallelism needs). Everything else is copied unchanged, so exporting a model started from the
  result gives the same tensors back.
- ``--model.init_from DIR`` (``resolve_init_from`` + ``load_hf_weights``) takes the model's shape and
  architecture options from ``DIR/config.json``, its tokenizer for the data, and its weights (any supported
  family): every rank reads only its tensor-parallel slice of each tensor (one layer's q/k/v at a time).
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
from pretrain.hf.configs import HuggingFaceFormatError, export_config, family_of, model_fields, padded_vocab
from pretrain.hf.files import (
    DEFAULT_SHARD_BYTES,
    StagedDirectory,
    TensorGroup,
    write_json,
    write_remote_code,
    write_safetensors,
    write_tokenizer,
)
from pretrain.hf.names import LLAMA_STYLE, NAMINGS, Naming, from_family


class HuggingFaceTensors:
    """The tensors of a Hugging Face directory's safetensors file(s), read one (or one slice) at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                self.files = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise UsageError(f"{index} is not a safetensors index ({type(err).__name__}: {err})") from None
            missing = sorted({f for f in self.files.values() if not (self.folder / f).is_file()})
            if missing:
                raise UsageError(f"{self.folder} lacks {len(missing)} shard(s) its index names "
                                 f"({', '.join(missing[:3])}); download the whole model folder")
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


def _source_name(ours: str, naming: Naming, tensors: HuggingFaceTensors, num_experts: int = 0) -> list[str]:
    """The checkpoint's tensor(s) for one of ours: the head of a tied checkpoint is its embedding."""
    names = naming.names(ours, num_experts)
    if ours == "lm_head.weight" and names[0] not in tensors:
        return [naming.embedding]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise HuggingFaceFormatError(f"{tensors.folder} lacks {missing[0]} (needed for our {ours}); the checkpoint "
                                     "is incomplete or its config.json does not describe it")
    return names


def _our_names(cfg: ModelConfig) -> list[str]:
    """Every tensor of the whole model, in file order."""
    per_layer = ["attention_norm.weight", "attention.qkv.weight", *(["attention.qkv.bias"] if cfg.qkv_bias else []),
                 *(["attention.q_norm.weight", "attention.k_norm.weight"] if cfg.qk_norm else []),
                 "attention.out.weight", "mlp_norm.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight"]
    layers = [f"layers.{i}.{rest}" for i in range(cfg.num_layers) for rest in per_layer]
    return ["embedding.weight", *layers, "final_norm.weight", *([] if cfg.tie_embeddings else ["lm_head.weight"])]


# -- memdlm-import-hf ------------------------------------------------------------------------------
def import_hf(hf_dir: Path, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
              untie_embeddings: bool = False, progress: Callable[[str], None] = print) -> Path:
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = read_hf_config(hf_dir, "memdlm-import-hf")
    fields = model_fields(config, str(hf_dir))
    if fields.get("moe_num_experts"):
        raise HuggingFaceFormatError(
            f"memdlm-import-hf: {hf_dir} is a mixture of experts ({fields['family']}), which our own format does not "
            f"hold; start from it directly with --model.init_from {hf_dir} (its tokenizer.json needs a mask token)")
    source = ModelConfig(**fields)
    naming = NAMINGS[family_of(config, str(hf_dir))]
    tokenizer_file = hf_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UsageError(f"{hf_dir} has no tokenizer.json (a fast tokenizer is needed for the data pipeline)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    old_vocab = fields["vocab_size"]
    if tokenizer.get_vocab_size() > old_vocab:
        raise HuggingFaceFormatError(
            f"{hf_dir}'s tokenizer has {tokenizer.get_vocab_size()} entries but its embedding only {old_vocab} rows; "
            "the tokenizer does not belong to these weights")
    mask_id = find_mask_token(tokenizer)
    added = mask_id is None
    if added:  # as memdlm-prepare-data --add-mask-token does: the same token at the same id
        mask_id = add_mask_token(tokenizer, MASK_TOKEN)
    info = describe(tokenizer, tokenizer_file)  # also needs an end-of-document token
    vocab = padded_vocab(mask_id + 1) if mask_id >= old_vocab else old_vocab
    tensors = HuggingFaceTensors(hf_dir)
    model = dataclasses.replace(source, vocab_size=vocab, mask_token_id=mask_id,
                                tie_embeddings=source.tie_embeddings and not untie_embeddings)

    def grown(values: list[torch.Tensor]) -> torch.Tensor:
        """An embedding-shaped tensor with rows added up to ``vocab`` (the mean of its rows)."""
        (value,) = values
        if vocab > value.shape[0]:
            extra = value.float().mean(dim=0, keepdim=True).to(value.dtype).expand(vocab - value.shape[0], -1)
            value = torch.cat([value, extra])
        return value

    def group(ours: str) -> TensorGroup:
        sources = _source_name(ours, naming, tensors)
        (target,) = LLAMA_STYLE.names(ours) if len(sources) == 1 else [None]
        if ours in ("embedding.weight", "lm_head.weight"):
            return TensorGroup(tensors.nbytes(sources[0], vocab),
                               lambda: [(target, grown([tensors.get(sources[0])]))])
        if len(sources) == 3:  # q, k, v keep their names and layout in our export format
            targets = LLAMA_STYLE.names(ours)
            return TensorGroup(sum(tensors.nbytes(n) for n in sources),
                               lambda: [(t, tensors.get(n)) for t, n in zip(targets, sources)])
        return TensorGroup(tensors.nbytes(sources[0]), lambda: [(target, tensors.get(sources[0]))])

    groups = [group(name) for name in _our_names(model)]
    tokens = {"mask_token_id": mask_id, "eot_token_id": info.eot_id, "pad_token_id": info.pad_id}
    dtype = str(config.get("torch_dtype", "float32"))
    with StagedDirectory(out_dir, "memdlm-import-hf", overwrite) as folder:
        write_safetensors(folder, groups, max_shard_bytes, progress)
        write_json(folder, "config.json", export_config(model, "memdlm", tokens, {}, dtype)
                   | {"imported_from": str(hf_dir)})
        write_tokenizer(folder, tokenizer, mask_id, info.eot_id, info.pad_id, model.seq_len)
        write_remote_code(folder)
    progress(f"imported {hf_dir} ({model.family}) into {out_dir}: {model.num_layers} layers, hidden "
             f"{model.hidden_size}, vocabulary {old_vocab} -> {vocab}"
             + (f" (added {MASK_TOKEN} as token {mask_id})" if added else f" (mask token {mask_id})")
             + (", embeddings tied" if model.tie_embeddings else ""))
    return out_dir


# -- --model.init_from ------------------------------------------------------------------------------
def resolve_init_from(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the model's shape, RoPE, mask token and the data's tokenizer taken from ``init_from``."""
    folder = cfg.model.init_from
    if not folder:
        return cfg
    config = read_hf_config(Path(folder))
    fields = model_fields(config, folder)
    positions = fields.pop("seq_len")  # the run's sequence length is the user's, within the model's positions
    if cfg.model.seq_len > positions and fields.get("rope_scaling", "none") == "none":
        raise ConfigError(
            f"--model.seq_len {cfg.model.seq_len} exceeds the {positions} positions {folder} was trained for "
            "(max_position_embeddings), and its config has no RoPE scaling: use --model.seq_len "
            f"{positions} or less, or a model whose config.json extends its positions (rope_scaling)")
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
    """This rank's part of every weight of ``model`` from a Hugging Face directory of any supported family."""
    config = read_hf_config(Path(folder))
    model_fields(config, str(folder))  # refuses what cannot be run
    naming = NAMINGS[family_of(config, str(folder))]  # the folder's own names (an import is Llama-named)
    tensors = HuggingFaceTensors(Path(folder))
    for name, param in model.named_parameters():
        sources = _source_name(name, naming, tensors, cfg.moe_num_experts)
        dim = partition_dim(param)
        if len(sources) > 1 or name.endswith(("attention.qkv.weight", "attention.qkv.bias")):
            # q, k, v merged in our layout (or experts stacked), then split like our tensor
            value = from_family(name, [tensors.get(s) for s in sources], cfg)
            if dim is not None:
                value = value.chunk(tensor_parallel_size, dim=dim)[tensor_parallel_rank]
        else:
            value = tensors.get_part(sources[0], dim, tensor_parallel_size, tensor_parallel_rank)
        if tuple(value.shape) != tuple(param.shape):
            raise UsageError(f"--model.init_from: {sources[0]} has shape {tuple(value.shape)} on this rank, the "
                             f"model expects {tuple(param.shape)} for {name}")
        param.copy_(value.to(param.dtype))
    routing = getattr(model, "routing", None)
    if naming.expert_bias and routing is not None:  # every MoE layer's row of the routing table (all stages)
        for layer in range(cfg.moe_first_dense_layers, cfg.num_layers):
            name = naming.names(f"layers.{layer}.mlp.expert_bias")[0]
            if name in tensors:  # LLaDA-MoE keeps one only when its biases are on
                routing.bias[routing.slot(layer)] = tensors.get(name).to(routing.bias.dtype)
