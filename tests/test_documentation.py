"""The documentation points at things that exist: the design document is in the repository and every citation
of it names a section it has; every repository path the README and the design document name exists; every
dotted name of the project in the documentation and the code's docstrings imports."""

import importlib
import re
import subprocess

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.fast  # in-process: part of the edit loop's tier (-m fast)

PACKAGES = ("common", "data_pipeline", "parallel", "pretrain", "launch")
TOP_FOLDERS = (*PACKAGES, "tests", "benchmarks", "scripts", "docker", "docs")


def _tracked(*suffixes: str) -> list:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith(suffixes) and (ROOT / n).is_file()]


def _sections() -> set[str]:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    return set(re.findall(r"^## (\d+)\.", text, flags=re.M))


def test_every_citation_of_the_design_document_names_a_section_it_has():
    sections = _sections()
    assert len(sections) >= 8
    citations = 0
    for path in _tracked(".py", ".md", ".toml", ".sh"):
        text = path.read_text()
        for match in re.finditer(r"(\S*)DESIGN\.md((?: sections?)? ([\d, and]+))?", text):
            prefix, _, numbers = match.groups()
            if path in (ROOT / "docs" / "DESIGN.md", ROOT / "tests" / "test_documentation.py"):
                continue
            assert prefix.endswith("docs/"), (
                f"{path.relative_to(ROOT)} cites {match.group(0)!r}: the design document is docs/DESIGN.md")
            for number in re.findall(r"\d+", numbers or ""):
                assert number in sections, f"{path.relative_to(ROOT)} cites section {number} of docs/DESIGN.md"
            citations += 1
    assert citations >= 5
    outside = "../" + "shared"  # spelled apart so that this file does not match itself
    for path in _tracked(".py", ".md", ".toml", ".sh"):
        assert outside not in path.read_text(), f"{path.relative_to(ROOT)} refers to a file outside the repository"


def test_paths_named_in_the_readme_and_the_design_exist():
    pattern = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w/])" % "|".join(TOP_FOLDERS))
    for document in ("README.md", "docs/DESIGN.md", "benchmarks/RESULTS.md"):
        for path in pattern.findall((ROOT / document).read_text()):
            if any(c.isupper() for c in path.split("/")[-1]) and not path.endswith(".md"):
                continue  # a placeholder such as checkpoints/step_NNNNNN
            assert (ROOT / path).exists(), f"{document} names {path}, which does not exist"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                target = getattr(target, name)
        except AttributeError:
            return False
        return True
    return False


def test_dotted_names_of_the_project_import():
    pattern = re.compile(r"``((?:%s)(?:\.\w+)+)``|`((?:%s)(?:\.\w+)+)`" % ("|".join(PACKAGES), "|".join(PACKAGES)))
    unresolved = set()
    for path in _tracked(".py", ".md"):
        if "/remote/" in str(path) or path.name == "lm_eval_model.py":
            continue  # copied into exports as they are / needs the optional lm-eval
        for groups in pattern.findall(path.read_text()):
            dotted = (groups[0] or groups[1]).rstrip(".")
            if dotted.endswith(".py") or not _resolves(dotted):
                unresolved.add(f"{path.relative_to(ROOT)}: {dotted}")
    assert not unresolved, sorted(unresolved)
