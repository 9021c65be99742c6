"""Real pretraining corpora: Parquet and compressed JSON Lines, Hugging Face tokenizers of any size, bad files
named (or skipped within a budget), preparation in parts merged into the one-run dataset, resuming after a kill."""

import bz2
import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline.errors import DataError
from data_pipeline.prepare import PrepareOptions, merge_parts, prepare_dataset
from launch.prepare_cli import main as prepare_main
from tests.helpers import BUNDLED_CORPUS, ROOT
from tests.helpers.data import SEQ_LEN, VOCAB


def options(input_path, output, **changes) -> PrepareOptions:
    values = dict(input=str(input_path), output=str(output), formats=["mds", "webdataset"], seq_len=SEQ_LEN,
                  vocab_size=VOCAB, samples_per_shard=40, num_workers=0, progress=False)
    return PrepareOptions(**(values | changes))


def shard_hashes(manifest: dict) -> dict:
    return {name: [s["sha256"] for s in entry["shards"]] for name, entry in manifest["formats"].items()}


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    """A BPE trained once on the corpus (``--tokenizer-only``), shared by the preparations compared here."""
    out = tmp_path_factory.mktemp("tokenizer") / "tok"
    prepare_dataset(options(corpus, out, tokenizer_only=True))
    return str(out / "tokenizer.json")


def write_parquet(path, columns: dict, row_group_size: int = 16) -> None:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def records(file) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines()]


