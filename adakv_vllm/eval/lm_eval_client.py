"""A real client: lm-evaluation-harness scoring ARC-Easy through vLLM with the plugin switched on.

lm-eval builds `LLM(...)` itself, so the plugin is switched on through the environment
(ADAKV_KV_CACHE_PLUGIN / ADAKV_OPTIONS). The task is a custom YAML over ../shared/data (no hub), in
the same prompt format as `adakv eval`'s arc_easy, so the two harnesses can be compared.

    python -m adakv_vllm.eval.lm_eval_client --limit 100 [--adakv '{"target_bits": 4}']
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from adakv_vllm import envs
from adakv_vllm.eval import data
from adakv_vllm.model_store import resolve_model

TASK = "adakv_arc_easy"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def run(limit: int, adakv: dict | None, model: str | None = None) -> dict:
    """-> {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"} from lm-eval's own output."""
    from adakv_vllm.engine.compat import alias_vllm_version

    alias_vllm_version()  # lm-eval asks importlib for vllm's version
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if adakv is not None:
        os.environ["ADAKV_KV_CACHE_PLUGIN"] = "adakv"
        os.environ["ADAKV_OPTIONS"] = json.dumps(adakv)
    else:  # the bf16 baseline: a plugin switch inherited from the caller must not apply
        for name in envs.PLUGIN_SWITCH_VARS:
            os.environ.pop(name, None)
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        path = data.data_dir() / "arc_easy" / "ARC-Easy-Test.jsonl"
        Path(tmp, f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, path=path))
        model_args = {
            "pretrained": resolve_model(model),
            "enforce_eager": True,
            "max_model_len": 1024,
            "gpu_memory_utilization": 0.5,
            "block_size": 32,
            "long_prefill_token_threshold": 32,
            "max_num_batched_tokens": 512,
            "seed": 0,
        }
        from lm_eval.models.vllm_causallms import VLLM

        lm = VLLM(**model_args)  # lm-eval's own vLLM backend; built here so that we can shut it down
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[TASK], limit=limit, task_manager=TaskManager(include_path=tmp)
            )
        finally:
            lm.model.llm_engine.engine_core.shutdown()  # lm-eval never stops its engine process
    metrics = out["results"][TASK]
    return {
        "acc": metrics["acc,none"],
        "acc_stderr": metrics["acc_stderr,none"],
        "acc_norm": metrics["acc_norm,none"],
        "acc_norm_stderr": metrics["acc_norm_stderr,none"],
        "n": limit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--adakv", type=json.loads, default=None, help="AdaKV options as JSON; omit for bf16")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    print("LM-EVAL-RESULT " + json.dumps(run(args.limit, args.adakv, args.model)))
    sys.stdout.flush()
    sys.stderr.flush()
    # The engine process is shut down (run); in CI the interpreter's teardown of what lm-eval left
    # behind then still aborted ("terminate called without an active exception", SIGABRT) after
    # the result above was complete and printed, so skip the teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
