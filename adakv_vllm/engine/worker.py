"""AdaKVWorker: the CPU worker plus the three AdaKV duties of every step.

    execute_model(scheduler_output)
      1. release staging of blocks that will never seal, then seal the listed blocks (all layers)
      2. forward (stock); the attention layers write new K/V to staging and read pages + staging
    sample_tokens(...)
      3. report per-token features on ModelRunnerOutput.adakv_features: the quantization error of
         every token written this step (keyed by vLLM slot), the entropy / probability of each
         request's sampled token (keyed by request id) and, with prompt_features, the same for the
         prompt tokens whose predicting position ran this step

The FP16 staging reserve is charged to the KV memory budget, so AdaKV uses the same memory as stock
vLLM at the same VLLM_CPU_KVCACHE_SPACE and its capacity figures are honest.
"""

from __future__ import annotations

import copy
import logging

import torch
from vllm.v1.worker.cpu_worker import CPUWorker

from adakv_vllm import envs
from adakv_vllm.attention import runtime
from adakv_vllm.blocks import spec as spec_glue
from adakv_vllm.blocks.store import KVStore
from adakv_vllm.config import from_vllm_config
from adakv_vllm.controller.policy import POLICIES, resolve
from adakv_vllm.engine import staging_budget
from adakv_vllm.engine.faults import FaultInjector
from adakv_vllm.engine.stats import StatsFile

logger = logging.getLogger("vllm.adakv.worker")


class AdaKVWorker(CPUWorker):
    def __init__(self, vllm_config, *args, **kwargs):
        self.adakv = from_vllm_config(vllm_config)
        if self.adakv is None:
            raise RuntimeError("AdaKVWorker started without the AdaKV plugin being asked for")
        runtime.set_config(self.adakv)
        super().__init__(vllm_config, *args, **kwargs)
        # measure only what the policy reads (static and random read nothing)
        policy = POLICIES[resolve(self.adakv.policy, self.adakv.controller_weights)[0]]
        self._reads_qerr, self._reads_attention = policy.reads_qerr, policy.reads_attention
        # a softmax over the vocabulary per sampled token: only for a policy that reads it
        self._reads_distribution = policy.reads_distribution or self.adakv.prompt_features
        self._faults = FaultInjector.from_env(vllm_config.cache_config.block_size)
        self._stats = StatsFile(envs.stats_file()) if envs.stats_file() else None
        self._unsealed: list[int] = []

    def determine_available_memory(self) -> int:
        """vLLM's KV budget minus the FP16 staging reserve (engine/staging_budget.py), so AdaKV uses
        the memory stock vLLM would at the same VLLM_CPU_KVCACHE_SPACE."""
        available = super().determine_available_memory()
        reserved = staging_budget.bytes_for_available(self.vllm_config, self.adakv, available)
        if reserved >= available:
            raise ValueError(
                f"AdaKV's FP16 staging needs at least {reserved / 2**20:.0f} MiB but the KV budget is only "
                f"{available / 2**20:.0f} MiB; raise VLLM_CPU_KVCACHE_SPACE"
            )
        return available - reserved

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"AdaKV supports models with one KV cache group, got {len(groups)}")
        layout = spec_glue.layout_of_spec(groups[0].kv_cache_spec, self.adakv)
        model = self.vllm_config.model_config
        store = KVStore(
            layout,
            num_layers=len(groups[0].layer_names),
            num_blocks=kv_cache_config.num_blocks,
            dtype=model.dtype,
            max_staging_slots=staging_budget.for_kv_cache(self.vllm_config, self.adakv, kv_cache_config),
            track_attention=self._reads_attention,
        )
        runtime.set_store(store)

    @torch.inference_mode()
    def execute_model(self, scheduler_output):
        store = runtime.store()
        store.begin_step()
        release = getattr(scheduler_output, "adakv_release", None)
        if release:
            store.release(release)
        seal = getattr(scheduler_output, "adakv_seal", None)
        self._unsealed = []
        if seal is not None:
            self._unsealed = store.seal(seal.block_ids, seal.key_bits, seal.value_bits, owners=seal.owners)
        output = super().execute_model(scheduler_output)
        if self._faults is not None:
            self._faults.after_forward(scheduler_output, store)
        if self._stats is not None:
            self._stats.update(store)
        if output is not None:
            output = self._attach(output, None)
        return output

    @torch.inference_mode()
    def sample_tokens(self, grammar_output):
        state = getattr(self.model_runner, "execute_model_state", None)
        logits = None if state is None else state.logits
        prompt = self._prompt_distributions(state) if state is not None and self.adakv.prompt_features else {}
        output = super().sample_tokens(grammar_output)
        return self._attach(output, logits, prompt)

    def _prompt_distributions(self, state) -> dict[str, tuple[list[int], list[float], list[float]]]:
        """Entropy of the next-token distribution at every scheduled position and the probability it
        gives the prompt token that follows: {req_id: (positions of those following tokens,
        entropies, probabilities)}. Tokens are laid out per request in input-batch order."""
        runner, sched = self.model_runner, state.scheduler_output
        batch = runner.input_batch
        out, offset = {}, 0
        for index, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
            n = sched.num_scheduled_tokens.get(req_id, 0)
            start = int(batch.num_computed_tokens_cpu[index])
            prompt_len = int(batch.num_prompt_tokens[index])
            # position start+j predicts start+j+1; keep those that are prompt tokens
            count = max(0, min(n, prompt_len - 1 - start))
            if count:
                hidden = state.hidden_states[offset : offset + count]
                logp = torch.log_softmax(runner.model.compute_logits(hidden).float(), dim=-1)  # [count, V]
                following = torch.from_numpy(batch.token_ids_cpu[index, start + 1 : start + 1 + count]).long()
                entropy = entropy_of(logp)
                prob = logp.gather(1, following[:, None]).squeeze(1).exp()
                out[req_id] = (list(range(start + 1, start + 1 + count)), entropy.tolist(), prob.tolist())
            offset += n
        return out

    def _attach(self, output, logits, prompt=None):
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        if output is EMPTY_MODEL_RUNNER_OUTPUT:
            output = copy.copy(output)  # never mutate the shared singleton
        features = (runtime.store().step_features() if self._reads_qerr else None) or {}
        sampled = {}
        if logits is not None and output.req_ids and self._reads_distribution:
            logp = torch.log_softmax(logits[: len(output.req_ids)].float(), dim=-1)  # [R, V]
            entropy = entropy_of(logp)
            for rid, i in output.req_id_to_index.items():
                tokens = output.sampled_token_ids[i] if output.sampled_token_ids else []
                if tokens:
                    sampled[rid] = (float(entropy[i]), float(logp[i, tokens[-1]].exp()))
        output.adakv_features = {
            "slots": features.get("slots"),
            "qerr": features.get("qerr"),
            "sampled": sampled,
            "prompt": prompt or {},
            "unsealed": self._unsealed,
            "attention": runtime.store().completed_attention(),
        }
        self._unsealed = []
        return output


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """logp: [R, V] log-probabilities -> [R] entropy in nats. Tokens a grammar masked out (structured
    output sets their logits to -inf in place) have p = 0 and add nothing (0 * -inf would be NaN)."""
    return torch.special.entr(logp.exp()).sum(-1)
