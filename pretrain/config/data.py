"""Where the training data comes from and how it is read (``--data.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.fields import check, check_choices, param


@dataclass
class DataConfig:
    """Training data: a prepared shard dataset, or raw text prepared on first use."""

    path: str = param(
        "", "a prepared dataset directory (memdlm-prepare-data), a text/JSONL file or directory of them "
        "(prepared into the cache on first use), or empty for the bundled TinyShakespeare corpus"
    )
    sources: str = param(
        "", "a weighted mixture of prepared datasets instead of --data.path: NAME=PATH[:WEIGHT],... (weights "
        "default to the sources' sizes; the same tokenizer and sequence length; MDS only); the loss, tokens and "
        "held-out loss of each source are logged (loss_by_source, tokens_by_source, eval_loss_by_source)")
    format: str = param("mds", "shard format to read: mds (mosaicml-streaming) or webdataset", ("mds", "webdataset"))
    tokenizer: str = param(
        "", "for raw input: a tokenizer.json or Hugging Face tokenizer directory; empty trains a byte-level BPE"
    )
    cache_dir: str = param("", "where raw input is prepared (default $MEMDLM_CACHE_DIR or ~/.cache/memdlm)")
    num_workers: int = param(1, "DataLoader worker processes that read shards and build masked batches")
    shuffle: bool = param(True, "shuffle samples (MDS) or shards (webdataset) each epoch, from --train.seed")
    num_canonical_nodes: int = param(
        1, "MDS: the canonical node count that fixes the global sample order; keep it when the rank count changes"
    )
    shuffle_block_size: int = param(0, "MDS: shuffle block size in samples (0: mosaicml-streaming's default)")
    verify_hashes: bool = param(True, "check every shard's sha256 against the manifest before training")
    document_attention: bool = param(False, "keep attention within each packed document")
    max_skipped_samples: int = param(
        0, "webdataset: damaged samples that may be skipped (counted and logged) before failing; 0 fails at once"
    )
    prepare_workers: int = param(1, "tokenization processes when raw input is prepared on first use")
    eot_target: bool = param(
        True, "the end-of-text token that ends every document is a prediction target (masked and scored like any "
        "token, so the model learns where documents end, as LLaDA's pretraining); false: always visible, never "
        "scored. Padding is never scored either way")
    random_length_fraction: float = param(
        0.0, "the share of training samples cut to a random length (uniform in 1..their length; the rest becomes "
        "padding), drawn from the seed and the sample index, so the model meets short inputs (LLaDA: 0.01)")
    val_fraction: float = param(
        0.02, "raw input prepared on first use: the share of its documents held out as the validation split "
        "(--eval.*); prepared datasets carry their own (memdlm-prepare-data --val-fraction)")

    @property
    def num_sources(self) -> int:
        """The sources of a mixture (1 for one dataset)."""
        return max(1, len([item for item in self.sources.split(",") if item.strip()]))

    def __post_init__(self):
        check_choices(self, "data")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.num_canonical_nodes >= 1, "data.num_canonical_nodes", "must be >= 1")
        check(self.shuffle_block_size >= 0, "data.shuffle_block_size", "must be >= 0")
        check(self.max_skipped_samples >= 0, "data.max_skipped_samples", "must be >= 0")
        check(self.prepare_workers >= 0, "data.prepare_workers", "must be >= 0")
        check(0 <= self.val_fraction < 1, "data.val_fraction", "must lie in [0, 1)")
        check(0 <= self.random_length_fraction <= 1, "data.random_length_fraction", "must lie in [0, 1]")
        check(not (self.sources and self.path), "data.sources",
               "replaces --data.path (a mixture of prepared datasets); give one of them")
        check(not (self.sources and self.format != "mds"), "data.sources",
               "reads MDS shards only (webdataset mixtures are not supported); use --data.format mds")
