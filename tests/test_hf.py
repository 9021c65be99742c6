"""Hugging Face export and import with real ``transformers`` models, in float32."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForMaskedLM, LlamaConfig, LlamaForCausalLM

from launch.config_cli import build_config
from parallel.checkpoint.checkpointer import Checkpointer
from parallel.checkpoint.reading import read_weights
from pretrain.hf.configs import HuggingFaceFormatError, model_fields
from pretrain.hf.exporter import export_checkpoint
from pretrain.hf.importer import import_hf, load_hf_weights, resolve_init_from
from tests.helpers.ranks import run_ranks

GQA = ["--model.vocab_size", "512", "--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "4",
       "--model.num_kv_heads", "2", "--model.ffn_hidden_size", "96", "--model.seq_len", "32",
       "--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--data.num_workers", "0",
       "--logging.wandb", "false", "--logging.progress_bar", "false", "--memory.layer_fraction", "0.5"]


def all_files_tensors(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def our_logits(cfg, weights, ids, attention_mask=None):
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_model

    model = build_model(cfg, initialize_topology("cpu"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
        return model(ids, attention_mask=attention_mask)


def full_mask(batch, length, attention_mask=None):
    mask = torch.zeros(batch, 1, length, length)
    if attention_mask is not None:
        mask = mask.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(torch.float32).min)
    return mask


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_corpus):
    """Two steps of a grouped-query-attention model; its checkpoint and config."""
    from pretrain.train.trainer import train

    root = tmp_path_factory.mktemp("hf")
    cfg = build_config([*GQA, "--train.steps", "2", "--train.out_dir", str(root / "run"), "--data.path",
                        str(prepared_corpus())])
    summary = train(cfg)
    record = json.loads((summary.checkpoint / "config.json").read_text())
    mask = str(record["model"]["mask_token_id"])
    return summary.checkpoint, build_config([*GQA, "--model.mask_token_id", mask]), root


def test_export_loads_in_transformers_and_gives_our_logits(trained, topology):
    checkpoint, cfg, root = trained
    out = export_checkpoint(checkpoint, root / "export", max_shard_bytes=200_000, progress=lambda m: None)
    assert (out / "model.safetensors.index.json").is_file(), "sharded above the size limit, with an index"
    config = json.loads((out / "config.json").read_text())
    assert config["mask_token_id"] == cfg.model.mask_token_id and config["bidirectional_attention"]
    assert config["num_key_value_heads"] == 2 and config["memdlm_memory"]["lora_rank"] == 32

    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(2, 32, dtype=torch.long)
    padding[1, 20:] = 0
    ours = our_logits(cfg, read_weights(checkpoint), ids, padding)
    hf = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=padding).logits
        llama = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        causal_class_bidirectional = llama(input_ids=ids, attention_mask=full_mask(2, 32, padding)).logits
    real = padding.bool()
    assert float((theirs - ours)[real].abs().max()) < 1e-4
    assert float((causal_class_bidirectional - ours)[real].abs().max()) < 1e-4
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.mask_token_id == cfg.model.mask_token_id


def test_export_import_export_gives_identical_tensors(trained, topology, tmp_path):
    checkpoint, cfg, root = trained
    first = export_checkpoint(checkpoint, tmp_path / "first", progress=lambda m: None)
    imported = import_hf(first, tmp_path / "imported", progress=lambda m: None)
    resolved = resolve_init_from(build_config([*GQA, "--model.init_from", str(imported)]))
    assert resolved.model.mask_token_id == cfg.model.mask_token_id and resolved.model.num_kv_heads == 2
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_training

    topo = initialize_topology("cpu")
    parts = build_training(resolved, topo, resolved.model.mask_token_id)
    load_hf_weights(parts.model, imported, resolved.model)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text((checkpoint / "tokenizer.json").read_text())
    record = json.loads((checkpoint / "config.json").read_text())
    saved = Checkpointer(tmp_path / "run", topo, record, tokenizer).save(1, parts.engine).folder
    second = export_checkpoint(saved, tmp_path / "second", progress=lambda m: None)
    a, b = all_files_tensors(first), all_files_tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tiny_llama(folder, tie=False):
    """A random ``LlamaForCausalLM`` saved with a 128-token tokenizer that has no mask token."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 128)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return model


