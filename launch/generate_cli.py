"""``memdlm-generate``: text from a checkpoint with the MDLM sampler, optionally after inference-time
adaptation on each prompt."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common.errors import UsageError
from launch.messages import fail

PROG = "memdlm-generate"


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    from pretrain.eval.generation_config import GenerationConfig

    d = GenerationConfig()
    group = parser.add_argument_group("generation")
    group.add_argument("--gen.length", dest="length", type=int, default=d.length,
                       help=f"tokens to generate (default {d.length})")
    group.add_argument("--gen.steps", dest="steps", type=int, default=d.steps,
                       help=f"denoising steps in all, a multiple of the number of blocks (default {d.steps})")
    group.add_argument("--gen.block_length", dest="block_length", type=int, default=d.block_length,
                       help="semi-autoregressive block size; 0 = one block (default)")
    group.add_argument("--gen.temperature", dest="temperature", type=float, default=d.temperature,
                       help="sampling temperature; 0 = greedy (default)")
    group.add_argument("--gen.top_k", dest="top_k", type=int, default=d.top_k, help="top-k filtering; 0 = off")
    group.add_argument("--gen.top_p", dest="top_p", type=float, default=d.top_p,
                       help="nucleus filtering; 1 = off (default)")
    group.add_argument("--gen.remasking", dest="remasking", default=d.remasking, choices=["low_confidence", "random"],
                       help="which predictions are kept at each step (default: the most confident)")
    group.add_argument("--gen.padding_side", dest="padding_side", default=d.padding_side, choices=["right", "left"],
                       help="how a batch of prompts of different lengths is padded, never attended either way "
                       "(default right)")
    group.add_argument("--gen.stop_at_eot", dest="stop_at_eot", default="true", choices=["true", "false"],
                       help="cut each answer at its first end-of-document token (default true)")
    group.add_argument("--gen.seed", dest="seed", type=int, default=d.seed,
                       help="seed of the sampling noise (and of adaptation's masks); same seed, same text")
    group.add_argument("--memory.inference", dest="inference", default="false", choices=["true", "false"],
                       help="inference-time adaptation: run the inner loop on each prompt first (default false)")


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder or a run directory (its newest checkpoint)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the model runs (default: cuda when available, else cpu)")
    parser.add_argument("--no-verify", action="store_true",
                        help="check only the sizes of the checkpoint's files, not their sha256 against the manifest "
                        "(faster for huge checkpoints; the default checks both)")
    parser.add_argument("--sequence-parallel-size", type=int, default=1,
                        help="split each sequence's tokens over this many ranks on this machine (long prompts: "
                        "started through torchrun for you; every rank holds the weights; default 1)")


def relaunch_for_sequence_parallel(args, module: str, argv: list[str] | None) -> int | None:
    """With ``--sequence-parallel-size S`` > 1 outside torchrun: run this command again as S ranks on this machine
    (torchrun) and return its exit code; otherwise None (this process does the work)."""
    size = args.sequence_parallel_size
    if size < 1:
        raise UsageError(f"--sequence-parallel-size expects a positive integer, got {size}")
    if size == 1 or "RANK" in os.environ:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={size}",
               "-m", module, *(sys.argv[1:] if argv is None else argv)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // size)))
    return subprocess.call(command, env=env)


def is_reporting_rank() -> bool:
    """Whether this process prints the results: always alone; rank 0 of sequence-parallel ranks."""
    return os.environ.get("RANK", "0") == "0"


def generation_config(args):
    from pretrain.eval.generation_config import GenerationConfig

    return GenerationConfig(length=args.length, steps=args.steps, block_length=args.block_length,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            remasking=args.remasking, stop_at_eot=args.stop_at_eot == "true",
                            padding_side=args.padding_side, seed=args.seed)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        number = 0
        try:
            with open(args.prompts) as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        prompts.append(json.loads(line)["prompt"])
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"--prompts {args.prompts}: line {number}: expected JSON lines with a \"prompt\" "
                             f"field ({type(err).__name__}: {err})") from None
    if not prompts:
        raise UsageError("give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Generate text from a checkpoint (any parallel layout; it loads into one process, or "
        "into --sequence-parallel-size ranks) "
        "with the MDLM / LLaDA sampler: the prompt plus --gen.length mask tokens, unmasked over --gen.steps steps, "
        "most confident first, optionally in semi-autoregressive blocks. Prints one JSON line per prompt.")
    add_checkpoint_options(parser)
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    parser.add_argument("--prompts", help="JSON Lines with a \"prompt\" field per line")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--output", help="write the JSON lines here instead of standard output (default)")
    add_generation_options(parser)
    args = parser.parse_args(argv)
    try:
        relaunched = relaunch_for_sequence_parallel(args, "launch.generate_cli", argv)
        if relaunched is not None:
            return relaunched
        cfg = generation_config(args)
        cfg.check()
        prompts = read_prompts(args)
        from pretrain.eval.inference import load_for_inference
        from pretrain.eval.sampling import generate

        model = load_for_inference(args.checkpoint, args.device, seed=args.seed, verify=not args.no_verify,
                                   sequence_parallel_size=args.sequence_parallel_size)
        if model.tokenizer is None:
            raise UsageError(f"{args.checkpoint} has no tokenizer.json to encode prompts with")
        lines = []
        for start in range(0, len(prompts), args.batch_size):
            texts = prompts[start:start + args.batch_size]
            ids = [model.encode(t) for t in texts]
            indices = list(range(start, start + len(texts)))
            fast = model.adapt(ids, indices) if args.inference == "true" else None
            outputs = generate(model.model, ids, cfg, model.mask_id, model.pad_id, model.eot_id, model.vocab_limit,
                               fast, indices)
            for text, tokens in zip(texts, outputs):
                lines.append(json.dumps({"prompt": text, "completion": model.decode(tokens), "tokens": tokens,
                                         "adapted": args.inference == "true"}))
    except UsageError as err:
        return fail(PROG, str(err))
    if not is_reporting_rank():
        return 0
    text = "\n".join(lines) + "\n"
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
