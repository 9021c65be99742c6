"""The sampler's settings (``--gen.*``), apart from the sampler so that the command-line tools can show
their defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import UsageError


@dataclass(frozen=True)
class GenerationConfig:
    length: int = 64  # tokens to generate
    steps: int = 64  # denoising steps in all (a multiple of the number of blocks)
    block_length: int = 0  # semi-autoregressive block size; 0 = one block (the whole answer)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    remasking: str = "low_confidence"  # or "random"
    stop_at_eot: bool = True  # cut each answer at its first end-of-document token
    padding_side: str = "right"  # or "left"
    seed: int = 0

    def check(self) -> None:
        blocks = self.length // (self.block_length or self.length)
        if self.length < 1 or self.steps < 1:
            raise UsageError(f"--gen.length and --gen.steps must be positive, got {self.length} and {self.steps}")
        if self.block_length and self.length % self.block_length:
            raise UsageError(f"--gen.block_length {self.block_length} does not divide --gen.length {self.length}")
        if self.steps % blocks:
            raise UsageError(f"--gen.steps {self.steps} is not a multiple of the {blocks} blocks "
                             f"(--gen.length / --gen.block_length)")
        if self.remasking not in ("low_confidence", "random") or self.padding_side not in ("left", "right"):
            raise UsageError("--gen.remasking: low_confidence or random; --gen.padding_side: left or right")


