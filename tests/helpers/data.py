"""Small corpora and prepared datasets: mixed-format corpora for the data-pipeline tests, and the small
prepared dataset that training tests use wherever the full bundled corpus is not the point."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.prepare import PrepareOptions, prepare_dataset
from tests.helpers import BUNDLED_CORPUS

SEQ_LEN = 32
VOCAB = 512


def write_corpus(folder: Path, scale: float = 1.0) -> Path:
    """A directory with a text file, a JSONL file of texts and one of prompt/response pairs
    (about 1600 samples of 32 tokens at scale 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = BUNDLED_CORPUS.read_text()
    (folder / "a_plays.txt").write_text(source[:int(60000 * scale)])
    paragraphs = [p for p in source[60000:120000].split("\n\n") if p.strip()]
    texts, chats = int(200 * scale), int(100 * scale)
    with open(folder / "b_texts.jsonl", "w") as handle:
        for p in paragraphs[:texts]:
            handle.write(json.dumps({"text": p}) + "\n")
    with open(folder / "c_chat.jsonl", "w") as handle:
        for p, q in zip(paragraphs[texts:texts + chats], paragraphs[texts + chats:texts + 2 * chats]):
            handle.write(json.dumps({"prompt": p, "response": q}) + "\n")
    return folder


def prepare(corpus: Path, output: Path, formats=("mds", "webdataset"), samples_per_shard=40, num_workers=0, **kw):
    return prepare_dataset(PrepareOptions(
        input=str(corpus), output=str(output), formats=list(formats), seq_len=SEQ_LEN, vocab_size=VOCAB,
        samples_per_shard=samples_per_shard, num_workers=num_workers, progress=False, **kw,
    ))


SMALL_CORPUS_CHARS = 300_000  # about a quarter of the bundled corpus: a BPE trains on it in a second


def prepare_small_corpus(output: Path, seq_len: int = SEQ_LEN, vocab_size: int = VOCAB) -> Path:
    """The first ``SMALL_CORPUS_CHARS`` of the bundled corpus prepared (byte-level BPE, MDS and webdataset
    shards of 200 samples, 2% of the documents held out for validation) into ``output``; returns it."""
    text = output.parent / f"{output.name}.txt"
    text.write_text(BUNDLED_CORPUS.read_text()[:SMALL_CORPUS_CHARS])
    prepare_dataset(PrepareOptions(
        input=str(text), output=str(output), formats=["mds", "webdataset"], seq_len=seq_len, vocab_size=vocab_size,
        samples_per_shard=200, num_workers=0, progress=False, val_fraction=0.02,
    ))
    return output
