"""megatron-core imports in one place, with its import-time noise silenced.

megatron-core warns at import that Transformer Engine and Apex are missing and torch
logs that no CUDA runtime was found; neither matters for these layers, so both are
filtered here rather than shown to every user on every run.
"""

import logging
import warnings

logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        vocab_parallel_cross_entropy,
    )
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
    )

__all__ = [
    "parallel_state",
    "ModelParallelConfig",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "VocabParallelCrossEntropy",
    "set_tensor_model_parallel_attributes",
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
]
