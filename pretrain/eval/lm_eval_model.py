"""The ``memdlm`` model type for lm-evaluation-harness (optional: ``pip install -e .[eval]``).

Importing this module registers it: ``memdlm-lm-eval --model memdlm --model_args checkpoint=DIR,... --tasks
...`` is lm-eval's command line with it registered (lm-eval 0.4.13 has no plugin discovery, so plain
``lm_eval`` does not know it), and ``lm_eval.simple_evaluate(model="memdlm", ...)`` works after the import.

Model arguments: ``checkpoint`` (a checkpoint folder or run directory), ``inference_adaptation``
(true: the inner loop runs on each request's context first, as the reference evaluation does),
``mc_samples`` (Monte Carlo draws per log-likelihood, default 32), ``gen_length`` / ``gen_steps`` /
``block_length`` / ``temperature`` (the sampler), ``seed``, ``device``.

- ``loglikelihood``: ``pretrain.eval.likelihood.conditional_log_likelihood`` (LLaDA's Monte Carlo estimate);
  "greedy" is whether the model, with every continuation token masked, predicts them all;
- ``loglikelihood_rolling``: the same with an empty context;
- ``generate_until``: the MDLM sampler, answers cut at the first stop string.
Contexts longer than the model's positions are cut from the left.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pretrain.eval.inference import load_for_inference
from pretrain.eval.likelihood import conditional_log_likelihood
from pretrain.eval.sampling import GenerationConfig, generate


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


@register_model("memdlm")
class MemDLMLM(LM):
    def __init__(self, checkpoint: str, inference_adaptation=False, mc_samples=32, gen_length=64, gen_steps=64,
                 block_length=0, temperature=0.0, seed=0, device="auto", batch_size=1, **_ignored):
        super().__init__()
        self.inference = load_for_inference(checkpoint, str(device) if device else "auto", seed=int(seed))
        self.adapt = _flag(inference_adaptation)
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.generation = GenerationConfig(length=int(gen_length), steps=int(gen_steps), block_length=int(block_length),
                                           temperature=float(temperature), seed=int(seed))
        self.max_positions = self.inference.model.rope_cos.shape[0]

    def _fit(self, context: list[int], extra: int) -> list[int]:
        return context[max(0, len(context) + extra - self.max_positions):]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        im, out = self.inference, []
        for index, request in enumerate(requests):
            context_text, continuation_text = request.args
            continuation = im.encode(continuation_text)
            context = self._fit(im.encode(context_text), len(continuation))
            value = conditional_log_likelihood(im.model, im.adaptation, context, continuation, im.mask_id,
                                               self.mc_samples, self.seed, self.adapt, index)
            out.append((value, self._greedy(context, continuation, index)))
        return out

    @torch.no_grad()
    def _greedy(self, context: list[int], continuation: list[int], index: int) -> bool:
        im = self.inference
        ids = torch.tensor([context + [im.mask_id] * len(continuation)], device=im.device)
        fast = im.adapt([context], [index]) if self.adapt and context else None
        logits = im.model(ids, fast=fast).float()[0, len(context):]
        logits[:, im.mask_id] = float("-inf")
        return logits.argmax(-1).tolist() == continuation

    def loglikelihood_rolling(self, requests) -> list[float]:
        im, out = self.inference, []
        for index, request in enumerate(requests):
            tokens = im.encode(request.args[0])[-self.max_positions:]
            out.append(conditional_log_likelihood(im.model, im.adaptation, [], tokens, im.mask_id, self.mc_samples,
                                                  self.seed, False, index))
        return out

    def generate_until(self, requests) -> list[str]:
        im, out = self.inference, []
        for index, request in enumerate(requests):
            context_text, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            length = int(kwargs.get("max_gen_toks", self.generation.length))
            steps = self.generation.steps if length == self.generation.length else length
            cfg = GenerationConfig(**{**self.generation.__dict__, "length": length, "steps": steps})
            context = self._fit(im.encode(context_text), length)
            fast = im.adapt([context], [index]) if self.adapt and context else None
            tokens = generate(im.model, [context], cfg, im.mask_id, im.pad_id, im.eot_id, im.vocab_limit, fast,
                              [index])[0]
            text = im.decode(tokens)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out
