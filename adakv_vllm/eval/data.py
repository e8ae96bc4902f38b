"""Benchmark data from ../shared/data (never a hub): zero-shot multiple choice and WikiText-2.

Prompt formats follow lm-eval-harness's tasks (context, then each choice as a continuation scored by
its log-likelihood; acc_norm divides by the continuation's length in characters), with the caveats
in each dataset's SOURCE.md (e.g. HellaSwag's text preprocessing differs slightly from lm-eval's).
Examples are taken in file order, so `--limit N` selects the same examples for every config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

DATA_ENV = "ADAKV_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class Choice:
    context: str
    continuation: str


@dataclasses.dataclass(frozen=True)
class MCExample:
    choices: tuple[Choice, ...]
    label: int


def data_dir() -> Path:
    explicit = os.environ.get(DATA_ENV)
    if explicit:
        return Path(explicit)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
        candidate = parent.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"benchmark data not found: set {DATA_ENV} to the folder holding hellaswag/, piqa/, ..."
    )


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def hellaswag_rows(root: Path) -> list[dict]:
    """HellaSwag's validation rows in file order (the file ships in parts)."""
    rows = []
    for part in sorted((root / "hellaswag").glob("hellaswag_val.part*.jsonl")):
        rows += _jsonl(part)
    return rows


def boolq_rows(root: Path) -> list[dict]:
    return _jsonl(root / "boolq" / "val.jsonl")


def hellaswag(root: Path) -> list[MCExample]:
    rows = hellaswag_rows(root)
    return [
        MCExample(tuple(Choice(r["query"], " " + e) for e in r["endings"]), int(r["label"])) for r in rows
    ]


def arc_easy(root: Path) -> list[MCExample]:
    out = []
    for r in _jsonl(root / "arc_easy" / "ARC-Easy-Test.jsonl"):
        context = f"Question: {r['question']['stem']}\nAnswer:"
        labels = [c["label"] for c in r["question"]["choices"]]
        choices = tuple(Choice(context, " " + c["text"]) for c in r["question"]["choices"])
        out.append(MCExample(choices, labels.index(r["answerKey"])))
    return out


def piqa(root: Path) -> list[MCExample]:
    rows = _jsonl(root / "piqa" / "valid.jsonl")
    labels = _lines(root / "piqa" / "valid-labels.lst")
    out = []
    for r, label in zip(rows, labels, strict=True):
        context = f"Question: {r['goal']}\nAnswer:"
        out.append(
            MCExample((Choice(context, " " + r["sol1"]), Choice(context, " " + r["sol2"])), int(label))
        )
    return out


def winogrande(root: Path) -> list[MCExample]:
    """lm-eval's partial evaluation: the option fills the blank in the context; the rest is scored."""
    out = []
    for r in _jsonl(root / "winogrande" / "dev.jsonl"):
        before, after = r["sentence"].split("_", 1)
        continuation = " " + after.strip()
        choices = tuple(Choice(before + r[f"option{i}"], continuation) for i in (1, 2))
        out.append(MCExample(choices, int(r["answer"]) - 1))
    return out


def openbookqa(root: Path) -> list[MCExample]:
    out = []
    for r in _jsonl(root / "openbookqa" / "test.jsonl"):
        choices = tuple(Choice(r["question_stem"], " " + t) for t in r["choices"]["text"])
        out.append(MCExample(choices, r["choices"]["label"].index(r["answerKey"])))
    return out


def boolq(root: Path) -> list[MCExample]:
    out = []
    for r in boolq_rows(root):
        context = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
        out.append(MCExample((Choice(context, " no"), Choice(context, " yes")), int(bool(r["label"]))))
    return out


MC_TASKS: dict[str, Callable[[Path], list[MCExample]]] = {
    "hellaswag": hellaswag,
    "arc_easy": arc_easy,
    "piqa": piqa,
    "winogrande": winogrande,
    "openbookqa": openbookqa,
    "boolq": boolq,
}


def load_mc(task: str, limit: int | None, root: Path | None = None) -> list[MCExample]:
    if task not in MC_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(MC_TASKS)}")
    examples = MC_TASKS[task](root or data_dir())
    return examples[:limit] if limit else examples


def wikitext_text(root: Path | None = None) -> str:
    """WikiText-2 test as one string (CRLF -> LF; SOURCE.md)."""
    return (
        ((root or data_dir()) / "wikitext2" / "wiki.test.raw")
        .read_text(encoding="utf-8")
        .replace("\r\n", "\n")
    )
