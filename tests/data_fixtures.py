"""Small prepared datasets for the data-pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.prepare import PrepareOptions, prepare_dataset

SEQ_LEN = 32
VOCAB = 512


def write_corpus(folder: Path, scale: float = 1.0) -> Path:
    """A directory with a text file, a JSONL file of texts and one of prompt/response pairs
    (about 1600 samples of 32 tokens at scale 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = (Path(__file__).resolve().parents[1] / "data_pipeline" / "corpus" / "tinyshakespeare.txt").read_text()
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
