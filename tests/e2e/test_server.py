"""`adakv serve` on 127.0.0.1: concurrent completions, streaming, aborts mid-stream, health."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.e2e.conftest import ENGINE_ENV, ROOT

PROMPTS = {"france": "The capital of France is", "colors": "The three primary colors are"}
NUM_REQUESTS, NUM_STREAMING, NUM_ABORTED = 32, 12, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    cmd = [
        sys.executable, "-m", "adakv_vllm.engine.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--max-model-len", "1024", "--gpu-memory-utilization", "0.5",
        "--max-num-seqs", "16", "--max-num-batched-tokens", "512",
        "--additional-config", json.dumps({"target_bits": 4, "policy": "rule"}),
    ]  # fmt: skip
    env = {**os.environ, **ENGINE_ENV}
    log = open(ROOT / ".pytest_cache" / "adakv_serve.log", "w") if (ROOT / ".pytest_cache").is_dir() else None
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"adakv serve exited with {proc.returncode}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(2)
    else:
        proc.kill()
        raise AssertionError("adakv serve did not become healthy in 300 s")
    yield base, proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _model(base: str) -> str:
    return requests.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]


def _complete(base, model, key, stream, abort):
    body = {"model": model, "prompt": PROMPTS[key], "max_tokens": 24, "temperature": 0.0, "stream": stream}
    if not stream:
        r = requests.post(f"{base}/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        return key, r.json()["choices"][0]["text"]
    with requests.post(f"{base}/v1/completions", json=body, timeout=300, stream=True) as r:
        r.raise_for_status()
        text = ""
        for i, line in enumerate(r.iter_lines()):
            if abort and i >= 2:
                return key, None  # leaving the block closes the connection: vLLM aborts the request
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
        return key, text


def test_concurrent_streaming_and_aborts(server):
    base, proc = server
    model = _model(base)
    jobs = []
    for i in range(NUM_REQUESTS):
        key = "france" if i % 2 == 0 else "colors"
        stream = i < NUM_STREAMING
        jobs.append((key, stream, stream and i < NUM_ABORTED))
    with cf.ThreadPoolExecutor(max_workers=NUM_REQUESTS) as pool:
        results = list(pool.map(lambda job: _complete(base, model, *job), jobs))

    answers: dict[str, set[str]] = {"france": set(), "colors": set()}
    for key, text in results:
        if text is not None:
            answers[key].add(text)
    # Greedy decoding: the completed requests of a prompt give the same text, streamed or not, up to
    # the batch variance of stock vLLM itself on this machine (its bf16 matmuls: one prompt alone and
    # in a batch first differed at token 18). A request served through the wrong pages or kernel
    # would differ from its first tokens on.
    for texts in answers.values():
        assert texts and len({t[:12] for t in texts}) == 1, answers
    assert "Paris" in next(iter(answers["france"]))
    assert sum(text is None for _, text in results) == NUM_ABORTED
    # Still healthy and serving after the aborts.
    assert requests.get(f"{base}/health", timeout=10).status_code == 200
    # (not compared with the batch's text: vLLM is not batch-invariant, stock included)
    _, again = _complete(base, model, "france", False, False)
    assert "Paris" in again
    assert proc.poll() is None
