"""Every torch.load in the repository says weights_only=True: a pickle from a results folder or a
cache must not be able to run code, whatever torch's default is in the installed version."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("adakv_vllm", "examples", "benchmarks", "tests")
SOURCES = sorted(path for folder in FOLDERS for path in (REPO / folder).rglob("*.py"))


def _unsafe_loads(source: str) -> list[int]:
    """Line numbers of torch.load calls without a literal weights_only=True."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize(
    "source, expected",
    [
        ("torch.load(p)", [1]),
        ("torch.load(p, weights_only=False)", [1]),
        ("x = 1\ntorch.load(p, map_location='cpu')", [2]),
        ("torch.load(p, weights_only=True)", []),
        ("torch.save(x, p)\nmodel.load(p)", []),
    ],
)
def test_checker_finds_unsafe_loads(source, expected):
    assert _unsafe_loads(source) == expected


def test_every_torch_load_is_weights_only():
    assert SOURCES, "no sources found"
    unsafe = {str(path.relative_to(REPO)): _unsafe_loads(path.read_text()) for path in SOURCES}
    assert {name: lines for name, lines in unsafe.items() if lines} == {}
