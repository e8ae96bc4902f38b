"""A Llama forward that lets the caller edit the cached K/V of one position: the labeller's probe.

Uses the weights and sub-modules of a Hugging Face LlamaForCausalLM (fp32), re-assembled so that

    prefill(ids)                       -> logits, per-layer post-RoPE K/V of the whole window
    continue_from(past_k, past_v, ...) -> logits of the next tokens, attending to an edited past

Keys are cached after RoPE, as vLLM caches them, so quantizing a cached key here is what AdaKV does
to a sealed page. `tests/training` checks `prefill` against the Hugging Face forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class LlamaProbe:
    def __init__(self, model):
        self.model = model.eval()
        cfg = model.config
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = model.model.layers

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor):
        """ids: [B, L] -> logits [B, L, V] fp32, keys, values: per layer [B, num_kv_heads, L, D],
        and the final layer's attention probabilities [B, num_heads, L, L]."""
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        empty = [
            torch.empty(ids.shape[0], self.num_kv_heads, 0, self.head_size) for _ in range(len(self.layers))
        ]
        return self._forward(ids, positions, empty, list(empty), keep_last_attention=True)

    @torch.no_grad()
    def continue_from(self, ids: torch.Tensor, past_keys: list, past_values: list):
        """ids: [B, n] tokens at positions P..P+n-1 where P = past length; past_*: per layer
        [B, num_kv_heads, P, D]. -> logits [B, n, V] fp32 (and the K/V including the new tokens)."""
        start = past_keys[0].shape[2]
        positions = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)
        return self._forward(ids, positions, past_keys, past_values)

    def _forward(self, ids, positions, past_keys, past_values, keep_last_attention=False):
        model = self.model.model
        h = model.embed_tokens(ids)  # [B, n, hidden]
        cos, sin = model.rotary_emb(h, positions)
        b, n = ids.shape
        past = past_keys[0].shape[2]
        # query i (absolute position past+i) sees keys 0..past+i
        visible = torch.arange(past + n)[None, :] <= (past + torch.arange(n))[:, None]  # [n, past+n]
        keys, values, probs = [], [], None
        for index, (layer, pk, pv) in enumerate(zip(self.layers, past_keys, past_values, strict=True)):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, n, self.num_heads, self.head_size).transpose(1, 2)
            k = attn.k_proj(x).view(b, n, self.num_kv_heads, self.head_size).transpose(1, 2)
            v = attn.v_proj(x).view(b, n, self.num_kv_heads, self.head_size).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # [B, Hkv, past+n, D]
            keys.append(k)
            values.append(v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
            if keep_last_attention and index == len(self.layers) - 1:
                group = self.num_heads // self.num_kv_heads
                scores = q @ k.repeat_interleave(group, 1).transpose(2, 3) * self.head_size**-0.5
                probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)  # [B, Hq, n, past+n]
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(model.norm(h)).float()
        if keep_last_attention:
            return logits, keys, values, probs
        return logits, keys, values
