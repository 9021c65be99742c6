"""Mixture-of-experts layers: the router and the experts against plain references written here, the whole model's
logits against transformers' own Qwen3-MoE and Qwen2-MoE (tiny random models, bidirectional attention), and
training with fast weights on the shared expert at TP2, PP2, DP2 with ZeRO 1 and 3 and SP2 against one process
(slow tier)."""

import pytest
import torch
import torch.nn.functional as F

from launch.config_cli import build_config
from tests.helpers.layouts import assert_same_training, run_layouts


def _reference_route(logits, top_k, score, num_groups=1, topk_groups=1, normalize=False, scaling=1.0, bias=None,
                     bias_in_weights=False):
    """Token by token, in float64: the families' routing as their published code states it (a bias chooses,
    and weighs only as LLaDA-MoE's code has it)."""
    weights, chosen = [], []
    for row in logits.double():
        scores = row.softmax(0) if score == "softmax" else row.sigmoid()
        eligible = scores.clone() if bias is None else scores + bias
        groups = num_groups
        if groups > 1:
            size = len(row) // groups
            group_scores = torch.stack([eligible[g * size:(g + 1) * size].sort(descending=True).values[:2].sum()
                                        for g in range(groups)])
            kept = set(group_scores.sort(descending=True).indices[:topk_groups].tolist())
            for g in range(groups):
                if g not in kept:
                    eligible[g * size:(g + 1) * size] = float("-inf")
        index = eligible.sort(descending=True, stable=True).indices[:top_k]
        w = (scores + bias)[index] if bias_in_weights else scores[index]
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
    dict(top_k=2, score="sigmoid", num_groups=4, topk_groups=2, normalize=True, scaling=2.5, bias=True),
    dict(top_k=2, score="softmax", bias=True),
    dict(top_k=2, score="softmax", bias=True, bias_in_weights=True),
])
def test_routing_is_the_published_routers(options):
    from pretrain.model.moe import route

    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if options.get("bias"):  # large enough to change choices
        options = {**options, "bias": torch.randn(8, generator=torch.Generator().manual_seed(2)).double() * 0.3}
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
         "model.moe_topk_groups": 1, "model.moe_routed_scaling": 2.0, "model.moe_expert_bias": True,
         "model.moe_bias_update_rate": 0.01}


def _routing_of(out_dir):
    """A run's expert biases at step 3 and its per-step ``moe`` records."""
    import json

    from tests.helpers import read_metrics

    state = json.loads((out_dir / "checkpoints" / "step_000003" / "train_state.json").read_text())
    records = read_metrics(out_dir)
    return (state["parts"]["routing"]["expert_bias"], [record["moe"] for record in records],
            [record["inner_losses"] for record in records])


def _assert_same_routing(ours, theirs):
    """Expert biases, router statistics (and inner losses) of a layout equal one process's."""
    assert any(value != 0 for row in theirs[0] for value in row), "the biases must have moved"
    assert ours[0] == theirs[0]  # the biases move by +-rate on integer token counts: identical or wrong
    assert len(ours[2]) == len(theirs[2]) == 3 and all(len(step) == 1 for step in theirs[2])
    for mine, reference in zip(ours[2], theirs[2]):
        assert mine == pytest.approx(reference, rel=1e-5), (ours[2], theirs[2])
    for mine, reference in zip(ours[1], theirs[1]):
        assert mine.keys() == reference.keys()
        for key, value in reference.items():
            if key == "aux_loss":
                assert mine[key] == pytest.approx(value, rel=1e-5)
                continue
            for stat, number in value.items():
                assert mine[key][stat] == pytest.approx(number, rel=1e-5, abs=1e-9), (key, stat)


@pytest.mark.slow
def test_moe_training_with_fast_weights_on_the_shared_expert_at_every_layout(prepared_corpus, tmp_path):
    """Losses, final weights, expert biases and router statistics equal one process's; the balancing loss
    everywhere but with pipeline stages (refused there), expert-bias balancing everywhere."""
    data = prepared_corpus()
    for layouts, extra in ((["tp2", "dp2-zero1", "dp2-zero3", "sp2"], {"model.moe_aux_loss_coeff": 0.01}),
                           (["pp2"], {})):
        root = tmp_path / layouts[0]
        reference = run_layouts(["single"], root, data, _options({**TRAIN, **extra}))["single"]
        results = run_layouts(layouts, root, data, _options({**TRAIN, **extra}))
        for name, result in results.items():
            try:
                assert_same_training(result, reference)
                _assert_same_routing(_routing_of(root / name), _routing_of(root / "single"))
            except AssertionError as err:
                raise AssertionError(f"layout {name}: {err}") from err


