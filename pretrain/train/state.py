"""The trainer's own state, carried by every checkpoint (torchtitan's pattern: a typed object with
``state_dict``/``load_state_dict`` registered with the checkpointer, stored as JSON).

The other registered state is the data feed's loader positions (``pretrain.train.data_feed.DataFeed``);
the weights and the optimizer state are the engine's (``parallel.checkpoint``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed: the data and the noise continue from here
    updates: int = 0  # updates applied: the learning-rate schedule's position (a skipped step does not move it)
    bad_steps: int = 0  # updates skipped in all, counted against --guard.max_bad_steps
    tokens_by_source: dict[str, int] = dataclasses.field(default_factory=dict)  # a mixture's tokens trained on

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name in ("step", "updates", "bad_steps"):
            setattr(self, name, int(state[name]))
        self.tokens_by_source = {str(k): int(v) for k, v in state.get("tokens_by_source", {}).items()}

    @classmethod
    def from_dict(cls, state: dict) -> "TrainState":
        loaded = cls()
        loaded.load_state_dict(state)
        return loaded
