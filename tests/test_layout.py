"""The one-way dependency the architecture promises: distill imports precompute,
never the other way, and only precompute.teachers imports open_clip / timm."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "precompute").glob("*.py")), ids=lambda p: p.name)
def test_precompute_never_imports_distill(path):
    assert not {m for m in imported_modules(path) if m.split(".")[0] == "distill"}


@pytest.mark.parametrize("path", sorted((ROOT / "distill").glob("*.py")), ids=lambda p: p.name)
def test_distill_never_imports_a_teacher(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("open_clip", "timm")
           or m == "precompute.teachers" or m == "precompute.build"}
    assert not bad