@pytest.mark.slow
@pytest.mark.parametrize("layouts,targets", [
    (["dp2-ep2-zero0", "dp2-ep2-zero1", "dp2-ep2-zero2"], "routed,shared"),
    (["dp4-ep2-zero1", "dp4-ep4-zero2", "tp2-dp2-ep2-zero1", "pp2-dp2-ep2"], "routed,shared"),
    (["sp2-ep2"], "shared"),
], ids=["two-ranks", "four-ranks", "sequence-parallel"])
def test_expert_parallel_training_equals_one_process(layouts, targets, prepared_corpus, tmp_path):
    """Experts split over 2 or 4 ranks (tokens dispatched by all-to-all, each routed expert's fast weights on its
    rank for the sequences of the whole expert group), with ZeRO 0-2, tensor, pipeline and sequence parallelism
    (the balancing loss only without pipeline stages, which refuse it): losses,
    final weights (gathered by the checkpoint), expert biases and router statistics equal one process's. 8
    experts, top 2 of 2 groups, fast weights on every routed expert and the shared expert (only the shared one
    with sequence parallelism), the balancing loss on."""
    data = prepared_corpus()
    extra = {**TRAIN, "model.moe_num_experts": 8, "model.moe_aux_loss_coeff": 0.01, "memory.moe_targets": targets}
    reference = run_layouts(["single"], tmp_path, data, _options(extra))["single"]
    results = run_layouts([name for name in layouts if "pp2" not in name], tmp_path, data, _options(extra))
    pipelined = [name for name in layouts if "pp2" in name]
    if pipelined:
        without = {**extra, "model.moe_aux_loss_coeff": 0.0}
        results.update(run_layouts(pipelined, tmp_path, data, _options(without)))
        reference_without = run_layouts(["single"], tmp_path / "without", data, _options(without))["single"]
    for name, result in results.items():
        single = tmp_path / ("without" if "pp2" in name else "") / "single"
        try:
            assert_same_training(result, reference_without if "pp2" in name else reference)
            _assert_same_routing(_routing_of(tmp_path / name), _routing_of(single))
            experts = int(name.split("ep")[1][0])
            assert _expert_pieces(tmp_path / name) == experts  # each rank wrote its own experts
        except AssertionError as err:
            raise AssertionError(f"layout {name}: {err}") from err


def _expert_pieces(out_dir) -> int:
    """How many distinct pieces along the expert dimension a checkpoint holds of one routed-expert tensor."""
    from parallel.checkpoint.safe_reader import SafeFileSystemReader

    metadata = SafeFileSystemReader(str(out_dir / "checkpoints" / "step_000003")).read_metadata()
    chunks = metadata.state_dict_metadata["model.layers.3.mlp.experts.gate"].chunks
    return len({chunk.offsets[0] for chunk in chunks})


def test_moe_options_that_cannot_work_are_refused():
    from pretrain.config import ConfigError

    cases = [({"model.moe_top_k": 5}, "moe_top_k"), ({"model.moe_num_groups": 3}, "moe_num_groups"),
             ({"model.moe_num_groups": 2, "model.moe_topk_groups": 3}, "moe_topk_groups")]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_config(_options({**MOE, **change}))
    with pytest.raises(ConfigError, match="without one"):  # fast weights on a shared expert need one
        build_config(_options({**MOE, "memory.moe_targets": "shared"}))
    for change, message in (({"memory.adapter": "full"}, "low-rank only"), ({"memory.inner_dropout": 0.1},
                                                                               "dropout on routed experts")):
        with pytest.raises(ConfigError, match=message):  # what routed experts' fast weights cannot do (yet)
            build_config(_options({**MOE, **change}))
    with pytest.raises(ConfigError, match="both expert and sequence parallelism"):
        build_config(_options(MOE) + ["--parallel.expert_parallel_size", "2", "--parallel.sequence_parallel_size",
                                      "2"])
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


