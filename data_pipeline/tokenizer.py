"""Byte-level BPE tokenizers: trained locally with ``tokenizers`` (and cached), or loaded.

Special tokens: ``<|endoftext|>`` ends every document, ``<|mask|>`` is the diffusion mask
token, ``<|pad|>`` pads. A loaded tokenizer must already contain a mask token; one missing is
an error that says which names were looked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.errors import DataError

EOT_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOT_TOKEN, MASK_TOKEN, PAD_TOKEN]
_MASK_NAMES = (MASK_TOKEN, "<|mdm_mask|>", "[MASK]", "<mask>")
_EOT_NAMES = (EOT_TOKEN, "</s>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<eos>")


@dataclass
class TokenizerInfo:
    tokenizer: Tokenizer
    path: Path  # the tokenizer.json it came from
    eot_id: int
    mask_id: int
    pad_id: int | None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def find_mask_token(tokenizer: Tokenizer) -> int | None:
    """The id of the tokenizer's mask token, under any of the usual names, or None."""
    return _first_present(tokenizer, _MASK_NAMES)


def _first_present(tokenizer: Tokenizer, names) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def describe(tokenizer: Tokenizer, path: Path) -> TokenizerInfo:
    mask_id = _first_present(tokenizer, _MASK_NAMES)
    if mask_id is None:
        raise DataError(
            f"tokenizer {path} has no mask token (looked for {', '.join(_MASK_NAMES)}); "
            f"add one, e.g. tokenizer.add_special_tokens(['{MASK_TOKEN}']), or let memdlm-prepare-data train one"
        )
    eot_id = _first_present(tokenizer, _EOT_NAMES)
    if eot_id is None:
        raise DataError(f"tokenizer {path} has no end-of-document token (looked for {', '.join(_EOT_NAMES)})")
    return TokenizerInfo(tokenizer, path, eot_id, mask_id, tokenizer.token_to_id(PAD_TOKEN))


def load_tokenizer(path: str | Path) -> TokenizerInfo:
    """A ``tokenizer.json`` file, or a Hugging Face tokenizer directory that holds one."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"--tokenizer: {path} is neither a tokenizer.json file nor a directory containing one"
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises plain Exceptions for malformed files
        raise DataError(f"--tokenizer: {file} could not be read as a tokenizer ({err})") from None
    return describe(tokenizer, file)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with our special tokens, trained on ``texts`` (streamed)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def limit_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The first texts of ``texts`` up to about ``max_bytes`` of UTF-8 (0: no limit)."""
    seen = 0
    for text in texts:
        yield text
        seen += len(text.encode("utf-8"))
        if max_bytes and seen >= max_bytes:
            return
