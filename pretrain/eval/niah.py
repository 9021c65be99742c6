"""A synthetic needle-in-a-haystack suite, deterministic by seed (after RULER's tasks, written here).

Kinds:
- ``single``: one needle, "The special magic number for {key} is {value}.", hidden at a random depth of
  a haystack of corpus text; the question asks for that key's number;
- ``multi``: several needles with different keys; the question asks for one of them;
- ``vartrack``: a value assigned to a variable and passed along a chain ("VAR AB = 4821." ... "VAR CD =
  VAR AB."), spread through the haystack; the question asks for the last variable's value.

Each example is a prompt (haystack with needles, then the question and the start of the answer
sentence), the answer (" 4821"), and metadata: the token position of every needle and the context
length in tokens. Examples are built to a target length in tokens with the given tokenizer. They can be
written as JSON Lines of ``{"prompt", "response"}`` (a training mixture for ``memdlm-prepare-data``) or
scored: the model generates after the prompt and an answer counts when the generated text starts with
the value (exact match).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UsageError
from data_pipeline.corpus import BUNDLED_CORPUS

KINDS = ("single", "multi", "vartrack")
KEYS = ["apple", "river", "candle", "marble", "falcon", "harbor", "violet", "lantern", "meadow", "copper",
        "thistle", "ember", "glacier", "orchid", "saddle", "willow"]


@dataclass
class NeedleExample:
    kind: str
    prompt: str
    answer: str  # what the model should generate, with its leading space
    context_tokens: int
    target_tokens: int  # the length it was built to (context_tokens is at most about that)
    needle_positions: list[int] = field(default_factory=list)  # token index of each needle in the prompt
    needles: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "response": self.answer, "kind": self.kind,
                "context_tokens": self.context_tokens, "target_tokens": self.target_tokens,
                "needle_positions": self.needle_positions,
                "needles": self.needles}


def _haystack_sentences(corpus: Path) -> list[str]:
    text = corpus.read_text(encoding="utf-8")
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.strip().endswith(":")]
    return [line for line in lines if len(line) > 20]


def _question(kind: str, needles: list[tuple[str, str]], target: str) -> tuple[list[str], str]:
    """(needle sentences, question and answer start) for one example."""
    if kind == "vartrack":
        names = [name for name, _ in needles]
        value = needles[0][1]
        sentences = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return sentences, f" Question: what is the value of VAR {names[-1]}? Answer: VAR {names[-1]} is"
    sentences = [f"The special magic number for {key} is {value}." for key, value in needles]
    return sentences, f" Question: what is the special magic number for {target}? Answer: The special magic number " \
                      f"for {target} is"


def make_example(kind: str, context_tokens: int, encode, rng: random.Random, sentences: list[str],
                 num_needles: int = 4, chain: int = 3) -> NeedleExample:
    """One example of about ``context_tokens`` tokens (``encode``: text -> token ids)."""
    if kind not in KINDS:
        raise UsageError(f"--kinds: unknown needle kind {kind!r}; choose from {', '.join(KINDS)}")
    count = 1 if kind == "single" else (num_needles if kind == "multi" else chain)
    if kind == "vartrack":
        names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2)) for _ in range(count)]
        while len(set(names)) < count:
            names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2)) for _ in range(count)]
        needles = [(name, str(rng.randint(1000, 9999))) for name in names]
        target, value = names[-1], needles[0][1]
    else:
        keys = rng.sample(KEYS, count)
        needles = [(key, str(rng.randint(1000, 9999))) for key in keys]
        target, value = needles[rng.randrange(count)]
    needle_sentences, question = _question(kind, needles, target)
    budget = context_tokens - len(encode(question)) - sum(len(encode(" " + s)) for s in needle_sentences)
    if budget < 0:
        raise UsageError(f"--lengths {context_tokens}: a {kind} example needs at least {context_tokens - budget} "
                         "tokens for its needles and question alone; use longer --lengths")
    start = rng.randrange(len(sentences))
    haystack, used = [], 0
    while True:
        sentence = " " + sentences[(start + len(haystack)) % len(sentences)]
        cost = len(encode(sentence))
        if used + cost > budget:
            break
        haystack.append(sentence)
        used += cost
    # Needles at random depths, in their order (a variable chain must read forwards).
    slots = sorted(rng.randint(0, len(haystack)) for _ in needle_sentences)
    pieces, positions = [], []
    needle_iter = iter(needle_sentences)
    for index in range(len(haystack) + 1):
        while slots and slots[0] == index:
            slots.pop(0)
            text = "".join(pieces)
            positions.append(len(encode(text)) if text else 0)
            pieces.append(" " + next(needle_iter))
        if index < len(haystack):
            pieces.append(haystack[index])
    prompt = "".join(pieces).lstrip() + question
    return NeedleExample(kind, prompt, " " + value, len(encode(prompt)), context_tokens, positions, needle_sentences)


def make_suite(encode, kinds=KINDS, lengths=(128, 256, 512, 1024), per_cell: int = 8, seed: int = 0,
               corpus: Path = BUNDLED_CORPUS) -> list[NeedleExample]:
    """``per_cell`` examples for every (kind, length), the same for the same seed and tokenizer."""
    sentences = _haystack_sentences(Path(corpus))
    examples = []
    for kind in kinds:
        for length in lengths:
            rng = random.Random(f"{seed}:{kind}:{length}")
            examples.extend(make_example(kind, length, encode, rng, sentences) for _ in range(per_cell))
    return examples


def write_jsonl(examples: list[NeedleExample], path: Path) -> None:
    try:
        with open(path, "w") as handle:
            for example in examples:
                handle.write(json.dumps(example.to_json()) + "\n")
    except OSError as err:
        raise UsageError(f"--output {path} cannot be written ({err.strerror})") from None


def exact_match(generated: str, answer: str) -> bool:
    return generated.strip().startswith(answer.strip())


def evaluate_suite(model, examples: list[NeedleExample], generation, adapt: bool = False,
                   batch_size: int = 8) -> dict:
    """Exact-match accuracy by (kind, context length): ``{"kind/length": accuracy, ...}`` plus ``all``
    (``model``: an ``InferenceModel``; ``generation``: a ``GenerationConfig``)."""
    from pretrain.eval.sampling import generate

    hits: dict[str, list[bool]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids = [model.encode(e.prompt) for e in chunk]
        indices = list(range(start, start + len(chunk)))
        fast = model.adapt(ids, indices) if adapt else None
        outputs = generate(model.model, ids, generation, model.mask_id, model.pad_id, model.eot_id, model.vocab_limit,
                           fast, indices)
        for example, tokens in zip(chunk, outputs):
            hits.setdefault(f"{example.kind}/{example.target_tokens}", []).append(
                exact_match(model.decode(tokens), example.answer))
    results = {key: sum(v) / len(v) for key, v in sorted(hits.items())}
    results["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return results
