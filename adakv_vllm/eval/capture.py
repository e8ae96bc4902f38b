"""Capture the full prompt log-probabilities vLLM computes, for teacher-forced KL.

vLLM returns only top-k prompt logprobs; KL against bf16 needs the whole distribution. With the
engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), `Sampler.gather_logprobs` -- which receives
the full [num_positions, vocab] fp32 log-softmax of every prompt chunk -- is wrapped to keep a copy.
Only one request may have prompt logprobs in flight, so every captured chunk belongs to it, in order.
"""

from __future__ import annotations

import contextlib

import torch


class PromptLogprobCapture:
    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        """-> [num_prompt_tokens - 1, vocab] fp32 log-probs of tokens 1.. given their prefix."""
        out = torch.cat(self.chunks) if self.chunks else torch.empty(0)
        self.chunks = []
        return out

    @contextlib.contextmanager
    def installed(self):
        from vllm.v1.sample.sampler import Sampler

        original = Sampler.gather_logprobs

        def gather_logprobs(logprobs, num_logprobs, token_ids):
            self.chunks.append(logprobs.detach().float().clone())
            return original(logprobs, num_logprobs, token_ids)

        Sampler.gather_logprobs = staticmethod(gather_logprobs)
        try:
            yield self
        finally:
            Sampler.gather_logprobs = staticmethod(original)
