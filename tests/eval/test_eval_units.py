"""Evaluation pieces that need no engine: data loaders, KL, statistics, quantized fractions, report."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch

from adakv_vllm.eval import data, report, tasks
from adakv_vllm.eval.configs import CONFIGS, parse_configs

EXPECTED_SIZES = {
    "hellaswag": 10042,
    "arc_easy": 2376,
    "piqa": 1838,
    "winogrande": 1267,
    "openbookqa": 500,
    "boolq": 3270,
}


@pytest.mark.parametrize("task", sorted(EXPECTED_SIZES))
def test_loaders_read_shared_data(task):
    examples = data.load_mc(task, None)
    assert len(examples) == EXPECTED_SIZES[task]
    for ex in examples[:50]:
        assert 0 <= ex.label < len(ex.choices) and len(ex.choices) >= 2
        assert all(c.continuation.startswith(" ") and c.context for c in ex.choices)
    assert len(data.load_mc(task, 7)) == 7


def test_winogrande_fills_the_blank():
    ex = data.load_mc("winogrande", 1)[0]
    assert ex.choices[0].context.endswith("Sarah") and ex.choices[1].context.endswith("Maria")
    assert ex.choices[0].continuation == " always got the easier cases." and ex.label == 1


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        data.load_mc("mmlu", 1)


def test_kl_exact_when_top_k_is_the_vocabulary():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5, 12, generator=gen).log_softmax(-1)
    q = torch.randn(5, 12, generator=gen).log_softmax(-1)
    top = p.topk(12, dim=-1)
    exact = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(tasks._kl(top.indices, top.values, q), exact, atol=1e-5, rtol=1e-4)
    assert torch.allclose(tasks._kl(top.indices, top.values, p), torch.zeros(5), atol=1e-6)


def test_kl_truncated_is_a_lower_bound():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(4, 50, generator=gen).log_softmax(-1)
    q = torch.randn(4, 50, generator=gen).log_softmax(-1)
    top = p.topk(10, dim=-1)
    exact = (p.exp() * (p - q)).sum(-1)
    approx = tasks._kl(top.indices, top.values, q)
    assert (approx <= exact + 1e-6).all() and (approx >= 0).all()


def test_statistics():
    mean, se = tasks.mean_se([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 3 / 4))
    d, d_se = tasks.paired([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    assert d == pytest.approx(1 / 3) and d_se > 0


def test_configs():
    assert [c.name for c in parse_configs("bf16, rule3")] == ["bf16", "rule3"]
    assert CONFIGS["fp8"].llm_kwargs()["kv_cache_dtype"] == "fp8"
    assert CONFIGS["random3"].llm_kwargs()["additional_config"]["target_bits"] == 3
    with pytest.raises(ValueError, match="unknown config"):
        parse_configs("bf16,int3")


@pytest.mark.parametrize("name", ["bf16", "fp8"])
def test_stock_configs_turn_the_plugin_off_explicitly(name, monkeypatch):
    """ADAKV_KV_CACHE_PLUGIN in the caller's environment must not turn a baseline into AdaKV."""
    from adakv_vllm.config import requested_options

    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "adakv")
    kwargs = CONFIGS[name].llm_kwargs()
    assert kwargs["additional_config"] == {"kv_cache_plugin": "none"}
    assert requested_options(kwargs["additional_config"]) is None


def test_engine_processes_get_no_plugin_switch(monkeypatch):
    """Every config's engine process runs with an environment that cannot switch the plugin."""
    from adakv_vllm.eval import main

    monkeypatch.setenv("ADAKV_KV_CACHE_PLUGIN", "adakv")
    monkeypatch.setenv("ADAKV_OPTIONS", '{"target_bits": 2}')
    seen = []

    def fake_run(cmd, env):
        seen.append(env)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(main.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="bf16 .wikitext. failed"):
        main.run_config(CONFIGS["bf16"], [("wikitext", ["wikitext"])], {}, "sig", "1", reference=None)
    assert seen and not {"ADAKV_KV_CACHE_PLUGIN", "ADAKV_OPTIONS"} & set(seen[0])
    assert seen[0]["VLLM_CPU_KVCACHE_SPACE"] == "1"


