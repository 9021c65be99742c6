"""Mixture-of-experts layers: the router and the experts against plain references written here, the whole model's
logits against transformers' own Qwen3-MoE and Qwen2-MoE (tiny random models, bidirectional attention), and
training with fast weights on the shared expert at TP2, PP2, DP2 with ZeRO 1 and 3 and SP2 against one process
(slow tier)."""

import pytest
import torch
import torch.nn.functional as F

from launch.config_cli import build_config
from tests.helpers.layouts import assert_same_training, run_layouts


def _reference_route(logits, top_k, score, num_groups=1, topk_groups=1, normalize=False, scaling=1.0):
    """Token by token, in float64: the families' routing as their published code states it."""
    weights, chosen = [], []
    for row in logits.double():
        scores = row.softmax(0) if score == "softmax" else row.sigmoid()
        eligible = scores.clone()
        groups = num_groups
        if groups > 1:
            size = len(row) // groups
            group_scores = torch.stack([scores[g * size:(g + 1) * size].sort(descending=True).values[:2].sum()
                                        for g in range(groups)])
            kept = set(group_scores.sort(descending=True).indices[:topk_groups].tolist())
            for g in range(groups):
                if g not in kept:
                    eligible[g * size:(g + 1) * size] = float("-inf")
        index = eligible.sort(descending=True, stable=True).indices[:top_k]
        w = scores[index]
        if normalize:
            w = w / w.sum()
        weights.append(w * scaling)
        chosen.append(index)
    return torch.stack(weights), torch.stack(chosen)


@pytest.mark.fast
@pytest.mark.parametrize("options", [
    dict(top_k=2, score="softmax"),
    dict(top_k=2, score="softmax", normalize=True),
    dict(top_k=3, score="sigmoid", num_groups=4, topk_groups=2, normalize=True, scaling=2.5),
    dict(top_k=2, score="sigmoid", num_groups=2, topk_groups=1),
    dict(top_k=1, score="sigmoid"),
])
def test_routing_is_the_published_routers(options):
    from pretrain.model.moe import route

    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights, chosen, _ = route(logits, **options)
    ref_weights, ref_chosen = _reference_route(logits, **options)
    assert torch.equal(chosen.sort(dim=1).values, ref_chosen.sort(dim=1).values)
    order, ref_order = chosen.argsort(dim=1), ref_chosen.argsort(dim=1)
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), rtol=1e-12, atol=0)


MOE = {"model.vocab_size": 128, "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 4,
       "model.num_kv_heads": 2, "model.ffn_hidden_size": 48, "model.seq_len": 32, "model.moe_num_experts": 4,
       "model.moe_top_k": 2, "model.moe_ffn_hidden_size": 24}


def _options(values):
    return [item for key, value in values.items() for item in (f"--{key}", str(value).lower()
                                                               if isinstance(value, bool) else str(value))]


@pytest.mark.fast
def test_an_moe_layer_is_the_sum_of_its_chosen_experts(topology):
    """One MoE MLP (shared expert gated) against a per-token loop over the chosen experts, float64."""
    from pretrain.train.factory import build_model

    cfg = build_config(_options({**MOE, "model.moe_shared_ffn_hidden_size": 40, "model.moe_shared_expert_gate": True,
                                 "model.moe_score": "sigmoid", "model.moe_routed_scaling": 1.5}))
    model = build_model(cfg, topology).double()
    moe = model.layer(1).mlp
    x = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = moe(x)
    from pretrain.model.moe import route

    expected = torch.zeros_like(x)
    for b in range(2):
        for t in range(5):
            token = x[b, t]
            weights, chosen, _ = route((moe.router.weight @ token)[None], 2, "sigmoid", scaling=1.5)
            for w, e in zip(weights[0], chosen[0]):
                experts = moe.experts
                inner = F.silu(experts.gate[e] @ token) * (experts.up[e] @ token)
                expected[b, t] += w * (experts.down[e] @ inner)
            shared = moe.shared_expert
            inner = F.silu(shared.gate.weight @ token) * (shared.up.weight @ token)
            expected[b, t] += torch.sigmoid(moe.shared_expert_gate.weight @ token)[0] * (shared.down.weight @ inner)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


def _hf_moe(family):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    if family == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=16, mlp_only_layers=[0], norm_topk_prob=True))
        ours = {**MOE, "model.head_dim": 16, "model.qk_norm": True, "model.moe_first_dense_layers": 1,
                "model.moe_norm_topk": True, "memory.target_modules": "qkv,out"}
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**common, shared_expert_intermediate_size=40))
        ours = {**MOE, "model.qkv_bias": True, "model.moe_shared_ffn_hidden_size": 40,
                "model.moe_shared_expert_gate": True}
    with torch.no_grad():  # norms random too, so every tensor is checked
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
    return model.eval(), ours


