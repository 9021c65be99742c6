"""Command-line overrides for the dataclass configs: ``--section.field value``.

Parsing is generic over ``pretrain.config.SECTIONS`` so a new config field is a new
command-line option with its help text, with no parser code to touch.
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
import tomllib
from pathlib import Path

from pretrain.config import SECTIONS, ConfigError, RunConfig

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_table() -> dict[str, dataclasses.Field]:
    return {
        f"{section}.{f.name}": f
        for section, section_cls in SECTIONS.items()
        for f in dataclasses.fields(section_cls)
    }


def _default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _convert(option: str, f: dataclasses.Field, raw):
    """Turn a command-line string (or a TOML value) into the field's type."""
    kind = type(_default_of(f))
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"--{option} expects true or false, got {raw!r}")
    if kind is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ConfigError(f"--{option} expects an integer, got {raw!r}")
        try:
            return int(raw) if not isinstance(raw, str) else int(raw.strip(), 0)
        except ValueError:
            raise ConfigError(f"--{option} expects an integer, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"--{option} expects a number, got {raw!r}") from None
    return str(raw)


def _unknown_option(option: str, table: dict) -> ConfigError:
    close = difflib.get_close_matches(option, list(table), n=1, cutoff=0.6)
    hint = f"; did you mean --{close[0]}?" if close else "; see --help for the list of options"
    return ConfigError(f"unknown option --{option}{hint}")


def _load_toml(path: str) -> dict[str, object]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: file {path!r} does not exist; pass a TOML file with [section] tables")
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config: {path} is not valid TOML ({err})") from None
    flat = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"--config: {path}: top-level key {section!r} must be a [section] table")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_overrides(argv: list[str]) -> dict[str, object]:
    """Split ``argv`` into ``{"section.field": raw value}``; ``--config FILE`` is read first."""
    table = _field_table()
    raw: dict[str, object] = {}
    pending = list(argv)
    config_files = []
    pairs = []
    while pending:
        token = pending.pop(0)
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; options look like --section.field value")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if not pending or (pending[0].startswith("--") and not _looks_negative(pending[0])):
                raise ConfigError(f"--{name} needs a value")
            value = pending.pop(0)
        if name == "config":
            config_files.append(value)
        else:
            pairs.append((name, value))
    for path in config_files:
        for name, value in _load_toml(path).items():
            if name not in table:
                raise _unknown_option(name, table)
            raw[name] = value
    for name, value in pairs:
        if name not in table:
            raise _unknown_option(name, table)
        raw[name] = value
    return raw


def _looks_negative(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def build_config(argv: list[str]) -> RunConfig:
    """The run config from defaults, then ``--config`` files, then ``--section.field`` options."""
    table = _field_table()
    values: dict[str, dict] = {section: {} for section in SECTIONS}
    for name, raw in parse_overrides(argv).items():
        section, field_name = name.split(".", 1)
        values[section][field_name] = _convert(name, table[name], raw)
    return RunConfig.from_dict(values)


def format_help(prog: str, description: str, extra_options: list[tuple[str, str]] = ()) -> str:
    """``--help`` text: every field of every section with its type, default and meaning."""
    lines = [f"usage: {prog} [--config FILE.toml] [--section.field VALUE ...]", "", description, ""]
    lines.append("general options:")
    general = [("-h, --help", "show this help and exit"),
               ("--config FILE", "a TOML file of [section] tables; command-line options override it")]
    for flag, text in general + list(extra_options):
        lines.append(f"  {flag:<34} {text}")
    for section, section_cls in SECTIONS.items():
        lines.append("")
        lines.append(f"{section}: {(section_cls.__doc__ or '').strip()}")
        for f in dataclasses.fields(section_cls):
            default = _default_of(f)
            kind = type(default).__name__
            if kind == "str":
                choices = f.metadata.get("choices")
                kind = "|".join(choices) if choices else "STR"
            flag = f"--{section}.{f.name} {kind.upper() if kind in ('int', 'float', 'bool') else kind}"
            text = f"{f.metadata.get('help', '')} (default: {default!r})"
            wrapped = textwrap.wrap(text, width=76)
            lines.append(f"  {flag}")
            lines.extend(f"      {w}" for w in wrapped)
    return "\n".join(lines) + "\n"
