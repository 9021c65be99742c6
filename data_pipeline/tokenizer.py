"""Tokenizers: a byte-level BPE trained locally with ``tokenizers`` (and cached), or any Hugging Face
tokenizer (a ``tokenizer.json``, or a model directory holding one), of any vocabulary size.

Special tokens of a trained BPE: ``<|endoftext|>`` ends every document, ``<|mask|>`` is the diffusion mask
token, ``<|pad|>`` pads. A loaded tokenizer's are found in this order: the name given (``--eot-token``,
``--mask-token``); the directory's ``tokenizer_config.json`` / ``special_tokens_map.json`` (``eos_token``,
``mask_token``, ``pad_token``); the usual names (LLaDA's ``<|mdm_mask|>``, Llama-3's ``<|end_of_text|>``, ...).
A tokenizer without a mask token is refused with the names looked for, unless ``--add-mask-token`` adds one
(as ``memdlm-import-hf`` does, at the next free id, so the two agree).

``vocabulary_sha256`` identifies a tokenizer by its vocabulary (every token and id, added tokens included):
the prepared dataset's manifest records it, and training refuses a model whose tokenizer differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.errors import DataError

EOT_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOT_TOKEN, MASK_TOKEN, PAD_TOKEN]
MASK_NAMES = (MASK_TOKEN, "<|mdm_mask|>", "[MASK]", "<mask>")
EOT_NAMES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<|eot_id|>", "<eos>", "[SEP]")
PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass
class TokenizerInfo:
    tokenizer: Tokenizer
    path: Path  # the tokenizer.json it came from
    eot_id: int
    mask_id: int
    pad_id: int | None

    @property
    def vocab_size(self) -> int:
        """Ids in use: one past the largest (added tokens may sit above the base vocabulary)."""
        return vocabulary_size(self.tokenizer)


def vocabulary_size(tokenizer: Tokenizer) -> int:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def vocabulary_sha256(tokenizer: Tokenizer) -> str:
    """A hash of every (token, id) pair, added tokens included: two tokenizers that map text to the same
    ids on the same vocabulary have the same one, however their files are formatted."""
    pairs = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def find_mask_token(tokenizer: Tokenizer) -> int | None:
    """The id of the tokenizer's mask token, under any of the usual names, or None."""
    return _first_present(tokenizer, MASK_NAMES)


def _first_present(tokenizer: Tokenizer, names) -> int | None:
    for name in names:
        if name is None:
            continue
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _configured_tokens(folder: Path | None) -> dict[str, str]:
    """``eos_token`` / ``mask_token`` / ``pad_token`` of a Hugging Face tokenizer directory's config files
    (a string, or a dict with ``content``)."""
    found: dict[str, str] = {}
    if folder is None:
        return found
    for name in _CONFIG_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        for key in ("eos_token", "mask_token", "pad_token"):
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and key not in found:
                found[key] = value
    return found


def describe(tokenizer: Tokenizer, path: Path, eot_token: str = "", mask_token: str = "",
             config_dir: Path | None = None) -> TokenizerInfo:
    """The tokenizer with its end-of-text, mask and padding ids (see the module docstring for the search)."""
    configured = _configured_tokens(config_dir)
    if eot_token and tokenizer.token_to_id(eot_token) is None:
        raise DataError(f"--eot-token: {eot_token!r} is not a token of {path}")
    if mask_token and tokenizer.token_to_id(mask_token) is None:
        raise DataError(f"--mask-token: {mask_token!r} is not a token of {path}; add it with --add-mask-token")
    mask_id = _first_present(tokenizer, (mask_token or None, configured.get("mask_token"), *MASK_NAMES))
    if mask_id is None:
        raise DataError(
            f"tokenizer {path} has no mask token (looked for {', '.join(MASK_NAMES)}); add one with --add-mask-token "
            f"(memdlm-import-hf adds the same one to a model and grows its embedding), or name it with --mask-token"
        )
    eot_id = _first_present(tokenizer, (eot_token or None, configured.get("eos_token"), *EOT_NAMES))
    if eot_id is None:
        raise DataError(f"tokenizer {path} has no end-of-text token (looked for {', '.join(EOT_NAMES)}); name the "
                        "token that ends a document with --eot-token")
    pad_id = _first_present(tokenizer, (configured.get("pad_token"), *PAD_NAMES))
    return TokenizerInfo(tokenizer, path, eot_id, mask_id, pad_id)


def tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"--tokenizer: {path} is neither a tokenizer.json file nor a directory containing one (a "
                        "Hugging Face model directory with a fast tokenizer)")
    return file


def read_tokenizer(path: str | Path) -> Tokenizer:
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises plain Exceptions for malformed files
        raise DataError(f"--tokenizer: {file} could not be read as a tokenizer ({err})") from None


def add_mask_token(tokenizer: Tokenizer, name: str = MASK_TOKEN) -> int:
    """Add ``name`` as a special token at the next free id (refused when the tokenizer has a mask token)."""
    existing = find_mask_token(tokenizer)
    if existing is not None:
        raise DataError(f"--add-mask-token: the tokenizer already has a mask token "
                        f"({tokenizer.id_to_token(existing)!r}, id {existing}); drop the option")
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    return tokenizer.token_to_id(name)


def load_tokenizer(path: str | Path, eot_token: str = "", mask_token: str = "",
                   add_mask: str = "") -> TokenizerInfo:
    """A ``tokenizer.json`` file, or a Hugging Face tokenizer directory that holds one; ``add_mask``: the name
    of a mask token to add."""
    file = tokenizer_file(path)
    tokenizer = read_tokenizer(file)
    if add_mask:
        add_mask_token(tokenizer, add_mask)
    return describe(tokenizer, file, eot_token, mask_token, file.parent)


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
