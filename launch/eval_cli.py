"""``memdlm-eval`` (held-out loss, conditional likelihood, needle-in-a-haystack accuracy of a checkpoint)
and ``memdlm-niah`` (write the needle-in-a-haystack suite as JSON Lines for training mixtures)."""

from __future__ import annotations

import argparse
import json
import sys

from common.errors import UsageError
from launch.generate_cli import (
    add_checkpoint_options,
    add_generation_options,
    generation_config,
    is_reporting_rank,
    relaunch_for_sequence_parallel,
)
from launch.messages import fail


def _lengths(text: str) -> list[int]:
    """``--lengths``: positive context lengths in tokens, comma-separated."""
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--lengths {text!r}: expected comma-separated token counts, e.g. 128,256") from None
    if not lengths or min(lengths) < 1:
        raise UsageError(f"--lengths {text!r}: expected positive token counts, e.g. 128,256")
    return lengths


def _kinds(text: str) -> list[str]:
    """``--kinds``: needle kinds, comma-separated."""
    from pretrain.eval.niah import KINDS

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UsageError(f"--kinds {text!r}: unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    return kinds


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="memdlm-eval", description="Evaluate a checkpoint in one process (or over --sequence-parallel-size "
        "ranks, for long contexts) and print JSON. Tasks: heldout (the "
        "MDLM loss, nats and bits per token, on a prepared dataset's validation split, with and without "
        "inference-time adaptation), loglik (log p(continuation | prompt) by Monte Carlo over masks), niah "
        "(exact-match accuracy on the synthetic needle-in-a-haystack suite by kind and context length).")
    add_checkpoint_options(parser)
    parser.add_argument("--task", required=True, choices=["heldout", "loglik", "niah"],
                        help="what to evaluate (see above)")
    parser.add_argument("--data", help="heldout: a prepared dataset with a validation split (required there)")
    parser.add_argument("--num-samples", type=int, default=64, help="heldout: validation samples (default 64)")
    parser.add_argument("--context-fraction", type=float, default=0.5,
                        help="heldout: each sample's first share of tokens is a visible context, the rest is scored; "
                        "adaptation sees the context only (0: the whole sample; default 0.5, as "
                        "--eval.context_fraction)")
    parser.add_argument("--prompt", help="loglik: the prompt")
    parser.add_argument("--continuation", help="loglik: the continuation whose log-likelihood is estimated")
    parser.add_argument("--mc-samples", type=int, default=32, help="loglik: Monte Carlo draws (default 32)")
    parser.add_argument("--kinds", default="single,multi,vartrack",
                        help="niah: comma-separated kinds: single, multi, vartrack (default all three)")
    parser.add_argument("--lengths", default="128,256,512,1024",
                        help="niah: comma-separated context lengths in tokens (default 128,256,512,1024)")
    parser.add_argument("--per-cell", type=int, default=8, help="niah: examples per kind and length (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="niah: prompts generated together (default 8)")
    parser.add_argument("--adaptation", default="false", choices=["true", "false", "both"],
                        help="with inference-time adaptation on the prompt (both: report with and without; "
                        "default false)")
    add_generation_options(parser)
    args = parser.parse_args(argv)
    try:
        relaunched = relaunch_for_sequence_parallel(args, "launch.eval_cli", argv)
        if relaunched is not None:
            return relaunched
        result = _evaluate(args)
    except UsageError as err:
        return fail("memdlm-eval", str(err))
    if is_reporting_rank():
        print(json.dumps(result, indent=2))
    return 0


def _evaluate(args) -> dict:
    from pretrain.eval.inference import load_for_inference

    kinds, lengths = (_kinds(args.kinds), _lengths(args.lengths)) if args.task == "niah" else (None, None)
    model = load_for_inference(args.checkpoint, args.device, seed=args.seed, verify=not args.no_verify,
                               sequence_parallel_size=args.sequence_parallel_size)
    modes = {"true": [True], "false": [False], "both": [False, True]}[args.adaptation]
    if args.task == "loglik":
        from pretrain.eval.likelihood import conditional_log_likelihood

        if args.prompt is None or args.continuation is None:
            raise UsageError("--task loglik needs --prompt and --continuation")
        prompt, continuation = model.encode(args.prompt), model.encode(args.continuation)
        return {("adapted" if adapt else "plain"): conditional_log_likelihood(
            model.model, model.adaptation, prompt, continuation, model.mask_id, args.mc_samples, args.seed, adapt)
            for adapt in modes}
    if args.task == "niah":
        from pretrain.eval.niah import evaluate_suite, make_suite

        generation = generation_config(args)
        generation.check()
        examples = make_suite(model.encode, kinds, lengths, args.per_cell, args.seed)
        limit = model.model.rope_cos.shape[0]
        too_long = [e for e in examples if e.context_tokens + generation.length > limit]
        if too_long:
            raise UsageError(f"{len(too_long)} examples need more than the model's {limit} positions; use shorter "
                             "--lengths or a smaller --gen.length")
        return {("adapted" if adapt else "plain"): evaluate_suite(model, examples, generation, adapt, args.batch_size)
                for adapt in modes}
    if not args.data:
        raise UsageError("--task heldout needs --data, a prepared dataset with a validation split")
    return _heldout(model, args)


def _heldout(model, args) -> dict:
    from pathlib import Path

    import torch

    from data_pipeline.shards import read_manifest
    from data_pipeline.validation import validation_batches
    from parallel.collectives import LossNormalizer, sum_over
    from pretrain.eval.heldout import Evaluator, bits, evaluation_collates

    root = Path(args.data)
    manifest = read_manifest(root)
    cfg = model.model.cfg
    adapt = args.adaptation != "false"
    total = min(args.num_samples, manifest.get("validation", {}).get("num_samples", args.num_samples))
    if not 0 <= args.context_fraction < 1:
        raise UsageError(f"--context-fraction must lie in [0, 1), got {args.context_fraction}")
    collates = evaluation_collates(args.seed, model.adaptation.memory, model.adaptation.diffusion.eps, cfg.seq_len,
                                   cfg.vocab_size, adapt, args.context_fraction)
    batches, *prompts = validation_batches(root, manifest, collates, list(range(total)), 16)
    prompts = prompts[0] if adapt else [None] * len(batches)
    device = model.device
    normalizer = LossNormalizer.of([b.maskable for b in batches]).to(device)
    evaluator = Evaluator(model.adaptation)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch, prompt in zip(batches, prompts):
        sums += evaluator(batch.to(device), normalizer, prompt.to(device) if prompt is not None else None)
    sum_over(sums, model.model.sequence_group)  # each sequence-parallel rank scored its chunk's tokens
    loss, adapted = sums.tolist()
    result = {"samples": total, "loss_nats_per_token": loss, "bits_per_token": bits(loss)}
    if adapt:
        result.update(adapted_loss_nats_per_token=adapted, adapted_bits_per_token=bits(adapted))
    return result


def niah_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="memdlm-niah", description="Write the synthetic needle-in-a-haystack suite (single-key, multi-key, "
        "variable tracking) as JSON Lines of {prompt, response, kind, context_tokens, needle_positions}: a "
        "training mixture for memdlm-prepare-data, or a record of what memdlm-eval --task niah scores.")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json (or a directory with one) that lengths "
                                                           "are counted in")
    parser.add_argument("--output", required=True, help="the JSON Lines file to write")
    parser.add_argument("--kinds", default="single,multi,vartrack",
                        help="comma-separated kinds: single, multi, vartrack (default all three)")
    parser.add_argument("--lengths", default="128,256,512,1024",
                        help="comma-separated context lengths in tokens (default 128,256,512,1024)")
    parser.add_argument("--per-cell", type=int, default=64, help="examples per kind and length (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the needles and haystacks (default 0)")
    args = parser.parse_args(argv)
    from pathlib import Path

    try:
        kinds, lengths = _kinds(args.kinds), _lengths(args.lengths)
        from data_pipeline.tokenizer import load_tokenizer
        from pretrain.eval.niah import make_suite, write_jsonl

        tokenizer = load_tokenizer(args.tokenizer).tokenizer
        examples = make_suite(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, kinds, lengths,
                              args.per_cell, args.seed)
        write_jsonl(examples, Path(args.output))
    except UsageError as err:
        return fail("memdlm-niah", str(err))
    print(f"wrote {len(examples)} examples to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