def test_exporting_a_mixture_of_experts_to_a_dense_format_is_refused_in_one_line():
    from pretrain.config import ModelConfig
    from pretrain.hf.configs import HuggingFaceFormatError, export_config

    cfg = ModelConfig(**{key.split(".", 1)[1]: value for key, value in MOE.items()})
    with pytest.raises(HuggingFaceFormatError, match="it is a mixture of experts; choose --format llada_moe or llada2"):
        export_config(cfg, "memdlm", {}, {}, "float32")


def _balancing_reference(scores, chosen, valid, num_sequences, coeff, top_k, sigmoid):
    """The sequence-wise balancing loss written out sequence by sequence (``scores [b, l, E]``)."""
    total = 0.0
    for s in range(scores.shape[0]):
        tokens = [t for t in range(scores.shape[1]) if valid[s, t]]
        experts = scores.shape[2]
        counts = [sum(int(e in chosen[s, t].tolist()) for t in tokens) for e in range(experts)]
        probs = [scores[s, t] / scores[s, t].sum() if sigmoid else scores[s, t] for t in tokens]
        mean_prob = torch.stack(probs).mean(dim=0)
        total = total + experts / top_k * sum(counts[e] / len(tokens) * mean_prob[e] for e in range(experts))
    return coeff * total / num_sequences


@pytest.mark.fast
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_the_balancing_loss_and_the_expert_biases_are_the_plain_formulas(score, topology):
    """The loss (value and gradient to the router, padding left out) against a loop over sequences, float64; the
    biases choose experts without weighing them, and move by the update rate against the load."""
    from pretrain.model.moe import route
    from pretrain.train.factory import build_model

    cfg = build_config(_options({**MOE, "memory.target_modules": "qkv,out", "model.moe_score": score,
                                 "model.moe_aux_loss_coeff": 0.1, "model.moe_expert_bias": True,
                                 "model.moe_bias_update_rate": 0.01}))
    model = build_model(cfg, topology).double()
    moe, routing = model.layer(1).mlp, model.routing
    routing.bias[1] = torch.tensor([0.3, -0.2, 0.0, 0.1])
    x = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False  # padding: neither counted nor scored
    routing.begin_pass(valid, torch.tensor(5.0, dtype=torch.float64))
    moe(x)
    loss = routing.end_pass()
    (grad,) = torch.autograd.grad(loss, moe.router.weight)

    weight = moe.router.weight.detach().requires_grad_()
    logits = (x @ weight.t()).reshape(12, 4)
    _, chosen, scores = route(logits, 2, score, bias=routing.bias[1].double())
    unbiased = route(logits.detach(), 2, score)[1]
    assert not torch.equal(chosen.sort(1).values, unbiased.sort(1).values), "the bias must change some choice"
    expected = _balancing_reference(scores.view(2, 6, 4), chosen.view(2, 6, 2), valid, 5.0, 0.1, 2,
                                    score == "sigmoid")
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)

    counts = torch.zeros(4, dtype=torch.float64)
    counts.index_add_(0, chosen[valid.reshape(-1)].reshape(-1), torch.ones(20, dtype=torch.float64))
    assert torch.equal(routing.counts[1], counts) and int(routing.counts[0].sum()) == 0  # layer 0 did not run
    before = routing.bias.clone()
    table = routing.finish_step([], applied=True)
    assert torch.equal(routing.bias[1], before[1] + (0.01 * torch.sign(counts.mean() - counts)).float())
    assert torch.equal(routing.bias[0], before[0])  # equal (zero) loads: no move
    torch.testing.assert_close(table[1, :2], torch.stack([counts.min(), counts.max()]) / counts.mean())
    assert float(table[-1, 0]) == pytest.approx(float(expected), rel=1e-12)
    assert int(routing.counts.sum()) == 0  # reset for the next step
    with torch.no_grad():  # evaluation is not recorded
        routing.begin_pass(None, torch.tensor(1.0))
        moe(x)
        assert routing.end_pass() is None and int(routing.counts.sum()) == 0


