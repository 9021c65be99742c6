"""The Docker image cannot be built here; its pins are checked instead: every dependency of pyproject.toml
is pinned in docker/constraints.txt to a version inside its range, and the Dockerfile and
scripts/setup_venv.sh install those pins."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_dependency_is_pinned_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["eval"]]
    pins = _pins()
    for requirement in requirements:
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} has no pin in docker/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], requirement)


def test_the_dockerfile_and_the_venv_script_install_the_pins():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup_venv.sh").read_text()
    pins = _pins()
    torch = f"torch=={pins['torch']} torchvision=={pins['torchvision']}"
    assert f"pip install {torch}" in dockerfile and f"MEMDLM_TORCH_SPEC:-{torch}" in setup
    assert "pip install -c docker/constraints.txt ." in dockerfile and "COPY docker/constraints.txt" in dockerfile
    assert "-c docker/constraints.txt" in setup
    assert re.search(r'ENTRYPOINT \["memdlm-pretrain"\]', dockerfile)
    python = re.search(r"FROM python:(\d+\.\d+)", dockerfile).group(1)
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Requirement(f"python{required}").specifier.contains(python)
    for package in ("pretrain", "parallel", "data_pipeline", "launch"):
        assert f"COPY {package} ./{package}" in dockerfile
