"""Model families in and out: tiny random models of transformers' own Llama (Llama-3.1 RoPE scaling), Qwen2 (q/k/v
biases) and Qwen3 (per-head query/key norms, a head size apart from hidden / heads, tied embeddings) are
imported (``memdlm-import-hf`` and ``--model.init_from`` straight from the folder), give their logits (fp32,
bidirectional attention) in our model, export back in their family with identical tensors and load in
transformers' class with the same logits; our own format carries every option at once; formats that cannot
express a model are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from launch.config_cli import build_config
from parallel.checkpoint.checkpointer import Checkpointer
from pretrain.hf.configs import HuggingFaceFormatError, export_config
from pretrain.hf.exporter import export_checkpoint
from pretrain.hf.importer import import_hf, load_hf_weights, resolve_init_from

VOCAB, MASK = 128, 127
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**COMMON, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True)),
}


def save_tokenizer(folder):
    """128 entries, the last one the mask token (so the vocabulary does not grow and round trips are exact)."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, MASK)}, "<|mask|>": MASK}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|mask|>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))


def tiny(family, folder):
    """A random transformers model of ``family`` (norms and biases random too, so every tensor is checked)."""
    torch.manual_seed(0)
    cls, config = FAMILIES[family]
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder)
    return model


def bidirectional(batch, length):
    return torch.zeros(batch, 1, length, length)


def ours_from(folder, seq_len=32):
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_model

    cfg = resolve_init_from(build_config(["--model.init_from", str(folder), "--model.seq_len", str(seq_len)]))
    model = build_model(cfg, initialize_topology("cpu"))
    load_hf_weights(model, folder, cfg.model)
    return cfg, model.eval()


IDS = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))


def save_checkpoint(cfg, folder, tmp_path, eot=1):
    """A checkpoint of this trainer holding the weights of ``--model.init_from`` (what a run saves)."""
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_training

    topology = initialize_topology("cpu")
    parts = build_training(cfg, topology, cfg.model.mask_token_id)
    load_hf_weights(parts.model, folder, cfg.model)
    tokens = {"mask_token_id": cfg.model.mask_token_id, "eot_token_id": eot, "pad_token_id": None}
    record = {**cfg.to_dict(), "tokens": tokens}
    return Checkpointer(tmp_path / "run", topology, record, folder / "tokenizer.json").save(1, parts.engine).folder


