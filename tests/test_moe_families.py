"""LLaDA-MoE and LLaDA2 in and out: tiny checkpoints written by the families' published modeling code
(``tests/fixtures/moe_families``, with the logits that code gave) load into our model with the same logits,
train-free checkpoints export back in the family with identical tensors and the config fields its code reads,
and what the published code cannot express is refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

from launch.config_cli import build_config
from pretrain.hf.configs import HuggingFaceFormatError, export_config, model_fields
from pretrain.hf.exporter import export_checkpoint
from pretrain.hf.importer import import_hf, load_hf_weights, resolve_init_from

FIXTURES = Path(__file__).parent / "fixtures" / "moe_families"
FAMILIES = ["llada_moe", "llada2"]


def _fixture(family):
    folder = FIXTURES / family
    config = json.loads((folder / "config.json").read_text())
    ids = torch.tensor(json.loads((folder / "input_ids.json").read_text())["input_ids"])
    return folder, config, ids, load_file(str(folder / "logits.safetensors"))["logits"]


def _with_tokenizer(family, tmp_path):
    """The fixture with a 64-entry tokenizer (the mask token at 63, as in its inputs; end of text 61)."""
    copy = tmp_path / family
    shutil.copytree(FIXTURES / family, copy)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 61)}, "<|endoftext|>": 61, "<|pad|>": 62, "<|mask|>": 63}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|mask|>", "<|endoftext|>", "<|pad|>"])
    tokenizer.save(str(copy / "tokenizer.json"))
    return copy


@pytest.mark.fast
@pytest.mark.parametrize("family", FAMILIES)
def test_published_logits_and_an_exact_round_trip(family, tmp_path, topology):
    from parallel.checkpoint.checkpointer import Checkpointer
    from pretrain.model.routing import ROUTING_PART
    from pretrain.train.factory import build_training

    folder, config, ids, theirs = _fixture(family)
    fields = model_fields(config, str(folder))
    assert fields["family"] == family
    source = _with_tokenizer(family, tmp_path)
    cfg = resolve_init_from(build_config(["--model.init_from", str(source), "--model.seq_len", "12"]))
    assert cfg.model.mask_token_id == 63 and cfg.model.moe_num_experts == 8
    parts = build_training(cfg, topology, 63)
    model = parts.model
    load_hf_weights(model, source, cfg.model)
    assert float(model.routing.bias.abs().max()) > 0  # the fixture's biases were read
    with torch.no_grad():
        difference = float((model.eval()(ids) - theirs).abs().max())
    assert difference < 1e-4, (family, difference)

    tokens = {"mask_token_id": 63, "eot_token_id": 61, "pad_token_id": 62}
    checkpointer = Checkpointer(tmp_path / "run", topology, {**cfg.to_dict(), "tokens": tokens},
                                source / "tokenizer.json")
    checkpointer.register(ROUTING_PART, model.routing)
    checkpoint = checkpointer.save(1, parts.engine).folder
    exported = export_checkpoint(checkpoint, tmp_path / "exported", progress=lambda m: None)
    original, back = load_file(str(folder / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert original.keys() == back.keys(), original.keys() ^ back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    written = json.loads((exported / "config.json").read_text())
    assert model_fields(written, "export") == {**fields, "seq_len": 12}  # the run's length becomes the positions
    read = ["model_type", "architectures", "auto_map", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "num_experts", "num_experts_per_tok", "rope_theta",
            "partial_rotary_factor", "rms_norm_eps", "tie_word_embeddings"] + (
        ["dense_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size", "moe_layer_freq",
         "moe_router_enable_expert_bias", "qk_layernorm"] if family == "llada_moe" else
        ["head_dim", "intermediate_size", "moe_intermediate_size", "num_shared_experts", "n_group", "topk_group",
         "routed_scaling_factor", "first_k_dense_replace", "use_qk_norm", "use_qkv_bias", "use_bias"])
    assert {k: written[k] for k in read} == {k: config[k] for k in read}


@pytest.mark.fast
def test_what_the_published_code_cannot_express_is_refused(tmp_path):
    from pretrain.config import ModelConfig

    config = json.loads((FIXTURES / "llada_moe" / "config.json").read_text())
    for change, message in (({"moe_layer_freq": [1, 0, 1]}, "moe_layer_freq"), ({"clip_qkv": 8.0}, "clip_qkv"),
                            ({"partial_rotary_factor": -1}, "partial_rotary_factor")):
        with pytest.raises(HuggingFaceFormatError, match=message):
            model_fields({**config, **change}, "x")
    llada2 = json.loads((FIXTURES / "llada2" / "config.json").read_text())
    with pytest.raises(HuggingFaceFormatError, match="use_bias"):
        model_fields({**llada2, "use_bias": True}, "x")
    fields = model_fields(llada2, "x")
    cfg = ModelConfig(**fields)
    with pytest.raises(HuggingFaceFormatError, match="mixture of experts; choose --format llada_moe or llada2"):
        export_config(cfg, "qwen3", {}, {})
    with pytest.raises(HuggingFaceFormatError, match="routing other than softmax"):
        export_config(cfg, "llada_moe", {}, {})
    with pytest.raises(HuggingFaceFormatError, match="holds mixtures of experts only"):
        export_config(ModelConfig(), "llada2", {}, {})
    with pytest.raises(HuggingFaceFormatError, match="--model.init_from"):
        import_hf(FIXTURES / "llada2", tmp_path / "out", progress=lambda m: None)
