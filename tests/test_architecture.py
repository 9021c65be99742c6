"""The floors of DESIGN.md section 4 hold: import-linter's contracts in pyproject.toml are kept."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "0 broken" in result.stdout and "3 kept" in result.stdout