def test_balancing_in_training_is_logged_kept_in_checkpoints_and_resumes_exactly(tiny, tmp_path):
    """Expert biases and the balancing loss in a real run: every step's ``moe`` record, the biases in the
    checkpoint, and a run stopped after step 2 and resumed equal to one that never stopped."""
    import json

    from parallel.checkpoint.reading import read_weights
    from pretrain.train.trainer import train
    from tests.helpers import read_metrics

    moe = {"model.moe_num_experts": 4, "model.moe_top_k": 2, "model.moe_shared_ffn_hidden_size": 32,
           "model.moe_score": "sigmoid", "model.moe_expert_bias": True, "model.moe_bias_update_rate": 0.01,
           "model.moe_aux_loss_coeff": 0.01, "model.moe_first_dense_layers": 1, "train.steps": 3,
           "checkpoint.every": 1, "optim.warmup_steps": 1}

    def run(name, steps, **changes):
        out = tmp_path / name
        return train(build_config(tiny({**moe, "train.steps": steps, **changes}) + ["--train.out_dir", str(out)])), out

    _, whole = run("whole", 3)
    _, stopped = run("resumed", 2)
    _, without = run("without", 1, **{"model.moe_aux_loss_coeff": 0.0})
    router = "layers.1.mlp.router.weight"  # the balancing loss trains the router
    assert not torch.equal(read_weights(without / "checkpoints" / "step_000001")[router],
                           read_weights(stopped / "checkpoints" / "step_000001")[router])
    _, resumed = run("resumed", 3)
    records = read_metrics(whole)
    assert len(records) == 3
    for record in records:
        load = record["moe"]["layer_1"]
        assert load["load_min"] <= 1.0 <= load["load_max"] and 0 < load["load_entropy"] <= 1
        assert record["moe"]["aux_loss"] > 0
    assert records[0]["moe"]["layer_1"]["bias_abs_mean"] == pytest.approx(0.01, rel=1e-6)  # every load unequal
    saved = json.loads((whole / "checkpoints" / "step_000003" / "train_state.json").read_text())
    bias = torch.tensor(saved["parts"]["routing"]["expert_bias"])
    assert bias.shape == (1, 4) and float(bias.abs().max()) > 0
    assert json.loads((resumed / "checkpoints" / "step_000003" / "train_state.json").read_text())["parts"][
        "routing"] == saved["parts"]["routing"]
    assert read_metrics(resumed)[-1]["loss"] == pytest.approx(records[-1]["loss"], rel=1e-6)
    ours, theirs = read_weights(resumed / "checkpoints" / "step_000003"), read_weights(whole / "checkpoints" /
                                                                                        "step_000003")
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-8)


LLADA2_SHAPED = {**TRAIN, "model.moe_num_experts": 8, "model.moe_ffn_hidden_size": 32,
                 "model.moe_shared_ffn_hidden_size": 32, "model.moe_norm_topk": True, "model.moe_routed_scaling": 2.5,
                 "model.moe_first_dense_layers": 1, "model.head_dim": 32, "model.qk_norm": True,
                 "model.rope_fraction": 0.5}
RESUMES = {  # name: (layout of steps 1-3, layout of steps 4-6)
    "ep2 x dp2 -> ep1": ("dp4-ep2-zero1", "single"),
    "ep2 -> ep4": ("dp2-ep2-zero1", "dp4-ep4-zero2"),
    "ep1 -> ep2": ("single", "dp2-ep2-zero2"),
}


def _train_runs(rank, world, runs):
    """``(key, args, stop after)`` in turn on these ranks: each run's losses by key."""
    from parallel.megatron import parallel_state
    from pretrain.train.trainer import train

    losses = {}
    for key, args, stop in runs:
        calls = iter(range(1, 100))
        summary = train(build_config(args), (lambda: next(calls) >= stop) if stop else (lambda: False))
        losses[key] = summary.losses
        parallel_state.destroy_model_parallel()
    return losses


