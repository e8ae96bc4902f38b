"""The measurements, run inside one engine: WikiText-2 KL/PPL, zero-shot multiple choice, needle.

How the context is read through sealed (quantized) pages: the eval engines prefill every request
one block per step (run_config.py). A block that fills in step k is sealed before step k+1's
forward, so a query at position t attends to tokens [0, t//B*B) from sealed pages and only its own
block from the exact FP16 staging. The share of attention reads served from sealed pages is
measured by the KV store and reported per task ("quantized reads"); stock fp8 quantizes everything
(1.0), stock bf16 nothing (0.0).
"""

from __future__ import annotations

import math
import random

import torch
from tqdm import tqdm

from adakv_vllm.eval import data

KL_TOP_K = 256  # bf16 reference keeps its top-256 tokens per position plus the tail mass


# ---- WikiText-2 ----------------------------------------------------------------------------------
def wikitext_spans(num_tokens: int, window: int, limit: int) -> list[tuple[int, int]]:
    """[start, end) token spans of `limit` windows of `window` tokens, evenly spaced over the test set."""
    count = min(limit, num_tokens // window)
    stride = num_tokens // count
    return [(i * stride, i * stride + window) for i in range(count)]


def wikitext_ids(tokenizer) -> list[int]:
    return tokenizer(data.wikitext_text(), add_special_tokens=False).input_ids


def wikitext_windows(tokenizer, window: int, limit: int) -> list[list[int]]:
    ids = wikitext_ids(tokenizer)
    return [ids[a:b] for a, b in wikitext_spans(len(ids), window, limit)]


def eval_wikitext(llm, capture, windows, reference: dict | None):
    """Teacher-forced scoring of the second half of each window.

    Returns per-window NLL and KL lists (paired across configs by window index) and, when
    `reference` is None, the top-K reference distributions this config produced.
    """
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    nll, kl, new_reference = [], [], {"ids": [], "logprobs": []}
    for w, tokens in enumerate(tqdm(windows, desc="wikitext", unit="win")):
        half = len(tokens) // 2
        llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)
        logprobs = capture.take()[half - 1 :]  # predictions of tokens half..L-1: [P, vocab]
        targets = torch.tensor(tokens[half:])
        nll.append(float(-logprobs.gather(1, targets[:, None]).mean()))
        if reference is None:
            top = logprobs.topk(KL_TOP_K, dim=-1)
            new_reference["ids"].append(top.indices)
            new_reference["logprobs"].append(top.values)
            kl.append(0.0)
        else:
            kl.append(float(_kl(reference["ids"][w], reference["logprobs"][w], logprobs).mean()))
    return {
        "nll": nll,
        "kl": kl,
        "ppl": math.exp(sum(nll) / len(nll)),
        "num_windows": len(windows),
        "window": len(windows[0]),
        "scored_per_window": len(windows[0]) - len(windows[0]) // 2,
    }, (new_reference if reference is None else None)


def _kl(ref_ids: torch.Tensor, ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || Q) per position over the reference's top-K tokens plus one tail bucket.

    Coarsening the vocabulary can only lower KL (data-processing inequality), so this is a tight
    lower bound when the top-K hold almost all of P's mass (K=256 on SmolLM2: typically > 0.99).
    """
    p = ref_logprobs.exp()  # [P, K]
    q_log = logprobs.gather(1, ref_ids)  # [P, K]
    p_tail = (1 - p.sum(-1)).clamp_min(1e-12)
    q_tail = (1 - q_log.exp().sum(-1)).clamp_min(1e-12)
    return (p * (ref_logprobs - q_log)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())


# ---- zero-shot multiple choice -------------------------------------------------------------------
def eval_mc(llm, tokenizer, task: str, limit: int | None):
    from vllm import SamplingParams, TokensPrompt

    examples = data.load_mc(task, limit)
    prompts, spans = [], []
    for ex in examples:
        for choice in ex.choices:
            ctx = tokenizer(choice.context, add_special_tokens=False).input_ids
            cont = tokenizer(choice.continuation, add_special_tokens=False).input_ids
            prompts.append(TokensPrompt(prompt_token_ids=ctx + cont))
            spans.append((len(ctx), len(cont)))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=True)
    scores = []
    for out, (n_ctx, n_cont) in zip(outputs, spans, strict=True):
        ids = out.prompt_token_ids
        lp = out.prompt_logprobs  # list: None for position 0, then {token_id: Logprob}
        scores.append(sum(lp[i][ids[i]].logprob for i in range(n_ctx, n_ctx + n_cont)))
    acc, acc_norm, k = [], [], 0
    for ex in examples:
        s = scores[k : k + len(ex.choices)]
        lengths = [len(c.continuation) for c in ex.choices]
        k += len(ex.choices)
        acc.append(float(max(range(len(s)), key=lambda i: s[i]) == ex.label))
        acc_norm.append(float(max(range(len(s)), key=lambda i: s[i] / lengths[i]) == ex.label))
    return {"acc": acc, "acc_norm": acc_norm, "n": len(examples)}


# ---- needle retrieval ----------------------------------------------------------------------------
NEEDLE_DEPTHS = (0.1, 0.5, 0.9)
QUESTION = "\nWhat is the secret passkey mentioned in the text above? The secret passkey is"


def eval_needle(llm, tokenizer, lengths: list[int], seed: int = 0):
    from vllm import SamplingParams, TokensPrompt

    rng = random.Random(seed)
    haystack = tokenizer(data.wikitext_text()[:400_000], add_special_tokens=False).input_ids
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    prompts, keys, cells = [], [], []
    for length in lengths:
        for depth in NEEDLE_DEPTHS:
            key = f"{rng.randint(10000, 99999)}"
            needle = tokenizer(
                f" The secret passkey is {key}. Remember it. ", add_special_tokens=False
            ).input_ids
            body = length - len(needle) - len(question)
            start = rng.randint(0, len(haystack) - body - 1)
            text = haystack[start : start + body]
            cut = int(depth * body)
            prompts.append(TokensPrompt(prompt_token_ids=text[:cut] + needle + text[cut:] + question))
            keys.append(key)
            cells.append((length, depth))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    outputs = llm.generate(prompts, params, use_tqdm=True)
    found = [float(key in out.outputs[0].text) for key, out in zip(keys, outputs, strict=True)]
    return {"found": found, "cells": cells, "n": len(found)}


# ---- statistics ----------------------------------------------------------------------------------
def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired(values: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-example difference values - reference."""
    return mean_se([a - b for a, b in zip(values, reference, strict=True)])