def _copy_into(ours, theirs, cfg):
    """Their weights into our model, by hand (the importer does not read MoE folders yet)."""
    from pretrain.hf.names import merge_qkv

    hf = dict(theirs.named_parameters())
    with torch.no_grad():
        ours.embedding.weight.copy_(hf["model.embed_tokens.weight"])
        ours.lm_head.weight.copy_(hf["lm_head.weight"])
        ours.final_norm.weight.copy_(hf["model.norm.weight"])
        for i in range(2):
            p, layer = f"model.layers.{i}.", ours.layer(i)
            attention = layer.attention
            q, k, v = (hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
            attention.qkv.weight.copy_(merge_qkv(q, k, v, cfg))
            if attention.qkv.bias is not None:
                attention.qkv.bias.copy_(merge_qkv(*(hf[p + f"self_attn.{n}_proj.bias"] for n in "qkv"), cfg))
            attention.out.weight.copy_(hf[p + "self_attn.o_proj.weight"])
            if attention.q_norm is not None:
                attention.q_norm.weight.copy_(hf[p + "self_attn.q_norm.weight"])
                attention.k_norm.weight.copy_(hf[p + "self_attn.k_norm.weight"])
            layer.attention_norm.weight.copy_(hf[p + "input_layernorm.weight"])
            layer.mlp_norm.weight.copy_(hf[p + "post_attention_layernorm.weight"])
            mlp = layer.mlp
            if p + "mlp.gate.weight" not in hf:
                for n in ("gate", "up", "down"):
                    getattr(mlp, n).weight.copy_(hf[p + f"mlp.{n}_proj.weight"])
                continue
            mlp.router.weight.copy_(hf[p + "mlp.gate.weight"])
            for n in ("gate", "up", "down"):
                getattr(mlp.experts, n).copy_(torch.stack([hf[p + f"mlp.experts.{e}.{n}_proj.weight"]
                                                           for e in range(4)]))
                if mlp.shared_expert is not None:
                    getattr(mlp.shared_expert, n).weight.copy_(hf[p + f"mlp.shared_expert.{n}_proj.weight"])
            if mlp.shared_expert_gate is not None:
                mlp.shared_expert_gate.weight.copy_(hf[p + "mlp.shared_expert_gate.weight"])


@pytest.mark.fast
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_logits_equal_transformers_moe_models(family, topology):
    from pretrain.train.factory import build_model

    theirs_model, options = _hf_moe(family)
    cfg = build_config(_options(options))
    ours = build_model(cfg, topology).eval()
    _copy_into(ours, theirs_model, cfg.model)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids, attention_mask=torch.zeros(2, 1, 32, 32)).logits
        difference = float((ours(ids) - theirs).abs().max())
    assert difference < 1e-5, (family, difference)


TRAIN = {"model.moe_num_experts": 4, "model.moe_top_k": 2, "model.moe_ffn_hidden_size": 64,
         "model.moe_shared_ffn_hidden_size": 64, "model.moe_score": "sigmoid", "model.moe_num_groups": 2,
         "model.moe_topk_groups": 1, "model.moe_routed_scaling": 2.0}


@pytest.mark.slow
def test_moe_training_with_fast_weights_on_the_shared_expert_at_every_layout(prepared_corpus, tmp_path):
    data = prepared_corpus()
    extra = _options(TRAIN)
    reference = run_layouts(["single"], tmp_path / "single", data, extra)["single"]
    results = run_layouts(["tp2", "pp2", "dp2-zero1", "dp2-zero3", "sp2"], tmp_path / "two", data, extra)
    for name, result in results.items():
        try:
            assert_same_training(result, reference)
        except AssertionError as err:
            raise AssertionError(f"layout {name}: {err}") from err


def test_moe_options_that_cannot_work_are_refused():
    from pretrain.config import ConfigError

    cases = [({"model.moe_top_k": 5}, "moe_top_k"), ({"model.moe_num_groups": 3}, "moe_num_groups"),
             ({"model.moe_num_groups": 2, "model.moe_topk_groups": 3}, "moe_topk_groups")]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_config(_options({**MOE, **change}))
    with pytest.raises(ConfigError, match="shared expert"):  # fast weights on MLP modules need somewhere to sit
        build_config(_options(MOE))
    with pytest.raises(ConfigError, match="--train.compile"):  # the routed experts' sizes change every step
        build_config(_options({**MOE, "memory.enabled": False}) + ["--train.compile", "true"])
    from parallel.layout import LayoutError
    from pretrain.train.factory import check_run_layout

    with pytest.raises(LayoutError, match="does not divide --model.moe_ffn_hidden_size 25"):
        check_run_layout(build_config(_options({**MOE, "memory.enabled": False, "model.moe_ffn_hidden_size": 25})
                                      + ["--parallel.tensor_parallel_size", "2"]), 2)


@pytest.mark.fast
def test_an_expert_width_left_at_0_is_the_dense_width(topology):
    from pretrain.model.transformer import count_parameters, full_parameter_count
    from pretrain.train.factory import build_model

    options = {key: value for key, value in MOE.items() if key != "model.moe_ffn_hidden_size"}
    cfg = build_config(_options({**options, "memory.target_modules": "qkv,out"}))
    model = build_model(cfg, topology)
    assert model.layer(1).mlp.experts.gate.shape == (4, 48, 32)
    assert count_parameters(model) == full_parameter_count(cfg.model)


def test_exporting_a_mixture_of_experts_is_refused_in_one_line():
    from pretrain.config import ModelConfig
    from pretrain.hf.configs import HuggingFaceFormatError, export_config

    cfg = ModelConfig(**{key.split(".", 1)[1]: value for key, value in MOE.items()})
    with pytest.raises(HuggingFaceFormatError, match="mixture-of-experts model, which no export format holds"):
        export_config(cfg, "memdlm", {}, {}, "float32")