def _fake(name, bits, acc, capacity=1.0):
    return {
        "config": name,
        "avg_bits": bits,
        "capacity": {"ratio": capacity, "bits_per_element": 16 / capacity},
        "results": {
            "wikitext": {"nll": [2.0, 3.0], "kl": [0.0, 0.1], "ppl": 12.2, "quantized_reads": 0.9},
            "piqa": {"acc": acc, "acc_norm": acc, "n": len(acc), "quantized_reads": 0.5},
        },
    }


def test_report_markdown_and_plots(tmp_path):
    results = [
        _fake("bf16", 16, [1.0, 0.0, 1.0]),
        _fake("rule3", 3.0, [1.0, 0.0, 0.0], capacity=4.89),
        _fake("static3", 3.0, [1.0, 1.0, 0.0], capacity=4.54),
    ]
    settings = {
        "model": "/m/SmolLM2",
        "tasks": ["wikitext", "piqa"],
        "limit": 3,
        "wikitext_limit": 2,
        "wikitext_window": 8,
    }
    table = report.markdown(results, settings)
    assert "| rule3 | 4.89x | 3.27 | 3.00 |" in table and "-33.3 ± 33.3" in table
    # rows in capacity order; the adaptive policy is paired with the best uniform format of >= capacity
    assert table.index("| bf16 |") < table.index("| static3 |") < table.index("| rule3 |")
    assert "| rule3 − static3 |" not in table  # static3 holds fewer tokens: not an equal-capacity control
    report.plots(results, tmp_path)
    for png in ("wikitext", "piqa", "frontier"):
        assert (tmp_path / f"{png}.png").stat().st_size > 0


def test_report_without_wikitext_pairs_the_multiple_choice_tasks(tmp_path):
    """A run of multiple-choice tasks alone still pairs each adaptive policy with its controls."""
    results = [_fake("bf16", 16, [1.0, 0.0, 1.0]), _fake("attention3.5", 3.5, [1.0, 1.0, 1.0], capacity=4.2)]
    results += [_fake("random3.5", 3.5, [0.0, 1.0, 1.0], capacity=4.2)]
    for r in results:
        del r["results"]["wikitext"]
    settings = {"model": "/m", "tasks": ["piqa"], "limit": 3, "wikitext_limit": 0, "wikitext_window": 8}
    table = report.markdown(results, settings)
    assert "| paired difference | piqa Δ acc_norm |" in table and "KL" not in table
    assert "| attention3.5 − random3.5 | 33.3 ± 33.3 |" in table
    report.plots(results, tmp_path)


def test_eval_refuses_windows_the_learned_controller_was_trained_on(tmp_path):
    import json

    from adakv_vllm.eval.configs import CONFIGS, check_training_overlap, parse_configs
    from adakv_vllm.eval.tasks import wikitext_spans

    weights = tmp_path / "smollm2-135m.safetensors"  # only its card is read here
    trained = [[1000, 1288], [200_000, 200_288], [250_000, 250_288]]
    (tmp_path / "smollm2-135m.card.json").write_text(json.dumps({"data": {"training_spans": trained}}))
    learned = parse_configs("learned3", str(weights))
    num_tokens = 301_948  # SmolLM2's tokens of WikiText-2 test
    check_training_overlap(learned, wikitext_spans(num_tokens, 512, 16))  # the published settings
    check_training_overlap([CONFIGS["rule3"]], [tuple(trained[1])])  # no controller
    with pytest.raises(ValueError, match="trained on WikiText-2 tokens"):
        check_training_overlap(learned, [(200_100, 200_612)])
    # multiple choice: the card's training examples of a task may not be scored
    card = {"data": {"training_spans": trained, "mc_examples": {"boolq": [1635, 3270]}}}
    (tmp_path / "smollm2-135m.card.json").write_text(json.dumps(card))
    check_training_overlap(learned, [], {"boolq": 1635, "hellaswag": None})
    with pytest.raises(ValueError, match="trained on boolq examples 1635..3269"):
        check_training_overlap(learned, [], {"boolq": 1636})
    with pytest.raises(ValueError, match="use --limit 1635"):
        check_training_overlap(learned, [], {"boolq": None})
    with pytest.raises(ValueError, match="no model card"):
        check_training_overlap(parse_configs("learned3", str(tmp_path / "other.safetensors")), [(0, 1)])
    with pytest.raises(ValueError, match="no controller_weights"):
        check_training_overlap([CONFIGS["learned3"]], [(0, 1)])
