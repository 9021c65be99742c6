"""The layers of docs/DESIGN.md hold: every import-linter contract of pyproject.toml is present and kept,
checked by name (a contract removed from the file, or broken by an import, fails here)."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)

EXPECTED = {"floors", "pretrain-floors", "parallel-floors", "no-cycles", "independent-engines"}


def _words(text: str) -> str:
    return " ".join(text.split())  # lint-imports wraps long names across lines


def test_every_layer_contract_is_declared_and_kept():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert {c["id"] for c in contracts} >= EXPECTED, "a layer contract is missing from pyproject.toml"
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    report = _words(result.stdout)
    for contract in contracts:
        assert f"{_words(contract['name'])} KEPT" in report, (contract["id"], result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-4000:]