@pytest.mark.slow
def test_a_llada2_shaped_model_resumes_exactly_at_other_expert_parallel_sizes(prepared_corpus, tmp_path):
    """A LLaDA2-shaped MoE (sigmoid routing in 2 groups, renormalised and scaled by 2.5, expert biases, a shared
    expert carrying the fast weights, a dense first layer, query/key norms, half-rotary heads of their own size)
    trains 3 of 6 steps with MemDLM at one expert-parallel size and resumes at another: the six losses, the
    final weights and the expert biases equal six uninterrupted steps of one process."""
    from parallel.checkpoint.reading import read_weights
    from tests.helpers.layouts import LAYOUT_OPTIONS, LAYOUTS, relative
    from tests.helpers.ranks import run_ranks

    data, extra = str(prepared_corpus()), _options({**LLADA2_SHAPED, "train.steps": 6})

    def args(layout, folder):
        return [*LAYOUT_OPTIONS, *LAYOUTS[layout][1], *extra, "--train.out_dir", str(folder), "--data.path", data]

    def runs(phase, world):
        return [(f"{name}/{phase}", args(pair[phase], tmp_path / name.replace(" ", "")), 3 if phase == 0 else 0)
                for name, pair in RESUMES.items() if LAYOUTS[pair[phase]][0] == world]

    losses = _train_runs(0, 1, [("reference", args("single", tmp_path / "reference"), 0)] + runs(0, 1))
    losses.update(run_ranks(_train_runs, 4, runs(0, 4))[0])
    losses.update(run_ranks(_train_runs, 2, runs(0, 2) + runs(1, 2))[0])
    losses.update(run_ranks(_train_runs, 4, runs(1, 4))[0])
    losses.update(_train_runs(0, 1, runs(1, 1)))
    reference = read_weights(tmp_path / "reference" / "checkpoints" / "step_000006")
    bias = _routing_of_step(tmp_path / "reference", 6)
    assert any(value != 0 for row in bias for value in row)
    for name in RESUMES:
        folder = tmp_path / name.replace(" ", "")
        both = losses[f"{name}/0"] + losses[f"{name}/1"]
        assert len(both) == 6, (name, both)
        for ours, theirs in zip(both, losses["reference"]):
            assert abs(ours - theirs) / abs(theirs) < 1e-5, (name, both, losses["reference"])
        weights = read_weights(folder / "checkpoints" / "step_000006")
        assert set(weights) == set(reference)
        for key in reference:
            assert relative(weights[key], reference[key]) < 1e-5, (name, key)
        assert _routing_of_step(folder, 6) == bias, name


def _routing_of_step(out_dir, step):
    import json

    state = json.loads((out_dir / "checkpoints" / f"step_{step:06d}" / "train_state.json").read_text())
    return state["parts"]["routing"]["expert_bias"]


@pytest.mark.fast
@pytest.mark.parametrize("groups", [(4, 2), (1, 1)])
def test_an_moe_layer_equals_transformers_deepseek_v3_moe(groups, topology):
    """DeepSeek-V3-style routing (sigmoid scores, the correction bias choosing, groups scored by their two best,
    renormalised and scaled) and its shared experts: our MoE layer against transformers' ``DeepseekV3MoE``, weights
    copied across (biases non-negative: DeepSeek-V3's code fills masked groups with 0, ours with -inf, which
    choose alike unless a biased score is negative)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from pretrain.train.factory import build_model

    num_groups, topk_groups = groups
    config = DeepseekV3Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3,
                              n_group=num_groups, topk_group=topk_groups, n_shared_experts=2, norm_topk_prob=True,
                              routed_scaling_factor=2.5)
    torch.manual_seed(0)
    theirs = DeepseekV3MoE(config).eval()  # fp32: its code mixes fp32 routing weights into the hidden dtype
    with torch.no_grad():
        theirs.gate.weight.normal_(0, 0.3)
        theirs.gate.e_score_correction_bias.uniform_(0, 0.2)
    cfg = build_config(_options({**MOE, "model.moe_num_experts": 8, "model.moe_top_k": 3, "model.moe_score":
                                 "sigmoid", "model.moe_num_groups": num_groups, "model.moe_topk_groups": topk_groups,
                                 "model.moe_norm_topk": True, "model.moe_routed_scaling": 2.5,
                                 "model.moe_shared_ffn_hidden_size": 48}))
    model = build_model(cfg, topology)
    ours = model.layer(1).mlp
    with torch.no_grad():
        ours.router.weight.copy_(theirs.gate.weight)
        model.routing.bias[1] = theirs.gate.e_score_correction_bias.float()
        for name in ("gate", "up", "down"):
            getattr(ours.experts, name).copy_(torch.stack([getattr(e, f"{name}_proj").weight for e in theirs.experts]))
            getattr(ours.shared_expert, name).weight.copy_(getattr(theirs.shared_experts, f"{name}_proj").weight)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        difference = float((ours(x) - theirs(x)).abs().max())
    assert difference < 1e-5, difference
