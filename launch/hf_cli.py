"""``memdlm-export-hf`` and ``memdlm-import-hf``: to and from the Hugging Face format."""

from __future__ import annotations

import argparse
import re
import sys

from common.errors import UsageError
from launch.messages import fail

OVERWRITE_HELP = ("replace OUT_DIR if it is an earlier output of this command (a run, a dataset or any other "
                  "folder is never replaced)")


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``1.5GiB`` or a byte count."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB or 500MB")
    number, unit = float(match.group(1)), match.group(2).upper().replace("IB", "B")
    factor = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "K": 2**10, "M": 2**20,
              "G": 2**30, "T": 2**40}[unit]
    return int(number * factor)


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="memdlm-export-hf",
        description="Write a checkpoint (from any parallel layout) as a Hugging Face model directory in one family's "
        "form: its tensor names in safetensors (sharded above --max-shard-size), config.json with the fields that "
        "family's code reads, generation_config.json and the tokenizer. --format memdlm (ours) also gets our "
        "modeling files, so transformers.AutoModelForMaskedLM.from_pretrained(OUT_DIR, trust_remote_code=True) "
        "loads it with every architecture option; llama/qwen2/qwen3 load with transformers' own classes "
        "(give them a bidirectional attention mask); llada/dream with those models' published code "
        "(--code-from). Tensors are streamed one at a time; no process group is needed.",
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (…/checkpoints/step_NNNNNN) or a run directory "
                                           "(its newest checkpoint)")
    parser.add_argument("out_dir", help="the directory to create")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the exported weights (default: float32, as trained)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB",
                        help="largest safetensors file before an index and more files are written (default 5GB)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking the checkpoint files' sha256 against its manifest (sizes are checked)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    from pretrain.hf.configs import FAMILIES

    parser.add_argument("--format", choices=FAMILIES, default=None,
                        help="the family whose names and config to write (default: the family the model was "
                             "imported from, else memdlm); a family that cannot express the model (e.g. q/k/v "
                             "biases as llama) is refused")
    parser.add_argument("--code-from", default=None, metavar="DIR",
                        help="llada/dream: copy that family's published modeling files (configuration_*.py, "
                             "modeling_*.py) from DIR, the original model's folder, into the export")
    args = parser.parse_args(argv)
    from pretrain.hf.exporter import export_checkpoint

    try:
        export_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size, not args.no_verify,
                          args.overwrite, args.format, args.code_from)
    except UsageError as err:
        return fail(parser.prog, str(err))
    return 0


def import_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="memdlm-import-hf",
        description="Convert a Hugging Face checkpoint (families: llama/mistral, qwen2, qwen3, llada, dream, memdlm; "
        "read from config.json's model_type, no code of the folder is run) into a directory that "
        "--model.init_from takes: a mask token is added if the tokenizer has none (the embedding and head grow "
        "by one row, initialised to the mean of the existing rows, and the vocabulary is padded to a multiple of "
        "64), everything else is copied; memdlm-export-hf later writes it back in its family's form.",
    )
    parser.add_argument("hf_dir", help="a local Hugging Face model directory (config.json, safetensors, "
                                       "tokenizer.json)")
    parser.add_argument("out_dir", help="the directory to create")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB",
                        help="largest safetensors file before an index and more files are written (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--untie-embeddings", action="store_true",
                        help="a model with tied input/output embeddings gets its own head (a copy of the "
                             "embedding), as pipeline parallelism needs (the two stages hold one each)")
    args = parser.parse_args(argv)
    from pretrain.hf.importer import import_hf

    try:
        import_hf(args.hf_dir, args.out_dir, args.max_shard_size, args.overwrite, args.untie_embeddings)
    except UsageError as err:
        return fail(parser.prog, str(err))
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