@pytest.mark.fast
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_imports_gives_its_logits_and_exports_back_identically(family, tmp_path, topology):
    theirs_model = tiny(family, tmp_path / "native")
    with torch.no_grad():
        theirs = theirs_model(input_ids=IDS, attention_mask=bidirectional(2, 32)).logits
    imported = import_hf(tmp_path / "native", tmp_path / "imported", progress=lambda m: None)
    for folder in (tmp_path / "native", imported):  # straight from the family's folder, and after the import
        cfg, model = ours_from(folder)
        assert cfg.model.family == family
        with torch.no_grad():
            difference = float((model(IDS) - theirs).abs().max())
        assert difference < 1e-4, (family, folder.name, difference)

    checkpoint = save_checkpoint(cfg, imported, tmp_path)
    exported = export_checkpoint(checkpoint, tmp_path / "exported", progress=lambda m: None)  # its own family
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == family and config["mask_token_id"] == MASK
    original, back = load_file(str(tmp_path / "native" / "model.safetensors")), load_file(
        str(exported / "model.safetensors"))
    assert original.keys() == back.keys(), original.keys() ^ back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    cls = FAMILIES[family][0]
    reloaded = cls.from_pretrained(exported, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((reloaded(input_ids=IDS, attention_mask=bidirectional(2, 32)).logits - theirs).abs().max()) < 1e-4


@pytest.mark.fast
def test_our_format_holds_every_option_at_once(tmp_path, topology):
    """q/k/v biases, query/key norms, a separate head size, llama3 RoPE, tied embeddings and shifted prediction
    in one model: exported as memdlm, transformers (our remote code) gives our logits."""
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_model

    options = ["--model.vocab_size", str(VOCAB), "--model.hidden_size", "32", "--model.num_layers", "2",
               "--model.num_heads", "4", "--model.num_kv_heads", "2", "--model.ffn_hidden_size", "48",
               "--model.seq_len", "32", "--model.head_dim", "16", "--model.qkv_bias", "true", "--model.qk_norm", "true",
               "--model.rope_scaling", "llama3", "--model.rope_original_max_positions", "16",
               "--model.tie_embeddings", "true", "--model.shifted_prediction", "true", "--model.mask_token_id",
               str(MASK)]
    cfg = build_config(options)
    model = build_model(cfg, initialize_topology("cpu"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.1 * torch.randn_like(param))
        ours = model(IDS)
    save_tokenizer(tmp_path)
    from parallel.topology import initialize_topology as topo
    from pretrain.train.factory import build_training

    topology = topo("cpu")
    parts = build_training(cfg, topology, MASK)
    parts.model.load_state_dict(model.state_dict())
    record = {**cfg.to_dict(), "tokens": {"mask_token_id": MASK, "eot_token_id": 1, "pad_token_id": None}}
    checkpoint = Checkpointer(tmp_path / "run", topology, record, tmp_path / "tokenizer.json").save(
        1, parts.engine).folder
    exported = export_checkpoint(checkpoint, tmp_path / "memdlm", progress=lambda m: None)
    hf = AutoModelForMaskedLM.from_pretrained(exported, trust_remote_code=True, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((hf(input_ids=IDS).logits - ours).abs().max()) < 1e-4
    cfg_back, model_back = ours_from(exported)
    assert (cfg_back.model.qkv_bias, cfg_back.model.qk_norm, cfg_back.model.shifted_prediction,
            cfg_back.model.tie_embeddings, cfg_back.model.rope_scaling, cfg_back.model.head_dim) == (
        True, True, True, True, "llama3", 16)
    with torch.no_grad():
        assert torch.equal(model_back(IDS), ours)
    for family, reason in (("llama", "q/k/v biases"), ("qwen2", "query/key norms"), ("llada", "q/k/v biases"),
                           ("qwen3", "shifted prediction")):
        with pytest.raises(HuggingFaceFormatError, match=f"--format {family} cannot express this model.*{reason}"):
            export_checkpoint(checkpoint, tmp_path / family, family=family, progress=lambda m: None)
        assert not (tmp_path / family).exists(), "nothing half-written"


@pytest.mark.fast
def test_dream_needs_shifted_prediction_and_the_import_refuses_bad_folders(tmp_path):
    cfg = build_config(["--model.vocab_size", "64", "--model.hidden_size", "32", "--model.num_heads", "4",
                        "--model.num_layers", "2", "--model.ffn_hidden_size", "48"]).model
    with pytest.raises(HuggingFaceFormatError, match="unshifted prediction"):
        export_config(cfg, "dream", {}, {})
    tiny("llama", tmp_path / "native")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "native" / "model.safetensors.index.json").write_text(json.dumps(index))
    from common.errors import UsageError

    with pytest.raises(UsageError, match="lacks 1 shard"):
        import_hf(tmp_path / "native", tmp_path / "out", progress=lambda m: None)
    (tmp_path / "native" / "model.safetensors.index.json").unlink()
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    (tmp_path / "native" / "config.json").write_text(json.dumps(config | {"vocab_size": 100}))
    with pytest.raises(HuggingFaceFormatError, match="tokenizer has 128 entries but its embedding only 100"):
        import_hf(tmp_path / "native", tmp_path / "out", progress=lambda m: None)
    (tmp_path / "native" / "config.json").unlink()
    with pytest.raises(UsageError, match="has no config.json"):
        import_hf(tmp_path / "native", tmp_path / "out", progress=lambda m: None)
    assert not (tmp_path / "out").exists()


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "families"


def _published(family):
    """A tiny checkpoint of the family's published code and the logits that code gave (tests/fixtures/families)."""
    folder = FIXTURES / family
    expected = load_file(str(folder / "expected.safetensors"))
    return folder, json.loads((folder / "config.json").read_text()), expected["input_ids"], expected["logits"]


def _with_tokenizer(folder, tmp_path, family):
    """A copy of the fixture with a 320-entry tokenizer (mask 300 under the family's name, end of text 301)."""
    import shutil

    copy = tmp_path / family
    shutil.copytree(folder, copy)
    mask = "<|mdm_mask|>" if family == "llada" else "<|mask|>"
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 300)}, mask: 300, "<|endoftext|>": 301,
             **{f"x{i}": i for i in range(302, 320)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([mask, "<|endoftext|>"])
    tokenizer.save(str(copy / "tokenizer.json"))
    return copy


@pytest.mark.fast
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_published_llada_and_dream_logits_and_exact_round_trips(family, tmp_path, topology):
    """Our model on the family's own checkpoint gives the logits its published code gave (Dream's read one
    position to the left, as its sampler reads them); import -> train-free checkpoint -> export in the family
    gives the same tensors and the config fields that family's code reads."""
    from parallel.topology import initialize_topology
    from pretrain.config import ModelConfig
    from pretrain.hf.configs import model_fields
    from pretrain.train.factory import build_model

    folder, config, ids, theirs = _published(family)
    fields = model_fields(config, str(folder))
    assert fields["family"] == family and fields.get("shifted_prediction", False) == (family == "dream")
    cfg = build_config(["--model.seq_len", str(ids.shape[1]), "--model.mask_token_id", "300"])
    cfg = cfg.__class__(**{**cfg.__dict__, "model": ModelConfig(**{**fields, "seq_len": ids.shape[1],
                                                                   "mask_token_id": 300})})
    model = build_model(cfg, initialize_topology("cpu"))
    load_hf_weights(model, folder, cfg.model)
    if family == "dream":
        theirs = torch.cat([theirs[:, :1], theirs[:, :-1]], dim=1)
    with torch.no_grad():
        difference = float((model(ids) - theirs).abs().max())
    assert difference < 1e-4, (family, difference)

    source = _with_tokenizer(folder, tmp_path, family)
    imported = import_hf(source, tmp_path / "imported", progress=lambda m: None)
    resolved = resolve_init_from(build_config(["--model.init_from", str(imported), "--model.seq_len", "24"]))
    assert resolved.model.family == family and resolved.model.mask_token_id == 300
    checkpoint = save_checkpoint(resolved, imported, tmp_path, eot=301)
    exported = export_checkpoint(checkpoint, tmp_path / "exported", progress=lambda m: None)
    original, back = load_file(str(folder / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    written = json.loads((exported / "config.json").read_text())
    keys = ["model_type", "architectures", "auto_map", "vocab_size", "mask_token_id", "rope_theta"] + (
        ["d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "weight_tying", "block_type",
         "activation_type", "include_qkv_bias"] if family == "llada" else
        ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
         "tie_word_embeddings"])
    assert {k: written[k] for k in keys} == {k: config[k] for k in keys}


@pytest.mark.fast
def test_the_commands_say_what_is_wrong_in_one_line_and_exit_2(tmp_path, capsys):
    from launch.hf_cli import export_main, import_main

    tiny("qwen2", tmp_path / "native")
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    (tmp_path / "native" / "config.json").write_text(json.dumps(config | {"model_type": "gpt_neox"}))
    assert import_main([str(tmp_path / "native"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'gpt_neox' model" in err
    assert "supported: dream, llada, llada2_moe, llama" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "native" / "config.json").write_text(json.dumps(config))
    imported = import_hf(tmp_path / "native", tmp_path / "imported", progress=lambda m: None)
    cfg, _ = ours_from(imported)
    checkpoint = save_checkpoint(cfg, imported, tmp_path)
    assert export_main([str(checkpoint), str(tmp_path / "as-llama"), "--format", "llama"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--format llama cannot express this model: q/k/v biases" in err
    assert not (tmp_path / "as-llama").exists()


def test_a_sequence_beyond_the_models_positions_needs_rope_scaling(tmp_path):
    """Qwen2 (64 positions, no RoPE scaling) refuses --model.seq_len 128 with the size that works; Llama-3.1's
    scaled RoPE may run longer than its config's positions."""
    from pretrain.config import ConfigError

    qwen, llama = tmp_path / "qwen2", tmp_path / "llama"
    tiny("qwen2", qwen)
    tiny("llama", llama)
    assert resolve_init_from(build_config(["--model.init_from", str(qwen), "--model.seq_len", "64"]))
    with pytest.raises(ConfigError, match="--model.seq_len 128 exceeds the 64 positions.*--model.seq_len 64 or less"):
        resolve_init_from(build_config(["--model.init_from", str(qwen), "--model.seq_len", "128"]))
    assert resolve_init_from(build_config(["--model.init_from", str(llama), "--model.seq_len", "128"])).model.seq_len \
        == 128
