"""``memdlm-prepare-data``: text or JSON Lines -> packed, tokenized MDS / webdataset shards."""

from __future__ import annotations

import argparse
import sys

from data_pipeline.errors import DataError
from data_pipeline.prepare_options import PrepareOptions

PROG = "memdlm-prepare-data"


def build_parser() -> argparse.ArgumentParser:
    defaults = PrepareOptions(input="", output="")
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Tokenize text and pack it into fixed-length samples written as shards for training. Input: plain "
            "text (one document per run of non-blank lines), JSON Lines with {\"text\": ...} or "
            "{\"prompt\": ..., \"response\": ...} (prompts are never masked), or a directory of such files. "
            "Output: DIR/manifest.json, DIR/tokenizer.json, DIR/mds/ and/or DIR/webdataset/."
        ),
    )
    parser.add_argument("--input", required=True, help="a text/JSONL file or a directory of them (read recursively)")
    parser.add_argument("--output", required=True, help="the dataset directory to create")
    parser.add_argument("--format", default="mds", choices=["mds", "webdataset", "both"],
                        help="shard format(s) to write (default: mds)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len,
                        help="tokens per packed sample; must equal the model's --model.seq_len "
                        f"(default {defaults.seq_len})")
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size,
                        help="BPE vocabulary size to train, and the limit a loaded tokenizer must fit "
                        f"(default {defaults.vocab_size})")
    parser.add_argument("--tokenizer", default="",
                        help="a tokenizer.json or Hugging Face tokenizer directory (default: train a byte-level BPE)")
    parser.add_argument("--tokenizer-sample-mb", type=int, default=defaults.tokenizer_sample_mb,
                        help="train the BPE on the first N MB of text, 0 for all "
                        f"(default {defaults.tokenizer_sample_mb})")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers,
                        help=f"tokenization processes, 0 tokenizes in this process (default {defaults.num_workers})")
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard,
                        help=f"samples per shard (default {defaults.samples_per_shard})")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="hold out this share of the documents (chosen by a hash of their position) as a "
                             "validation split, DIR/val.npz (default 0: none)")
    parser.add_argument("--val-input", default="",
                        help="a separate text/JSONL file or directory for the validation split (default: none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a prepared dataset at --output (a run or any other folder is never replaced)")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = PrepareOptions(
        input=args.input, output=args.output,
        formats=["mds", "webdataset"] if args.format == "both" else [args.format],
        seq_len=args.seq_len, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        tokenizer_sample_mb=args.tokenizer_sample_mb, num_workers=args.num_workers,
        samples_per_shard=args.samples_per_shard, overwrite=args.overwrite, progress=not args.no_progress,
        val_fraction=args.val_fraction, val_input=args.val_input,
    )
    try:
        from data_pipeline.prepare import prepare_dataset

        manifest = prepare_dataset(options)
    except DataError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    shards = ", ".join(f"{name}: {len(entry['shards'])} shards" for name, entry in manifest["formats"].items())
    print(f"prepared {manifest['num_samples']} samples of {manifest['seq_len']} tokens "
          f"({manifest['num_tokens']} tokens from {manifest['num_documents']} documents; {shards}) in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
