"""How a config field is declared (its ``--help`` text and choices) and checked: ``ConfigError`` names the
field and the fix."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from common.errors import UsageError


class ConfigError(UsageError):
    """A configuration value that cannot work; the message names the field and the fix."""


def param(default: Any, help: str, choices: tuple | None = None):
    """A dataclass field carrying its ``--help`` text (and allowed values, if any)."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check(condition: bool, option: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"--{option}: {message}")


def check_choices(config: Any, section: str) -> None:
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(
                f"--{section}.{f.name}: got {value!r}; choose one of {', '.join(map(str, choices))}"
            )
