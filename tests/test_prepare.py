"""memdlm-prepare-data: round trips through both shard formats, determinism, bad input."""

import json

import numpy as np
import pytest
import webdataset as wds
from tokenizers import Tokenizer

from data_pipeline.errors import DataError
from data_pipeline.loader import open_streaming_dataset
from data_pipeline.readers import MaskingCollate, MaskingSpec
from data_pipeline.shards import decode_webdataset_sample
from data_pipeline.trajectory import TrajectorySpec
from tests.helpers.data import SEQ_LEN, VOCAB, prepare


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    return out, prepare(corpus, out)


def reference_packing(corpus, tokenizer_file, manifest):
    """Packing written out plainly: each file's documents in order, EOT after each, cut every SEQ_LEN, the
    file's last sample padded; the files one after the other."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    eot, pad = manifest["eot_token_id"], manifest["pad_token_id"]
    plays = []
    paragraph = []
    for line in (corpus / "a_plays.txt").read_text().splitlines(keepends=True) + ["\n"]:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            plays.append(("", "".join(paragraph)))
            paragraph = []
    texts = [("", json.loads(line)["text"]) for line in (corpus / "b_texts.jsonl").read_text().splitlines()]
    chats = [(r["prompt"], r["response"]) for r in map(json.loads, (corpus / "c_chat.jsonl").read_text().splitlines())]
    parts = [_pack_plainly(docs, tok, eot, pad) for docs in (plays, texts, chats)]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def _pack_plainly(docs, tok, eot, pad):
    tokens, maskable, starts = [], [], []
    for prompt, text in docs:
        p = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
        t = tok.encode(text, add_special_tokens=False).ids + [eot]
        starts.append(len(tokens))
        tokens += p + t
        maskable += [False] * len(p) + [True] * len(t)
    n = -(-len(tokens) // SEQ_LEN)
    padded = np.full(n * SEQ_LEN, pad)
    padded[:len(tokens)] = tokens
    real = np.zeros(n * SEQ_LEN, dtype=bool)
    real[:len(tokens)] = True
    mask = np.zeros(n * SEQ_LEN, dtype=bool)
    mask[:len(tokens)] = maskable
    start = np.zeros(n * SEQ_LEN, dtype=bool)
    start[starts] = True
    shape = (n, SEQ_LEN)
    return padded.reshape(shape), real.reshape(shape), mask.reshape(shape), start.reshape(shape)


def read_mds(root):
    dataset = open_streaming_dataset(local=str(root / "mds"), remote=None, shuffle=False)  # a test beside may race
    try:
        return [dataset[i] for i in range(len(dataset))]
    finally:
        del dataset


def read_webdataset(root, manifest):
    shards = [str(root / "webdataset" / s["file"]) for s in manifest["formats"]["webdataset"]["shards"]]
    raws = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    return [decode_webdataset_sample(raw, index) for index, raw in enumerate(raws)]


@pytest.mark.fast
def test_round_trip_both_formats(corpus, prepared):
    root, manifest = prepared
    tokens, real, maskable, starts = reference_packing(corpus, root / "tokenizer.json", manifest)
    assert manifest["num_samples"] == len(tokens)
    assert manifest["num_tokens"] == int(real.sum())
    collate = MaskingCollate(MaskingSpec(0, TrajectorySpec(), 1e-3, SEQ_LEN, VOCAB))
    for name, samples in (("mds", read_mds(root)), ("webdataset", read_webdataset(root, manifest))):
        assert [s["sample_index"] for s in samples] == list(range(len(tokens))), name
        got = np.stack([np.asarray(s["tokens"]) for s in samples])
        assert np.array_equal(got, tokens), name
        for s in samples:
            s["epoch"] = 0
        batch = collate(samples)
        assert np.array_equal(batch.maskable.numpy(), maskable & real), name
        padding = batch.key_padding_mask.numpy() if batch.key_padding_mask is not None else np.ones_like(real)
        assert np.array_equal(padding, real), name
        segments = batch.segment_ids.numpy()
        changes = np.zeros_like(starts)
        changes[:, 1:] = segments[:, 1:] != segments[:, :-1]
        changes[:, 0] = segments[:, 0] == 1  # a document starting at position 0 opens segment 1
        assert np.array_equal(changes & real, starts), name
    assert (~maskable & real).sum() > 100, "the prompt/response file must contribute prompt tokens"


def test_parallel_tokenization_writes_identical_shards(corpus, prepared, tmp_path):
    root, manifest = prepared
    again = prepare(corpus, tmp_path / "parallel", num_workers=2,
                    tokenizer=str(root / "tokenizer.json"))
    for name in ("mds", "webdataset"):
        ours = [s["sha256"] for s in manifest["formats"][name]["shards"]]
        theirs = [s["sha256"] for s in again["formats"][name]["shards"]]
        assert ours == theirs, name


@pytest.mark.fast
def test_manifest_records_shards_and_ids(prepared):
    root, manifest = prepared
    for key in ("seq_len", "vocab_size", "mask_token_id", "num_samples", "num_tokens", "tokenizer"):
        assert key in manifest
    for name in ("mds", "webdataset"):
        shards = manifest["formats"][name]["shards"]
        assert sum(s["samples"] for s in shards) == manifest["num_samples"]
        assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in shards)
    assert (root / "mds" / "index.json").is_file()


@pytest.mark.fast
@pytest.mark.parametrize("make_input, message", [
    (lambda d: d, "holds no non-empty files"),
    (lambda d: (d / "e.txt").write_text("") and d, "holds no non-empty files"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n') and d, "bad.jsonl:2: not valid JSON"),
    (lambda d: (d / "odd.jsonl").write_text('{"title": "x"}\n') and d, "needs a 'text' field"),
    (lambda d: (d / "bin.txt").write_bytes(b"\xff\xfe\x00abc") and d, "bin.txt: invalid UTF-8 at byte 0"),
])
def test_bad_input_is_named(tmp_path, make_input, message):
    folder = tmp_path / "in"
    folder.mkdir()
    make_input(folder)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        prepare(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "a failed preparation leaves no dataset behind"


def test_cli_prepares_and_refuses_to_overwrite(corpus, tmp_path, capsys):
    from launch.prepare_cli import main

    out = tmp_path / "cli"
    command = ["--input", str(corpus / "a_plays.txt"), "--output", str(out), "--format", "webdataset", "--seq-len",
               "64", "--vocab-size", "400", "--no-progress"]
    assert main(command) == 0
    assert "prepared" in capsys.readouterr().out and (out / "webdataset" / "u-000000" / "shard-000000.tar").is_file()
    assert main(command) == 2
    assert "holds an earlier output of memdlm-prepare-data; pass --overwrite" in capsys.readouterr().err
    assert main(["--input", "/nonexistent/x.txt"] + command[2:]) == 2
    assert "does not exist" in capsys.readouterr().err
