"""Every parallel layout trains the same model as one process (gloo, CPU, memory on).

Three optimizer steps on the same global batches: the losses and the final weights (the
sharded checkpoint's weights, read back at full size) must
match the single-process run to a relative error below 1e-5, for every parameter.

Layouts of one world size run one after another in the same spawned ranks (process groups
stay, megatron's parallel state is rebuilt for each), so process start-up is paid once per
group. All of them are in the slow tier (CI runs it after the default tier): by default,
``tests/test_reshard.py`` trains TP2, PP2, DP2 ZeRO 1 and 3 from scratch and TP2 x DP2 ZeRO 2 from a
checkpoint against the same single-process reference, which covers the same property.
"""

import pytest

from tests.helpers.layouts import assert_same_training, run_layouts


@pytest.fixture(scope="module")
def data(prepared_corpus):
    return prepared_corpus()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    return run_layouts(["single"], tmp_path_factory.mktemp("single"), data)["single"]


def _check_group(names, reference, data, root):
    results = run_layouts(names, root, data)
    for name in names:
        try:
            assert_same_training(results[name], reference)
        except AssertionError as err:
            raise AssertionError(f"layout {name}: {err}") from err


@pytest.mark.slow
def test_two_rank_layouts_train_the_single_process_model(reference, data, tmp_path):
    _check_group(["tp2", "pp2", "dp2-zero1", "dp2-zero3"], reference, data, tmp_path)


@pytest.mark.slow
def test_tp2_dp2_zero2_trains_the_single_process_model(reference, data, tmp_path):
    _check_group(["tp2-dp2-zero2"], reference, data, tmp_path)


@pytest.mark.slow
def test_more_two_rank_layouts_train_the_single_process_model(reference, data, tmp_path):
    _check_group(["dp2-zero0", "dp2-zero2", "pp2-gpipe"], reference, data, tmp_path)


@pytest.mark.slow
def test_sequence_parallel_layouts_train_the_single_process_model(reference, data, tmp_path):
    """SP4, TP2 x SP2, DP2 x SP2 with ZeRO 1 and 3 (SP2 and resharding across SP sizes: tests/test_reshard.py)."""
    _check_group(["sp4", "tp2-sp2", "dp2-sp2-zero1", "dp2-sp2-zero3"], reference, data, tmp_path)


@pytest.mark.slow
def test_sequence_parallel_pads_a_length_it_does_not_divide(prepared_corpus, tmp_path):
    """30 tokens over 4 sequence-parallel ranks: padded to 32, never attended to or scored (with inner dropout,
    whose masks are cut to each rank's positions, and attention within documents)."""
    data = prepared_corpus(seq_len=30)
    extra = ["--model.seq_len", "30", "--memory.inner_dropout", "0.1", "--data.document_attention", "true"]
    reference = run_layouts(["single"], tmp_path / "single", data, extra)["single"]
    assert_same_training(run_layouts(["sp4"], tmp_path / "sp4", data, extra)["sp4"], reference)


@pytest.mark.slow
def test_tp2_pp2_trains_the_single_process_model(reference, data, tmp_path):
    _check_group(["tp2-pp2"], reference, data, tmp_path)


@pytest.mark.slow
def test_tp2_pp2_dp2_on_eight_ranks(reference, data, tmp_path):
    _check_group(["tp2-pp2-dp2"], reference, data, tmp_path)


# Memory variants under the layouts: the trajectory's states come from the loader workers, teachers and inner
# steps from the last pipeline stage, dropout masks from (seed, step, pass, site, sample), the probability draw
# from (seed, step): every layout must still train the single-process model.
VARIANTS = {
    "progressive-distill": ["--memory.masking_strategy", "progressive_memory", "--memory.num_inner_steps", "3",
                            "--memory.inner_loss", "distill", "--memory.inner_loss_mask", "newly_revealed",
                            "--memory.inner_epochs", "2", "--memory.base_weight", "0.5",
                            "--memory.inner_dropout", "0.1", "--memory.probability", "0.7"],
    "leak-free-hidden": ["--memory.masking_strategy", "pre_only", "--memory.num_inner_steps", "1",
                         "--memory.inner_loss", "distill_hidden", "--memory.leak_free", "true",
                         "--memory.pad_unmask", "none", "--memory.reference_compat", "true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_memory_variants_train_the_single_process_model_at_every_layout(variant, data, tmp_path):
    reference = run_layouts(["single"], tmp_path / "single", data, VARIANTS[variant])["single"]
    _check_group_with(["tp2", "pp2", "dp2-zero1", "dp2-zero3", "sp2"], reference, data, tmp_path, VARIANTS[variant])


def _check_group_with(names, reference, data, root, extra):
    results = run_layouts(names, root, data, extra)
    for name in names:
        try:
            assert_same_training(results[name], reference)
        except AssertionError as err:
            raise AssertionError(f"layout {name}: {err}") from err


# The architecture options of the model families (Qwen2's q/k/v biases, Qwen3's query/key norms and separate head
# size, Llama-3.1's RoPE scaling, Dream's shifted prediction; tied embeddings, which pipeline stages cannot share,
# on the layouts without them), memory on: every layout trains the single-process model.
ALL_OPTIONS = ["--model.qkv_bias", "true", "--model.qk_norm", "true", "--model.head_dim", "32",
               "--model.rope_scaling", "llama3", "--model.rope_original_max_positions", "8",
               "--model.shifted_prediction", "true"]
TIED = [*ALL_OPTIONS, "--model.tie_embeddings", "true"]


@pytest.mark.slow
def test_model_family_options_train_the_single_process_model_at_every_layout(data, tmp_path):
    reference = run_layouts(["single"], tmp_path / "single", data, ALL_OPTIONS)["single"]
    _check_group_with(["tp2", "pp2", "dp2-zero1", "dp2-zero3", "sp2"], reference, data, tmp_path, ALL_OPTIONS)
    tied = run_layouts(["single"], tmp_path / "single-tied", data, TIED)["single"]
    _check_group_with(["tp2", "dp2-zero2"], tied, data, tmp_path / "tied", TIED)


def test_tied_options_train_the_single_process_model_at_tensor_parallel_two(data, tmp_path):
    reference = run_layouts(["single"], tmp_path / "single", data, TIED)["single"]
    _check_group_with(["tp2"], reference, data, tmp_path, TIED)
