"""The text the controller is labelled on: token streams from more than one source in ../shared/data.

Each source is one token stream (documents joined by a blank line) plus the token spans of it that
must not be labelled, and the examples of the evaluation data it was drawn from, so that `adakv eval`
can refuse to score what a controller was trained on:

  wikitext   the WikiText-2 test file (the only split shipped) minus every window `adakv eval` scores
             at its usual settings (EVAL_SETTINGS): encyclopedic prose with headings and lists;
  boolq      the unique passages of the second half of BoolQ's validation file that no example of
             the first half reads (`adakv eval` takes examples in file order, so `--limit` up to that
             half never sees them): short encyclopedic paragraphs, each starting with its title;
  hellaswag  context + correct ending of the second half of HellaSwag's validation file: short,
             plain narrative sentences (WikiHow and ActivityNet captions).

Windows are contiguous `window + horizon` token spans of a stream, evenly spread (labels.training_starts);
a window over joined documents reads across document boundaries, as a long served prompt would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from adakv_vllm.eval import data
from adakv_vllm.eval.tasks import wikitext_ids, wikitext_spans

# (window, limit) pairs of `adakv eval --wikitext-window/--wikitext-limit` whose spans are excluded
EVAL_SETTINGS = tuple((w, n) for w in (128, 256, 512, 1024) for n in (1, 2, 4, 8, 16, 32, 64))
SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    ids: list[int]
    exclude: list[tuple[int, int]]  # [start, end) token spans never labelled
    examples: tuple[int, int] | None  # [first, end) example indices of an MC task's file, if any
    description: str


def wikitext(tokenizer) -> Source:
    ids = wikitext_ids(tokenizer)
    return Source(
        "wikitext",
        ids,
        eval_exclusions(len(ids)),
        None,
        "WikiText-2 test (shared/data/wikitext2/wiki.test.raw) minus the windows adakv eval scores",
    )


def boolq(tokenizer) -> Source:
    rows = data.boolq_rows(data.data_dir())
    first = len(rows) // 2
    # a passage can serve several questions: one that an example of the first half also reads is left out
    scored = {r["passage"] for r in rows[:first]}
    passages = [p for p in dict.fromkeys(r["passage"] for r in rows[first:]) if p not in scored]
    return Source(
        "boolq",
        _ids(tokenizer, passages),
        [],
        (first, len(rows)),
        f"BoolQ validation passages of examples {first}..{len(rows) - 1} that no earlier example reads "
        f"({len(passages)} unique)",
    )


def hellaswag(tokenizer) -> Source:
    rows = data.hellaswag_rows(data.data_dir())
    first = len(rows) // 2
    texts = [f"{r['query']} {r['endings'][int(r['label'])]}" for r in rows[first:]]
    return Source(
        "hellaswag",
        _ids(tokenizer, texts),
        [],
        (first, len(rows)),
        f"HellaSwag validation contexts with their correct endings, examples {first}..{len(rows) - 1}",
    )


SOURCES: dict[str, Callable] = {"wikitext": wikitext, "boolq": boolq, "hellaswag": hellaswag}


def load(names: list[str], tokenizer) -> list[Source]:
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown training source(s) {unknown}; choose from {sorted(SOURCES)}")
    return [SOURCES[n](tokenizer) for n in names]


def split_windows(total: int, names: list[str]) -> dict[str, int]:
    """`total` windows shared evenly over the sources (the first ones take the remainder)."""
    if not names:
        raise ValueError(f"no training source given; choose from {sorted(SOURCES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a training source is named twice: {names}")
    if total < len(names):
        raise ValueError(f"{total} windows cannot cover {len(names)} sources; give at least one each")
    share, extra = divmod(total, len(names))
    return {n: share + (k < extra) for k, n in enumerate(names)}


def eval_exclusions(num_tokens: int) -> list[tuple[int, int]]:
    spans = set()
    for window, limit in EVAL_SETTINGS:
        if num_tokens >= window:
            spans.update(wikitext_spans(num_tokens, window, limit))
    return sorted(spans)


def _ids(tokenizer, texts: list[str]) -> list[int]:
    return tokenizer(SEPARATOR.join(texts), add_special_tokens=False).input_ids
