"""A Llama forward that lets the caller edit the cached K/V of one position: the labeller's probe.

Uses the weights and sub-modules of a Hugging Face LlamaForCausalLM (fp32), re-assembled so that

    prefill(ids)                       -> logits, per-layer post-RoPE K/V of the whole window, and
                                          the `attention` feature of every token
    continue_from(past_k, past_v, ...) -> logits of the next tokens, attending to an edited past

Keys are cached after RoPE, as vLLM caches them, so quantizing a cached key here is what AdaKV does
to a sealed page. `tests/training` checks `prefill` against the Hugging Face forward, and its
attention feature against kernels/block_attention.py (what the serving engine measures).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# The engine's default block size: the `attention` feature is normalised inside blocks of this many
# tokens, the first starting at the sequence start.
BLOCK_SIZE = 32


class LlamaProbe:
    def __init__(self, model):
        self.model = model.eval()
        cfg = model.config
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = model.model.layers

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, block_size: int = BLOCK_SIZE):
        """ids: [B, L] -> logits [B, L, V] fp32, keys, values: per layer [B, num_kv_heads, L, D], and
        attention [B, L]: the mean attention each token received from the later queries of its own
        block, over every layer (received_in_block)."""
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        empty = [
            torch.empty(ids.shape[0], self.num_kv_heads, 0, self.head_size) for _ in range(len(self.layers))
        ]
        return self._forward(ids, positions, empty, list(empty), block_size)

    @torch.no_grad()
    def continue_from(self, ids: torch.Tensor, past_keys: list, past_values: list):
        """ids: [B, n] tokens at positions P..P+n-1 where P = past length; past_*: per layer
        [B, num_kv_heads, P, D]. -> logits [B, n, V] fp32 (and the K/V including the new tokens)."""
        start = past_keys[0].shape[2]
        positions = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)
        return self._forward(ids, positions, past_keys, past_values)

    def _forward(self, ids, positions, past_keys, past_values, block_size=None):
        model = self.model.model
        h = model.embed_tokens(ids)  # [B, n, hidden]
        cos, sin = model.rotary_emb(h, positions)
        b, n = ids.shape
        past = past_keys[0].shape[2]
        # query i (absolute position past+i) sees keys 0..past+i
        visible = torch.arange(past + n)[None, :] <= (past + torch.arange(n))[:, None]  # [n, past+n]
        keys, values = [], []
        received = seen = None
        for layer, pk, pv in zip(self.layers, past_keys, past_values, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, n, self.num_heads, self.head_size).transpose(1, 2)
            k = attn.k_proj(x).view(b, n, self.num_kv_heads, self.head_size).transpose(1, 2)
            v = attn.v_proj(x).view(b, n, self.num_kv_heads, self.head_size).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if block_size is not None:
                r, s = received_in_block(q, k, block_size)
                received, seen = (r, s) if received is None else (received + r, seen + s)
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # [B, Hkv, past+n, D]
            keys.append(k)
            values.append(v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(model.norm(h)).float()
        if block_size is not None:
            return logits, keys, values, received / seen
        return logits, keys, values


def received_in_block(q: torch.Tensor, k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention tokens receive inside their own block, for one layer of a prefill from position 0.

    q: [B, num_heads, L, D], k: [B, num_kv_heads, L, D] post-RoPE -> received [B, L] (softmax over
    the block's keys up to the query, summed over query heads and the block's queries) and seen
    [B, L] (the number of (head, query) rows that could see the token). kernels/block_attention.py
    computes the same from the engine's staging: q and k are rounded to bf16 as the engine holds them
    (a bf16 model), then computed in fp32. A partial last block counts the queries it has."""
    b, num_heads, n, d = q.shape
    group = num_heads // k.shape[1]
    num_blocks = -(-n // block_size)
    pad = (0, 0, 0, num_blocks * block_size - n)
    qb = F.pad(q.bfloat16().float(), pad).view(b, num_heads, num_blocks, block_size, d)
    kb = F.pad(k.bfloat16().float(), pad).repeat_interleave(group, 1)
    kb = kb.view(b, num_heads, num_blocks, block_size, d)
    offsets = torch.arange(block_size)
    visible = offsets[None, :] <= offsets[:, None]  # [query, key] inside a block
    present = (torch.arange(num_blocks * block_size) < n).view(num_blocks, block_size)  # [nb, bs] real tokens
    scores = qb @ kb.transpose(-1, -2) * d**-0.5  # [B, Hq, nb, bs, bs]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1) * present[:, :, None]
    received = probs.sum((1, 3)).reshape(b, -1)[:, :n]
    seen = (visible & present[:, :, None]).sum(1).float() * num_heads  # [nb, bs]
    return received, seen.reshape(-1)[:n].expand(b, -1)
