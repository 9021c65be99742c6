"""``memdlm-prepare-data``: text, JSON Lines or Parquet (compressed or not) -> packed, tokenized MDS /
webdataset shards; in parts on many machines, then merged."""

from __future__ import annotations

import argparse
import sys

from data_pipeline.errors import DataError
from data_pipeline.prepare_options import DEFAULT_BPE_VOCAB, PrepareOptions

PROG = "memdlm-prepare-data"


def build_parser() -> argparse.ArgumentParser:
    defaults = PrepareOptions(input="", output="")
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Tokenize documents and pack them into fixed-length samples written as shards for training. Input: "
            "plain text (one document per run of non-blank lines), JSON Lines with a text field or prompt and "
            "response fields (prompts are never masked), or Parquet with such columns; .jsonl/.json/.txt may be "
            "compressed (.gz, .zst, .bz2, .xz); a file, a directory (read recursively) or a glob. Output: "
            "DIR/manifest.json, DIR/tokenizer.json, DIR/mds/ and/or DIR/webdataset/ (and DIR/val.npz). An "
            "interrupted preparation resumes when run again (the files already prepared are kept). Large corpora: "
            "prepare --num-parts N --part I on many machines (memdlm-launch slurm-prepare), then --merge DIR."
        ),
    )
    parser.add_argument("--input", default="",
                        help="input files: a file, a directory (read recursively, hidden files skipped) or a glob "
                             "(quote it) (default: none; required unless --merge)")
    parser.add_argument("--output", default="",
                        help="the dataset directory to create (default: none; required unless --merge)")
    parser.add_argument("--format", default="mds", choices=["mds", "webdataset", "both"],
                        help="shard format(s) to write (default: mds)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len,
                        help="tokens per packed sample; must equal the model's --model.seq_len "
                        f"(default {defaults.seq_len})")
    parser.add_argument("--tokenizer", default="",
                        help="a tokenizer.json or Hugging Face tokenizer/model directory, of any vocabulary size "
                             "(default: train a byte-level BPE on the input)")
    parser.add_argument("--vocab-size", type=int, default=0,
                        help=f"BPE vocabulary size to train (0: {DEFAULT_BPE_VOCAB}), or the id range a loaded "
                             "tokenizer must fit (0: its own size) (default 0)")
    parser.add_argument("--tokenizer-sample-mb", type=int, default=defaults.tokenizer_sample_mb,
                        help="train the BPE on the first N MB of text, 0 for all "
                        f"(default {defaults.tokenizer_sample_mb})")
    parser.add_argument("--eot-token", default="",
                        help="the token appended to every document (default: the tokenizer's end-of-text token: "
                             "eos_token of its tokenizer_config.json, or <|endoftext|>, <|end_of_text|>, </s>, ...)")
    parser.add_argument("--mask-token", default="",
                        help="the diffusion mask token (default: mask_token of tokenizer_config.json, or "
                             "<|mask|>, <|mdm_mask|>, [MASK], <mask>)")
    parser.add_argument("--add-mask-token", nargs="?", const="<|mask|>", default="", metavar="NAME",
                        help="add a mask token (default name <|mask|>) to a tokenizer that has none, at the next "
                             "free id, as memdlm-import-hf does to a model (it also grows the model's embedding)")
    parser.add_argument("--text-field", default=defaults.text_field,
                        help=f"JSON field / Parquet column of a document's text (default {defaults.text_field})")
    parser.add_argument("--prompt-field", default=defaults.prompt_field,
                        help="... or of a prompt (never masked), with --response-field "
                             f"(default {defaults.prompt_field})")
    parser.add_argument("--response-field", default=defaults.response_field,
                        help=f"... and of its response (default {defaults.response_field})")
    parser.add_argument("--max-bad-files", type=int, default=0,
                        help="unreadable input files (each named with the reason) that are skipped before the "
                             "preparation stops (default 0: stop at the first)")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers,
                        help=f"tokenization processes, 0 tokenizes in this process (default {defaults.num_workers})")
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard,
                        help=f"samples per shard (default {defaults.samples_per_shard})")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="hold out this share of the documents (chosen by a hash of their position) as a "
                             "validation split, DIR/val.npz (default 0: none)")
    parser.add_argument("--val-input", default="",
                        help="separate input files for the validation split (default: none)")
    parser.add_argument("--num-parts", type=int, default=1,
                        help="cut the preparation into N parts (input files dealt out round robin); with --part I "
                             "this run prepares part I into DIR/parts/ (default 1: all at once)")
    parser.add_argument("--part", type=int, default=-1,
                        help="which part to prepare, 0..N-1 (with --num-parts; default: none)")
    parser.add_argument("--merge", default="", metavar="DIR",
                        help="assemble the parts prepared in DIR/parts/ into the dataset DIR (default: none)")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="only train (or load) the tokenizer, into DIR/tokenizer.json, for the parts to share")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a prepared dataset at --output (a run or any other folder is never replaced)")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge and (args.input or args.output):
        parser.error("--merge DIR takes no --input or --output")
    if not args.merge and not (args.input and args.output):
        parser.error("--input and --output are required (or --merge DIR)")
    try:
        if args.merge:
            from data_pipeline.prepare import merge_parts

            manifest = merge_parts(args.merge, progress=not args.no_progress)
            print(_summary(manifest, args.merge, "merged"))
            return 0
        options = options_from(args)
        from data_pipeline.prepare import prepare_dataset

        result = prepare_dataset(options)
    except DataError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if options.tokenizer_only:
        print(f"wrote {result['tokenizer']} ({result['vocab_size']} tokens; end-of-text {result['eot_token_id']}, "
              f"mask {result['mask_token_id']}); prepare the parts with --tokenizer {result['tokenizer']}")
    elif options.split:
        print(f"part {result['part']} of {result['num_parts']}: {result['samples']} samples from "
              f"{len(result['units'])} input file(s) in {args.output}/parts; merge them all with "
              f"{PROG} --merge {args.output}")
    else:
        print(_summary(result, args.output, "prepared"))
    return 0


def options_from(args: argparse.Namespace) -> PrepareOptions:
    return PrepareOptions(
        input=args.input, output=args.output,
        formats=["mds", "webdataset"] if args.format == "both" else [args.format],
        seq_len=args.seq_len, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        tokenizer_sample_mb=args.tokenizer_sample_mb, num_workers=args.num_workers,
        samples_per_shard=args.samples_per_shard, overwrite=args.overwrite, progress=not args.no_progress,
        val_fraction=args.val_fraction, val_input=args.val_input, text_field=args.text_field,
        prompt_field=args.prompt_field, response_field=args.response_field, max_bad_files=args.max_bad_files,
        eot_token=args.eot_token, mask_token=args.mask_token, add_mask_token=args.add_mask_token,
        num_parts=args.num_parts, part=args.part, tokenizer_only=args.tokenizer_only,
    )


def _summary(manifest: dict, folder: str, verb: str) -> str:
    shards = ", ".join(f"{name}: {len(entry['shards'])} shards" for name, entry in manifest["formats"].items())
    skipped = [i["file"] for i in manifest.get("inputs", []) if i.get("skipped")]
    return (f"{verb} {manifest['num_samples']} samples of {manifest['seq_len']} tokens ({manifest['num_tokens']} "
            f"tokens from {manifest['num_documents']} documents in {len(manifest.get('inputs', []))} file(s); "
            f"{shards}) in {folder}" + (f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""))


if __name__ == "__main__":
    sys.exit(main())