@pytest.mark.fast
@pytest.mark.parametrize("tie", [False, True])
def test_a_transformers_llama_imports_and_our_model_gives_its_logits(tmp_path, topology, tie):
    llama = tiny_llama(tmp_path / "llama", tie)
    out = import_hf(tmp_path / "llama", tmp_path / "imported", progress=lambda m: None)
    config = json.loads((out / "config.json").read_text())
    assert config["mask_token_id"] == 128 and config["vocab_size"] == 192, "mask row added, padded to 64"
    cfg = resolve_init_from(build_config(["--model.init_from", str(out), "--model.seq_len", "32"]))
    assert (cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.vocab_size) == (4, 2, 192)
    assert cfg.data.tokenizer == str(out)
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_model

    model = build_model(cfg, initialize_topology("cpu"))
    load_hf_weights(model, out, cfg.model)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)[..., :128]
        theirs = llama(input_ids=ids, attention_mask=full_mask(2, 32)).logits
    assert float((ours - theirs).abs().max()) < 1e-4
    grown = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    torch.testing.assert_close(grown[128], llama.model.embed_tokens.weight.mean(0), rtol=0, atol=1e-6)


@pytest.mark.fast
def test_importing_never_runs_code_from_the_model_folder(tmp_path, topology):
    """A model folder whose config asks for remote code, with a module and a pickled weight file that would
    create a file if imported or unpickled: ``memdlm-import-hf`` and ``--model.init_from`` read the
    safetensors, the config and the tokenizer as data only."""
    folder = tmp_path / "llama"
    tiny_llama(folder)
    marker = tmp_path / "ran"
    planted = f"open({str(marker)!r}, 'w').close()\n"
    (folder / "modeling_planted.py").write_text(planted)
    (folder / "configuration_planted.py").write_text(planted)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_planted.Config", "AutoModel": "modeling_planted.Model"}
    (folder / "config.json").write_text(json.dumps(config))

    class Planted:
        def __reduce__(self):
            return exec, (planted,)

    torch.save({"model.embed_tokens.weight": Planted()}, folder / "pytorch_model.bin")
    out = import_hf(folder, tmp_path / "imported", progress=lambda m: None)
    cfg = resolve_init_from(build_config(["--model.init_from", str(out), "--model.seq_len", "32"]))
    from parallel.topology import initialize_topology
    from pretrain.train.factory import build_model

    load_hf_weights(build_model(cfg, initialize_topology("cpu")), out, cfg.model)
    assert not marker.exists()
    assert not (out / "modeling_planted.py").exists() and not (out / "pytorch_model.bin").exists()


@pytest.mark.fast
def test_unsupported_architectures_are_refused_with_the_reason():
    base = {"num_attention_heads": 4, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 48,
            "vocab_size": 64}
    with pytest.raises(HuggingFaceFormatError, match="sliding-window attention"):
        model_fields({**base, "model_type": "mistral", "sliding_window": 4096}, "x")
    with pytest.raises(HuggingFaceFormatError, match="rope scaling"):
        model_fields({**base, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "x")
    with pytest.raises(HuggingFaceFormatError, match="'gpt2' model.*supported: dream, llada, llada2_moe, llama, mem"):
        model_fields({**base, "model_type": "gpt2"}, "x")
    with pytest.raises(HuggingFaceFormatError, match="output projection"):
        model_fields({**base, "model_type": "llama", "attention_bias": True}, "x")
    assert model_fields({**base, "model_type": "mistral", "sliding_window": None}, "x")["num_heads"] == 4
    assert model_fields({**base, "model_type": "qwen2"}, "x")["qkv_bias"]


def _init_from_run(rank, world, args):
    from pretrain.train.trainer import train

    return train(build_config(args)).losses


@pytest.mark.slow
def test_init_from_trains_the_same_at_tensor_parallel_two(tmp_path):
    tiny_llama(tmp_path / "llama")
    out = import_hf(tmp_path / "llama", tmp_path / "imported", progress=lambda m: None)
    args = ["--model.init_from", str(out), "--model.seq_len", "16", "--train.steps", "2", "--train.global_batch_size",
            "4", "--train.micro_batch_size", "4", "--data.num_workers", "0", "--logging.wandb", "false",
            "--logging.progress_bar", "false", "--memory.layer_fraction", "0.5", "--optim.eps", "1e-6",
            "--data.cache_dir", str(tmp_path / "cache")]
    single = _init_from_run(0, 1, [*args, "--train.out_dir", str(tmp_path / "one")])
    split = run_ranks(_init_from_run, 2, [*args, "--parallel.tensor_parallel_size", "2", "--train.out_dir",
                                          str(tmp_path / "tp2")])
    for losses in split:
        for ours, theirs in zip(losses, single):
            assert abs(ours - theirs) / theirs < 1e-5, (losses, single)