# -- inputs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compressed(corpus, tmp_path_factory):
    """The corpus again as text.gz, jsonl.zst (texts under the field "content") and Parquet (prompt/response
    columns, row groups of 16 rows), in the same order."""
    folder = tmp_path_factory.mktemp("compressed")
    with gzip.open(folder / "a_plays.txt.gz", "wb") as handle:
        handle.write((corpus / "a_plays.txt").read_bytes())
    lines = "".join(json.dumps({"content": r["text"], "id": i}) + "\n"
                    for i, r in enumerate(records(corpus / "b_texts.jsonl")))
    (folder / "b_texts.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    chats = records(corpus / "c_chat.jsonl")
    write_parquet(folder / "c_chat.parquet", {"prompt": [r["prompt"] for r in chats],
                                              "response": [r["response"] for r in chats]})
    return folder


def test_compressed_and_parquet_inputs_give_the_plain_inputs_samples(corpus, compressed, tokenizer, tmp_path):
    plain = prepare_dataset(options(corpus, tmp_path / "plain", tokenizer=tokenizer))
    packed = prepare_dataset(options(compressed, tmp_path / "packed", tokenizer=tokenizer, text_field="content"))
    assert packed["num_samples"] == plain["num_samples"] and packed["num_documents"] == plain["num_documents"]
    assert shard_hashes(packed) == shard_hashes(plain), "the same samples, byte for byte"
    assert [i["samples"] for i in packed["inputs"]] == [i["samples"] for i in plain["inputs"]]


@pytest.mark.fast
@pytest.mark.parametrize("suffix, compress", [(".bz2", bz2.compress), (".xz", lzma.compress),
                                              (".gz", gzip.compress)])
def test_bz2_xz_and_gzip_json_lines(corpus, tokenizer, tmp_path, suffix, compress):
    (tmp_path / "in").mkdir()
    source = corpus / "b_texts.jsonl"
    (tmp_path / "in" / f"b.jsonl{suffix}").write_bytes(compress(source.read_bytes()))
    plain = prepare_dataset(options(source, tmp_path / "plain", tokenizer=tokenizer, formats=["mds"]))
    packed = prepare_dataset(options(tmp_path / "in", tmp_path / "packed", tokenizer=tokenizer, formats=["mds"]))
    assert shard_hashes(packed) == shard_hashes(plain)


@pytest.mark.fast
def test_a_glob_selects_files_in_sorted_order(corpus, tokenizer, tmp_path):
    globbed = prepare_dataset(options(f"{corpus}/*.jsonl", tmp_path / "globbed", tokenizer=tokenizer))
    assert [i["file"] for i in globbed["inputs"]] == [str(corpus / "b_texts.jsonl"), str(corpus / "c_chat.jsonl")]


def _bad_parquet_footer(folder):
    write_parquet(folder / "x.parquet", {"text": ["some text"] * 40})
    data = (folder / "x.parquet").read_bytes()
    (folder / "x.parquet").write_bytes(data[:-12])
    return "x.parquet: not a readable Parquet file"


def _missing_column(folder):
    write_parquet(folder / "x.parquet", {"title": ["a"], "body": ["b"]})
    return "x.parquet has no column 'text'.*its columns are title, body: name the text column with --text-field"


def _bad_zstd_frame(folder):
    data = zstandard.ZstdCompressor().compress(b'{"text": "hello there"}\n' * 2000)
    (folder / "x.jsonl.zst").write_bytes(data[:len(data) // 2])
    return "x.jsonl.zst: the zstd stream cannot be read"


def _bad_gzip(folder):
    (folder / "x.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(200))
    return "x.jsonl.gz: the gzip stream cannot be read"


def _invalid_utf8_in_gzip(folder):
    (folder / "x.jsonl.gz").write_bytes(gzip.compress(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n'))
    return r"x.jsonl.gz: invalid UTF-8 at byte 31 of the decompressed stream"  # 17 + len('{"text": "bad ')


BAD_INPUTS = [_bad_parquet_footer, _missing_column, _bad_zstd_frame, _bad_gzip, _invalid_utf8_in_gzip]


@pytest.mark.fast
@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_a_bad_input_file_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, make_bad, tokenizer):
    folder = tmp_path / "in"
    folder.mkdir()
    message = make_bad(folder)
    out = tmp_path / "out"
    assert prepare_main(["--input", str(folder), "--output", str(out), "--tokenizer", tokenizer, "--seq-len",
                         str(SEQ_LEN), "--no-progress", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memdlm-prepare-data: error: "), err
    import re

    assert re.search(message, err[0]), err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], "no dataset, no staging folder left"


def test_bad_files_are_skipped_within_the_budget(corpus, tokenizer, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a_plays.txt", "c_chat.jsonl"):
        (folder / name).write_bytes((corpus / name).read_bytes())
    (folder / "b_broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(100))
    (folder / "d_broken.parquet").write_bytes(b"PAR1" + os.urandom(100))
    args = ["--input", str(folder), "--tokenizer", tokenizer, "--seq-len", str(SEQ_LEN), "--no-progress",
            "--num-workers", "0", "--format", "both", "--samples-per-shard", "40"]
    assert prepare_main([*args, "--output", str(tmp_path / "one"), "--max-bad-files", "1"]) == 2
    err = capsys.readouterr().err
    assert "d_broken.parquet: not a readable Parquet file" in err and "b_broken.jsonl.gz" in err
    assert not (tmp_path / "one").exists()
    assert prepare_main([*args, "--output", str(tmp_path / "two"), "--max-bad-files", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: skipping") == 2
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [bool(i.get("skipped")) for i in manifest["inputs"]] == [False, True, False, True]
    good = tmp_path / "good"
    good.mkdir()
    for name in ("a_plays.txt", "c_chat.jsonl"):
        (good / name).write_bytes((corpus / name).read_bytes())
    alone = prepare_dataset(options(good, tmp_path / "alone", tokenizer=tokenizer))
    assert shard_hashes(manifest) == shard_hashes(alone), "the readable files' samples, nothing of the others"


# -- tokenizers -------------------------------------------------------------------------------------
def word_level_tokenizer(size: int) -> Tokenizer:
    """A word-level tokenizer of ``size`` ids whose corpus words sit at the top of the range."""
    words = sorted(set(BUNDLED_CORPUS.read_text()[:60000].split()))
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "<|mask|>": 2}
    vocab.update({f"<filler{i}>": i for i in range(3, size - len(words))})
    vocab.update({w: size - len(words) + i for i, w in enumerate(words)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


@pytest.mark.parametrize("size", [70_000, 140_000])
def test_a_vocabulary_above_65536_and_131072_round_trips(corpus, tmp_path, size):
    from tests.test_prepare import read_mds

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    tokenizer = word_level_tokenizer(size)
    tokenizer.save(str(folder / "tokenizer.json"))
    manifest = prepare_dataset(options(corpus / "a_plays.txt", tmp_path / "ds", tokenizer=str(folder), vocab_size=0))
    assert manifest["vocab_size"] == manifest["tokenizer_vocab_size"] == size
    assert manifest["token_dtype"] == "int32"
    samples = np.concatenate([np.asarray(s["tokens"]) for s in read_mds(tmp_path / "ds")])
    paragraphs = [p for p in (corpus / "a_plays.txt").read_text().split("\n\n") if p.strip()]
    expected = np.concatenate([tokenizer.encode(p).ids + [1] for p in paragraphs])
    assert np.array_equal(samples[:len(expected)], expected)
    assert samples.max() >= size - 100 and samples.max() > (131_072 if size > 131_072 else 65_536)


def test_training_reads_a_vocabulary_above_131072(corpus, tmp_path, tiny):
    from launch.config_cli import build_config
    from pretrain.train.trainer import train
    from tests.helpers import read_metrics

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    word_level_tokenizer(140_000).save(str(folder / "tokenizer.json"))
    prepare_dataset(options(corpus / "a_plays.txt", tmp_path / "ds", tokenizer=str(folder), vocab_size=0,
                            val_fraction=0.1))
    train(build_config([*tiny({"train.steps": 2, "model.vocab_size": 140_032, "eval.every": 2}), "--data.path",
                        str(tmp_path / "ds"), "--train.out_dir", str(tmp_path / "run")]))
    first = read_metrics(tmp_path / "run")[0]
    # An untrained model's cross entropy is about ln(vocabulary) (the 1/t-weighted MDLM loss of 4 samples
    # scatters around it); a head of the wrong size would be far off.
    assert 0.8 * np.log(140_032) < first["loss"] < 1.6 * np.log(140_032)


def hf_tokenizer_dir(folder, specials: list[str], config: dict | None = None):
    """A Hugging Face tokenizer directory: a small byte-level BPE with exactly these special tokens, and its
    tokenizer_config.json."""
    from tokenizers import decoders, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([BUNDLED_CORPUS.read_text()[:20000]], trainer)
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, tokenizer


@pytest.mark.fast
def test_special_tokens_come_from_the_config_the_usual_names_or_the_options(corpus, tmp_path):
    source = corpus / "b_texts.jsonl"
    # LLaDA-style: <|mdm_mask|> by name, the end-of-text token named by tokenizer_config.json.
    folder, tok = hf_tokenizer_dir(tmp_path / "llada", ["<|endoftext|>", "<|im_end|>", "<|mdm_mask|>"],
                                   {"eos_token": {"content": "<|im_end|>"}})
    manifest = prepare_dataset(options(source, tmp_path / "a", tokenizer=str(folder), vocab_size=0))
    assert manifest["eot_token_id"] == tok.token_to_id("<|im_end|>")
    assert manifest["mask_token_id"] == tok.token_to_id("<|mdm_mask|>")
    # --eot-token overrides.
    manifest = prepare_dataset(options(source, tmp_path / "b", tokenizer=str(folder), vocab_size=0,
                                       eot_token="<|endoftext|>"))
    assert manifest["eot_token_id"] == tok.token_to_id("<|endoftext|>")
    # No mask token: refused, naming --add-mask-token; added at the next free id, as memdlm-import-hf adds it.
    bare, tok = hf_tokenizer_dir(tmp_path / "qwen", ["<|endoftext|>", "<|im_start|>"])
    size = tok.get_vocab_size(with_added_tokens=True)
    with pytest.raises(DataError, match="no mask token.*--add-mask-token"):
        prepare_dataset(options(source, tmp_path / "c", tokenizer=str(bare), vocab_size=0))
    manifest = prepare_dataset(options(source, tmp_path / "c", tokenizer=str(bare), vocab_size=0,
                                       add_mask_token="<|mask|>"))
    assert manifest["mask_token_id"] == size and manifest["tokenizer_vocab_size"] == size + 1
    saved = Tokenizer.from_file(str(tmp_path / "c" / "tokenizer.json"))
    assert saved.token_to_id("<|mask|>") == size
    with pytest.raises(DataError, match="already has a mask token"):
        prepare_dataset(options(source, tmp_path / "d", tokenizer=str(folder), add_mask_token="<|mask|>"))
    with pytest.raises(DataError, match="--eot-token: '<nope>' is not a token"):
        prepare_dataset(options(source, tmp_path / "e", tokenizer=str(folder), eot_token="<nope>"))


# -- parts, merge, resume ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def five_files(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("five")
    text = BUNDLED_CORPUS.read_text()
    for i in range(4):
        (folder / f"{i}.txt").write_text(text[i * 30000:(i + 1) * 30000])
    (folder / "4.jsonl").write_bytes((corpus / "c_chat.jsonl").read_bytes())
    return folder


def test_parts_then_merge_give_the_single_preparation(five_files, tokenizer, tmp_path, capsys):
    settings = dict(tokenizer=tokenizer, val_fraction=0.1)
    single = prepare_dataset(options(five_files, tmp_path / "single", **settings))
    out = tmp_path / "parts"
    with pytest.raises(DataError, match="holds no prepared parts"):
        merge_parts(out)
    prepare_dataset(options(five_files, out, num_parts=3, part=2, **settings))
    with pytest.raises(DataError, match=r"2 of 3 parts are not prepared yet \(parts 0-1\)"):
        merge_parts(out)
    assert prepare_main(["--input", str(five_files), "--output", str(out), "--tokenizer", tokenizer, "--seq-len",
                         str(SEQ_LEN), "--vocab-size", str(VOCAB), "--val-fraction", "0.1", "--format", "both",
                         "--samples-per-shard", "40", "--num-workers", "0", "--no-progress", "--num-parts", "3",
                         "--part", "2"]) == 0
    assert "part-00002-of-00003 is already prepared" in capsys.readouterr().err
    prepare_dataset(options(five_files, out, num_parts=3, part=0, **settings))
    prepare_dataset(options(five_files, out, num_parts=3, part=1, seq_len=64, **settings))
    with pytest.raises(DataError, match="part 1 was prepared with other settings than part 0.*differ in seq_len"):
        merge_parts(out)
    import shutil

    shutil.rmtree(out / "parts" / "part-00001-of-00003")
    prepare_dataset(options(five_files, out, num_parts=3, part=1, **settings))
    merged = merge_parts(out)
    assert shard_hashes(merged) == shard_hashes(single)
    assert merged["validation"]["sha256"] == single["validation"]["sha256"]
    assert merged == single, "the same manifest"
    assert not (out / "parts").exists()
    with pytest.raises(DataError, match="already a merged dataset"):
        merge_parts(out)


@pytest.mark.fast
def test_parts_need_one_shared_tokenizer(five_files, tmp_path):
    with pytest.raises(DataError, match="--tokenizer-only"):
        prepare_dataset(options(five_files, tmp_path / "p", num_parts=2, part=0))
    with pytest.raises(DataError, match=r"--part must lie in \[0, 2\)"):
        prepare_dataset(options(five_files, tmp_path / "p", num_parts=2, part=2, tokenizer="x"))


def test_a_killed_preparation_resumes_where_it_stopped(tokenizer, tmp_path):
    """SIGKILL once some files are prepared; the same command again keeps them and writes the same dataset."""
    folder = tmp_path / "in"
    folder.mkdir()
    text = BUNDLED_CORPUS.read_text()
    for i in range(10):
        (folder / f"{i:02d}.txt").write_text(text[i * 100_000:(i + 1) * 100_000])
    args = ["--input", str(folder), "--tokenizer", tokenizer, "--seq-len", str(SEQ_LEN), "--vocab-size", str(VOCAB),
            "--format", "both", "--samples-per-shard", "40", "--num-workers", "0", "--no-progress",
            "--val-fraction", "0.05"]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "launch.prepare_cli", *args, "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    units = tmp_path / ".out.partial" / "units"
    deadline = time.monotonic() + 120
    while not (units.is_dir() and len(list(units.glob("u-*.json"))) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not out.exists()
    done = len(list(units.glob("u-*.json")))
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {done} input file(s) already prepared" in again.stderr
    uninterrupted = prepare_dataset(options(folder, tmp_path / "straight", tokenizer=tokenizer, val_fraction=0.05))
    resumed = json.loads((out / "manifest.json").read_text())
    assert shard_hashes(resumed) == shard_hashes(uninterrupted)
    assert resumed["validation"]["sha256"] == uninterrupted["validation"]["sha256"]
    assert not (tmp_path / ".out.partial").exists()


def _paragraphs_line_by_line(text: str) -> list[str]:
    """The definition: one document per run of lines that are not whitespace alone, each line with its newline."""
    documents, lines = [], []
    for line in [piece + "\n" for piece in text.split("\n")[:-1]] + [text.split("\n")[-1]]:
        if line.strip():
            lines.append(line)
        elif lines:
            documents.append("".join(lines))
            lines = []
    if lines:
        documents.append("".join(lines))
    return documents


@pytest.mark.fast
def test_text_paragraphs_split_by_blocks_equal_the_line_by_line_definition(tmp_path, monkeypatch):
    """The text reader splits 1 MiB blocks with a regular expression; at any block size (down to 1 byte, which
    cuts characters and separators in two) it gives the documents of the line-by-line definition."""
    import random

    from data_pipeline import documents

    rng = random.Random(0)
    pieces = ["abc", "déf", " ", "\t", "\n", "\n\n", " \n", "\r\n", "\u3000", "\u3000\n", "x\n  \n", "\x1c", "ééé",
              "\n \t \n\n", "  "]
    file = tmp_path / "t.txt"
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        file.write_text(text, encoding="utf-8")
        monkeypatch.setattr(documents, "TEXT_BLOCK_BYTES", rng.choice([1, 2, 3, 5, 7, 1 << 20]))
        assert [d.text for d in documents.file_documents(file)] == _paragraphs_line_by_line(text), repr(text)
