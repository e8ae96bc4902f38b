"""The controller's training texts: several sources, none of what `adakv eval` scores."""

from __future__ import annotations

import pytest

from adakv_vllm.eval import data
from adakv_vllm.training import sources


class CharTokenizer:
    """One id per character: enough to check what text each source joins."""

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = [ord(c) for c in text]

        return Out()


def test_windows_are_shared_evenly_over_the_sources():
    assert sources.split_windows(336, ["wikitext", "boolq", "hellaswag"]) == {
        "wikitext": 112,
        "boolq": 112,
        "hellaswag": 112,
    }
    assert sources.split_windows(5, ["a", "b"]) == {"a": 3, "b": 2}
    with pytest.raises(ValueError, match="at least one each"):
        sources.split_windows(1, ["a", "b"])
    with pytest.raises(ValueError, match="no training source"):
        sources.split_windows(10, [])
    with pytest.raises(ValueError, match="named twice"):
        sources.split_windows(10, ["boolq", "boolq"])


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="unknown training source"):
        sources.load(["wikitext", "reddit"], CharTokenizer())


def test_mc_sources_take_the_second_half_of_their_files_only():
    """`adakv eval --limit N` scores the first N examples in file order: training text comes from
    the examples after the midpoint, and the source says which."""
    tok = CharTokenizer()
    rows = data.boolq_rows(data.data_dir())
    boolq = sources.boolq(tok)
    assert boolq.examples == (len(rows) // 2, len(rows))
    text = "".join(map(chr, boolq.ids))
    assert rows[-1]["passage"] in text
    half = len(rows) // 2
    early = list(dict.fromkeys(r["passage"] for r in rows[:half]))
    shared = set(early) & {r["passage"] for r in rows[half:]}
    assert shared  # passages serve several questions, across the halves too
    assert not any(p in text for p in early[:100] + sorted(shared)[:50])
    hellaswag = sources.hellaswag(tok)
    first, end = hellaswag.examples
    text = "".join(map(chr, hellaswag.ids))
    assert end == len(data.hellaswag(data.data_dir())) and first == end // 2
    assert data.hellaswag(data.data_dir())[0].choices[0].context not in text


def test_wikitext_source_excludes_every_scored_window():
    wikitext = sources.wikitext(CharTokenizer())
    from adakv_vllm.eval.tasks import wikitext_spans

    scored = set(wikitext_spans(len(wikitext.ids), 512, 32))
    assert scored <= set(wikitext.exclude)
