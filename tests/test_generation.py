"""The MDLM sampler and inference-time adaptation."""

import pytest
import torch
import torch.nn as nn

from pretrain.eval.inference import prompt_adaptation_batch
from pretrain.eval.sampling import GenerationConfig, generate, transfer_schedule
from tests.helpers.models import MASK, PAD, TINY_MODEL, VOCAB, tiny_adaptation, tiny_model
from tests.helpers.reference_step import reference_step

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)


class Scripted(nn.Module):
    """Logits that favour ``target[position]`` everywhere, more sharply at later positions (so the most
    confident masked position is the last one); records what it was shown."""

    def __init__(self, target: list[int]):
        super().__init__()
        self.target = target
        self.anchor = nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, ids, attention_mask=None, fast=None, positions=None):
        self.seen.append(ids.clone())
        b, l = ids.shape
        logits = torch.zeros(b, l, VOCAB)
        for position in range(l):
            logits[:, position, self.target[position % len(self.target)]] = 1.0 + 0.1 * position
        return logits


def test_transfer_schedule_spreads_the_remainder_over_the_first_steps():
    assert transfer_schedule(10, 4) == [3, 3, 2, 2] and sum(transfer_schedule(7, 7)) == 7


def test_a_model_that_favours_a_sequence_generates_exactly_it_and_no_mask_remains():
    target = list(range(40))
    model = Scripted(target)
    prompt = target[:5]
    out = generate(model, [prompt], GenerationConfig(length=12, steps=6), MASK, PAD)
    assert out == [target[5:17]]
    assert MASK not in out[0]


def test_blocks_are_filled_in_order():
    model = Scripted(list(range(40)))
    generate(model, [[1, 2]], GenerationConfig(length=12, steps=6, block_length=4), MASK, PAD)
    blocks = [range(2, 6), range(6, 10), range(10, 14)]
    for ids in model.seen:  # what the model saw at each step
        done = [all(int(ids[0, p]) != MASK for p in block) for block in blocks]
        started = [any(int(ids[0, p]) != MASK for p in block) for block in blocks]
        for earlier, later in zip(range(2), range(1, 3)):
            assert not started[later] or done[earlier], "a later block was touched before an earlier one finished"
    assert len(model.seen) == 6


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_never_attended(topology, side):
    """A prompt gives the same answer alone as next to a longer one, padded either way."""
    model = tiny_model()
    cfg = GenerationConfig(length=8, steps=8, padding_side=side)
    short, long = [3, 4, 5], [7, 8, 9, 10, 11, 12, 13]
    alone = generate(model, [short], cfg, MASK, PAD)[0]
    together = generate(model, [long, short], cfg, MASK, PAD, indices=[1, 0])
    assert together[1] == alone
    assert together[0] == generate(model, [long], cfg, MASK, PAD, indices=[1])[0]


def test_sampling_is_deterministic_for_a_seed(topology):
    model = tiny_model()
    cfg = GenerationConfig(length=10, steps=10, temperature=1.0, top_k=8, top_p=0.9, seed=3)
    first = generate(model, [[1, 2, 3], [4, 5]], cfg, MASK, PAD)
    assert generate(model, [[1, 2, 3], [4, 5]], cfg, MASK, PAD) == first
    other = GenerationConfig(length=10, steps=10, temperature=1.0, seed=4)
    assert generate(model, [[1, 2, 3], [4, 5]], other, MASK, PAD) != first
    random = GenerationConfig(length=10, steps=5, remasking="random", seed=3)
    assert all(MASK not in answer for answer in generate(model, [[1, 2]], random, MASK, PAD))


def test_generation_stops_at_the_end_of_document_token():
    target = [9, 9, 9, 9, 1, 2, 3, 7, 4, 5]  # 7 plays the end-of-document token
    model = Scripted(target)
    out = generate(model, [[9, 9, 9, 9]], GenerationConfig(length=6, steps=6), MASK, PAD, eot_id=7)
    assert out == [[1, 2, 3]]


# -- inference-time adaptation -------------------------------------------------------------------
def test_adaptation_equals_the_float64_oracles_inner_steps(topology):
    model = tiny_model()
    adaptation = tiny_adaptation(model, masking_strategy="pmc", num_inner_steps=3)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    batch = prompt_adaptation_batch(adaptation, prompts, [0, 1], PAD)
    batch.t = batch.t.double()
    assert batch.anchor_mask.sum(1).tolist() == [2, 1], "20% of each prompt, at least one token"
    fast = adaptation.adapt(batch)
    phi0 = adaptation.plan.initial(2, 0, 0, "cpu", torch.float64).clone_values()
    weights = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    _, history, _ = reference_step(weights, TINY_MODEL, adaptation.memory, batch, MASK, phi0, batch.maskable.sum())
    for name, tensors in history[-1].items():
        for ours, theirs in zip(fast.get(name), tensors):
            assert float((ours - theirs).norm() / theirs.norm()) < 1e-6, name


def test_adaptation_is_reset_for_every_prompt_and_per_sequence_in_a_batch(topology):
    model = tiny_model()
    adaptation = tiny_adaptation(model)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]
    first = adaptation.adapt(prompt_adaptation_batch(adaptation, [a], [0], PAD))
    adaptation.adapt(prompt_adaptation_batch(adaptation, [b], [1], PAD))
    again = adaptation.adapt(prompt_adaptation_batch(adaptation, [a], [0], PAD))
    together = adaptation.adapt(prompt_adaptation_batch(adaptation, [a, b], [0, 1], PAD))
    for name in first.tensors:
        for x, y, z in zip(first.get(name), again.get(name), together.get(name)):
            assert torch.equal(x, y)
            torch.testing.assert_close(z[:1], x, rtol=1e-10, atol=1e-12)


def test_adaptation_off_is_bit_identical_and_batches_equal_single_prompts(topology):
    model = tiny_model()
    cfg = GenerationConfig(length=8, steps=8)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    plain = generate(model, prompts, cfg, MASK, PAD)
    idle = tiny_adaptation(model, inner_lr=0.0)  # phi_K = phi_0, whose LoRA product is exactly zero
    fast = idle.adapt(prompt_adaptation_batch(idle, prompts, None, PAD))
    assert generate(model, prompts, cfg, MASK, PAD, fast=fast) == plain
    adaptation = tiny_adaptation(model, inner_lr=5.0)
    fast = adaptation.adapt(prompt_adaptation_batch(adaptation, prompts, [0, 1], PAD))
    batched = generate(model, prompts, cfg, MASK, PAD, fast=fast)
    for index, prompt in enumerate(prompts):
        alone = adaptation.adapt(prompt_adaptation_batch(adaptation, [prompt], [index], PAD))
        assert generate(model, [prompt], cfg, MASK, PAD, fast=alone, indices=[index]) == [batched[index]]
    assert batched != plain, "a strong inner step must change some answer for this test to mean anything"
