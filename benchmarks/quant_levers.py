"""Screen the quantizer and allocation levers offline, before building them into pages and kernels.

Fake quantization inside an fp32 Hugging Face forward of SmolLM2, arranged the way AdaKV serves a
block-by-block prefill: a query reads the tokens of its own block exactly (FP16 staging) and every
earlier block through its quantized K/V (sealed pages). Each config quantizes the same WikiText-2
windows; the second half of each window is scored against the unquantized forward:
KL(fp32 || config) per token over the whole vocabulary, mean per window, paired SE across windows.

This is a screening tool (seconds per config): a lever that wins here is then built into
`quant.format` / the kernels and measured again through the plugin by `adakv eval`, which draws the
frontier the README reports. Bytes are counted as the page format counts them: codes + fp16 scale and
min per group + the one-byte bit map per token (page padding aside).

    python benchmarks/quant_levers.py --windows 32 --configs all
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from adakv_vllm.quant.rotation import rotation_matrix

BLOCK = 32
SINKS = 4
FACTORS = torch.linspace(1.0, 0.5, 11)  # candidate range shrink factors of the MSE clip


# ---- the quantizer ------------------------------------------------------------------------------
# Lloyd-Max levels of a unit Gaussian (the rotated K/V are close to Gaussian): 2, 3 and 4 bits.
LLOYD = {
    2: [-1.510, -0.4528, 0.4528, 1.510],
    3: [-2.152, -1.344, -0.7560, -0.2451, 0.2451, 0.7560, 1.344, 2.152],
    4: [
        -2.733,
        -2.069,
        -1.618,
        -1.256,
        -0.9424,
        -0.6568,
        -0.3881,
        -0.1284,
        0.1284,
        0.3881,
        0.6568,
        0.9424,
        1.256,
        1.618,
        2.069,
        2.733,
    ],
}
SCALE_GRID = torch.linspace(0.5, 1.3, 17)  # candidate scales, relative to the group's rms-based guess


def _symmetric(g: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
    """One fp16 scale per group, no min: levels (code - (2**b - 1) / 2) * scale (uniform) or the
    Lloyd-Max Gaussian levels * scale; the scale with the least squared error on a grid."""
    if kind == "lloyd" and bits in LLOYD:
        levels = torch.tensor(LLOYD[bits])
    else:
        top = 2**bits - 1
        levels = torch.arange(top + 1, dtype=torch.float32) - top / 2
        levels = levels * {2: 0.9957, 3: 0.5860, 4: 0.3352, 8: 0.0215}.get(bits, 4.0 / 2**bits)
    rms = g.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    best, best_err = None, None
    for f in SCALE_GRID.tolist():
        scale = (rms * f).half().float()
        q = _nearest(g / scale, levels) * scale
        err = (q - g).square().sum(-1, keepdim=True)
        if best is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, q, best), torch.where(better, err, best_err)
    return best


def _nearest(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(y, mids)]


def fake_quant(x: torch.Tensor, bits: int, group: int, clip: str, rotate: bool) -> torch.Tensor:
    """x: [..., D] fp32 -> what a record at `bits` returns (fp16 scale/min per group)."""
    if bits >= 16:
        return x
    d = x.shape[-1]
    r = rotation_matrix(d) if rotate else None
    y = x @ r if rotate else x
    g = y.reshape(-1, d // group, group)
    if clip in ("sym", "lloyd"):
        q = _symmetric(g, bits, clip).reshape(y.shape)
        return q @ r if rotate else q
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    top = 2**bits - 1
    if clip == "mse":
        c, half = (lo + hi) / 2, (hi - lo) / 2
        best, best_err = None, None
        for f in FACTORS.tolist():
            q = _rtn(g, c - f * half, c + f * half, top)
            err = (q - g).square().sum(-1, keepdim=True)
            if best is None:
                best, best_err = q, err
            else:
                better = err < best_err
                best = torch.where(better, q, best)
                best_err = torch.where(better, err, best_err)
        q = best
    else:
        q = _rtn(g, lo, hi, top)
    q = q.reshape(y.shape)
    return q @ r if rotate else q


def _rtn(g, lo, hi, top):
    mn = lo.half().float()
    scale = ((hi - mn) / top).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((g - mn) / safe).clamp(0, top)
    return torch.where(scale > 0, codes * scale + mn, mn)


def record_bytes(bits: int, group: int, d: int = 64, symmetric: bool = False) -> float:
    if bits >= 16:
        return 2 * d
    return d * bits / 8 + (2 if symmetric else 4) * d / group


@dataclasses.dataclass(frozen=True)
class Quantizer:
    k_group: int = 32
    v_group: int = 32
    clip: str = "minmax"
    rot_k: bool = True
    rot_v: bool = False
    center: bool = False  # subtract a calibrated per-(layer, head) mean before quantizing, add it back

    def key(self, x, bits):
        return fake_quant(x, bits, self.k_group, self.clip, self.rot_k)

    def bytes(self, bits: int, part: str) -> float:
        group = self.k_group if part == "key" else self.v_group
        return record_bytes(bits, group, symmetric=self.clip in ("sym", "lloyd"))

    def value(self, x, bits):
        return fake_quant(x, bits, self.v_group, self.clip, self.rot_v)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    quant: Quantizer
    k_bits: float  # average target (a uniform precision or a budget)
    v_bits: float
    policy: str = "static"  # static | random | attention | sinks-only
    sink_bits: int = 0  # 0 = no sink floor
    ladder: tuple[int, ...] = (2, 3, 4, 8, 16)

    def bytes_per_token(self, heads: int = 3) -> float:
        """Page bytes per token per layer: the budget the planner spends, plus the bit map."""
        q = self.quant
        key = _interp(self.k_bits, self.ladder, lambda b: q.bytes(b, "key"))
        return 1 + heads * (key + _interp(self.v_bits, self.ladder, lambda b: q.bytes(b, "value")))


def _interp(bits: float, ladder, cost) -> float:
    for lo, hi in zip(ladder, ladder[1:], strict=False):
        if lo <= bits <= hi:
            w = (bits - lo) / (hi - lo)
            return (1 - w) * cost(lo) + w * cost(hi)
    raise ValueError(bits)


# ---- allocation ---------------------------------------------------------------------------------
def allocate(weight: torch.Tensor, budget: float, cost_of, ladder, floor: torch.Tensor) -> torch.Tensor:
    """Greedy per-page knapsack (blocks/planner.py's rule): weight [T] -> bits [T] within budget bytes.
    Distortion at b bits ~ 4**-b (relative squared error of RTN), gain per extra byte."""
    t = weight.numel()
    level = [0] * t
    cost = [cost_of(b) for b in ladder]
    spent = cost[0] * t
    for i in range(t):  # the floor first
        while ladder[level[i]] < floor[i] and spent + cost[level[i] + 1] - cost[level[i]] <= budget + 1e-6:
            spent += cost[level[i] + 1] - cost[level[i]]
            level[i] += 1
    while True:
        best, best_gain = None, 0.0
        for i in range(t):
            if level[i] + 1 >= len(ladder):
                continue
            extra = cost[level[i] + 1] - cost[level[i]]
            if spent + extra > budget + 1e-6:
                continue
            gain = float(weight[i]) * (4.0 ** -ladder[level[i]] - 4.0 ** -ladder[level[i] + 1]) / extra
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            break
        spent += cost[level[best] + 1] - cost[level[best]]
        level[best] += 1
    return torch.tensor([ladder[lv] for lv in level])


def token_bits(
    cfg: Config, length: int, weight: torch.Tensor | None, gen
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> key bits, value bits: [length] each."""
    positions = torch.arange(length)
    floor = torch.where(positions < SINKS, cfg.sink_bits, 0) if cfg.sink_bits else torch.zeros(length)
    if cfg.policy == "static" and not cfg.sink_bits:
        return torch.full((length,), int(cfg.k_bits)), torch.full((length,), int(cfg.v_bits))
    out = []
    for bits, part in ((cfg.k_bits, "key"), (cfg.v_bits, "value")):
        cost_of = functools.partial(cfg.quant.bytes, part=part)
        budget = BLOCK * _interp(bits, cfg.ladder, cost_of)
        chosen = []
        for start in range(0, length, BLOCK):
            sl = slice(start, min(start + BLOCK, length))
            n = sl.stop - sl.start
            if cfg.policy == "random":
                w = torch.rand(n, generator=gen)
            elif cfg.policy in ("attention", "oracle", "local"):
                w = weight[sl]
            else:  # static with a sink floor: equal weights, leftovers go by position
                w = torch.ones(n)
            chosen.append(allocate(w, budget * n / BLOCK, cost_of, cfg.ladder, floor[sl]))
        out.append(torch.cat(chosen))
    return out[0], out[1]


# ---- the forward --------------------------------------------------------------------------------
class Simulator:
    def __init__(self, model):
        self.model = model.eval()
        c = model.config
        self.h, self.hkv = c.num_attention_heads, c.num_key_value_heads
        self.d = c.hidden_size // c.num_attention_heads

    @torch.no_grad()
    def forward(self, ids, quant=None, k_bits=None, v_bits=None, want_attention=False):
        """ids [B, L]; with quant, tokens of earlier blocks are read through fake-quantized K/V.
        want_attention: also return the attention each token receives from the later queries of its
        own block, mean over layers and heads ([B, L]) -- what the open block can measure."""
        m = self.model.model
        b, n = ids.shape
        pos = torch.arange(n).expand(b, -1)
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, pos)
        block = torch.arange(n) // BLOCK
        same = block[:, None] == block[None, :]
        causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
        received = torch.zeros(b, n)
        future = torch.zeros(b, n)
        local = torch.zeros(b, n)
        sums = []
        for index, layer in enumerate(m.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(b, n, self.h, self.d).transpose(1, 2)
            k = a.k_proj(x).view(b, n, self.hkv, self.d).transpose(1, 2)
            v = a.v_proj(x).view(b, n, self.hkv, self.d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k, v = k.bfloat16().float(), v.bfloat16().float()  # what vLLM caches
            group = self.h // self.hkv
            ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            s = q @ ke.transpose(2, 3) * self.d**-0.5
            sums.append((k.mean((0, 2)), v.mean((0, 2))))  # [Hkv, D] each
            if quant is not None:
                mk, mv = self.means[index] if quant.center else (0.0, 0.0)
                mk = mk[None, :, None, :] if quant.center else 0.0
                mv = mv[None, :, None, :] if quant.center else 0.0
                kq = _quantize_tokens(k - mk, k_bits, quant.key) + mk
                vq = _quantize_tokens(v - mv, v_bits, quant.value) + mv
                kq, vq = kq.repeat_interleave(group, 1), vq.repeat_interleave(group, 1)
                s = torch.where(same, s, q @ kq.transpose(2, 3) * self.d**-0.5)
            p = s.masked_fill(~causal, float("-inf")).softmax(-1)
            if quant is not None:
                o = (p * same) @ ve + (p * ~same) @ vq
            else:
                o = p @ ve
            if want_attention:
                received += (p * same).sum(2).mean(1) / (same & causal).sum(0).clamp_min(1)
                future += p[:, :, n // 2 :].sum(2).mean(1)  # from the scored queries: the oracle
                # softmax over the query's own block only: what the worker can compute from staging
                lp = s.masked_fill(~(same & causal), float("-inf")).softmax(-1)
                local += lp.sum(2).mean(1) / (same & causal).sum(0).clamp_min(1)
            h = h + a.o_proj(o.transpose(1, 2).reshape(b, n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(m.norm(h)).float()
        self.last_means = sums
        self.last_future = future / len(m.layers)
        self.last_local = local / len(m.layers)
        return (logits, received / len(m.layers)) if want_attention else logits

    def calibrate(self, ids: torch.Tensor, batch: int) -> None:
        """Per-(layer, KV head) mean key and value over `ids` (text the scored windows do not hold)."""
        acc = None
        for i in range(0, len(ids), batch):
            self.forward(ids[i : i + batch])
            part = [(k * len(ids[i : i + batch]), v * len(ids[i : i + batch])) for k, v in self.last_means]
            acc = part if acc is None else [(a + c, b + d) for (a, b), (c, d) in zip(acc, part, strict=True)]
        self.means = [(k / len(ids), v / len(ids)) for k, v in acc]


def _quantize_tokens(x, bits, fn):
    """x: [B, Hkv, L, D]; bits: [B, L] -> per token at its bits."""
    out = x.clone()
    for b in bits.unique().tolist():
        if b >= 16:
            continue
        sel = (bits == b)[:, None, :].expand(-1, x.shape[1], -1)
        out[sel] = fn(x[sel], b)
    return out


# ---- configs --------------------------------------------------------------------------------------
def configs() -> dict[str, Config]:
    base = Quantizer()
    mse = Quantizer(clip="mse")
    rot_all = Quantizer(rot_v=True)
    best = Quantizer(clip="mse", rot_v=True)
    best64 = Quantizer(clip="mse", rot_v=True, k_group=64, v_group=64)
    best_k32v64 = Quantizer(clip="mse", rot_v=True, k_group=32, v_group=64)
    sym64 = Quantizer(clip="sym", rot_v=True, k_group=64, v_group=64)
    lloyd64 = Quantizer(clip="lloyd", rot_v=True, k_group=64, v_group=64)
    lloyd32 = Quantizer(clip="lloyd", rot_v=True, k_group=32, v_group=64)
    lloyd64c = Quantizer(clip="lloyd", rot_v=True, k_group=64, v_group=64, center=True)
    best64c = Quantizer(clip="mse", rot_v=True, k_group=64, v_group=64, center=True)
    out = [
        Config("static4", base, 4, 4),
        Config("static2", base, 2, 2),
        Config("static3-minmax", base, 3, 3),
        Config("static2-mse", mse, 2, 2),
        Config("static2-rotv", rot_all, 2, 2),
        Config("static2-best", best, 2, 2),
        Config("static3-best", best, 3, 3),
        Config("static4-best", best, 4, 4),
        Config("static3-best-g64", best64, 3, 3),
        Config("static3-best-k32v64", best_k32v64, 3, 3),
        Config("k4v2-best-g64", best64, 4, 2),
        Config("k3v2-best-g64", best64, 3, 2),
        Config("static2-best-g64", best64, 2, 2),
        Config("k4v3-best-g64", best64, 4, 3),
        Config("static3-best-g64-sink8", best64, 3, 3, sink_bits=8),
        Config("k3v2-best-g64-sink8", best64, 3, 2, sink_bits=8),
        Config("random2.5-best-g64", best64, 2.5, 2.5, policy="random"),
        Config("attn2.5-best-g64", best64, 2.5, 2.5, policy="attention", sink_bits=8),
        Config("random3-best-g64", best64, 3, 3, policy="random"),
        Config("attn3-best-g64", best64, 3, 3, policy="attention", sink_bits=8),
        Config("attn-k3v2.5-best-g64", best64, 3, 2.5, policy="attention", sink_bits=8),
        Config("random-k3v2.5-best-g64", best64, 3, 2.5, policy="random"),
        Config("oracle3-lloyd-g64", lloyd64, 3, 3, policy="oracle"),
        Config("oracle-k3.5v2.5-lloyd-g64", lloyd64, 3.5, 2.5, policy="oracle"),
        Config("oracle-k4v3-lloyd-g64", lloyd64, 4, 3, policy="oracle"),
        Config("oracle2.8-lloyd-g64", lloyd64, 2.8, 2.8, policy="oracle"),
        Config("attn-k4v3-lloyd-g64", lloyd64, 4, 3, policy="attention"),
        Config("attn-k3.5v2.5-lloyd-g64", lloyd64, 3.5, 2.5, policy="attention"),
        Config("attn3-lloyd-g64-nosink", lloyd64, 3, 3, policy="attention"),
        Config("attn-k3.3v2.5-lloyd-g64", lloyd64, 3.3, 2.5, policy="attention"),
        Config("static-k4v2-lloyd-g64", lloyd64, 4, 2),
        Config("attn-k3.7v3-lloyd-g64", lloyd64, 3.7, 3, policy="attention"),
        Config("random-k4v3-lloyd-g64", lloyd64, 3.99, 3.0, policy="random"),
        Config("local-k3.5v2.5-lloyd-g64", lloyd64, 3.5, 2.5, policy="local"),
        Config("local-k4v3-lloyd-g64", lloyd64, 4, 3, policy="local"),
        Config("local-k3.3v2.5-lloyd-g64", lloyd64, 3.3, 2.5, policy="local"),
        Config("lloyd3-g64-center", lloyd64c, 3, 3),
        Config("lloyd-k4v3-g64-center", lloyd64c, 4, 3),
        Config("lloyd2-g64-center", lloyd64c, 2, 2),
        Config("lloyd-k3v2-g64-center", lloyd64c, 3, 2),
        Config("best3-g64-center", best64c, 3, 3),
        Config("sym3-g64", sym64, 3, 3),
        Config("lloyd3-g64", lloyd64, 3, 3),
        Config("lloyd3-g32", lloyd32, 3, 3),
        Config("lloyd2-g64", lloyd64, 2, 2),
        Config("lloyd4-g64", lloyd64, 4, 4),
        Config("lloyd-k4v3-g64", lloyd64, 4, 3),
        Config("lloyd-k3v2-g64", lloyd64, 3, 2),
        Config("sym2-g64", sym64, 2, 2),
        Config("sym4-g64", sym64, 4, 4),
        Config("lloyd3-g64-sink8", lloyd64, 3, 3, sink_bits=8),
        Config("attn2.5-lloyd-g64", lloyd64, 2.5, 2.5, policy="attention", sink_bits=8),
        Config("random2.5-lloyd-g64", lloyd64, 2.5, 2.5, policy="random"),
        Config("attn3-lloyd-g64", lloyd64, 3, 3, policy="attention", sink_bits=8),
        Config("random3-lloyd-g64", lloyd64, 3, 3, policy="random"),
    ]
    return {c.name: c for c in out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--calibration", type=int, default=4, help="windows for the centering means")
    ap.add_argument("--configs", default="all")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adakv_vllm.eval.tasks import wikitext_ids, wikitext_spans, wikitext_windows
    from adakv_vllm.model_store import resolve_model

    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sim = Simulator(model)
    windows = torch.tensor(wikitext_windows(tok, args.window, args.windows))
    # calibration text: windows shifted half a window from the scored ones (no scored token reused
    # as a whole window; screening only)
    ids = wikitext_ids(tok)
    spans = wikitext_spans(len(ids), args.window, args.windows)
    calib = torch.tensor(
        [ids[a + args.window // 2 : b + args.window // 2] for a, b in spans[: args.calibration]]
    )
    sim.calibrate(calib, args.batch)
    half = args.window // 2
    table = configs()
    names = list(table) if args.configs == "all" else args.configs.split(",")
    ref_logp, attention, oracle, local = [], [], [], []
    for i in range(0, len(windows), args.batch):
        logits, received = sim.forward(windows[i : i + args.batch], want_attention=True)
        ref_logp.append(F.log_softmax(logits[:, half - 1 : -1], -1))
        attention.append(received)
        oracle.append(sim.last_future)
        local.append(sim.last_local)
    attention, oracle, local = torch.cat(attention), torch.cat(oracle), torch.cat(local)
    targets = windows[:, half:]
    results = {}
    for name in names:
        cfg = table[name]
        started = time.time()
        gen = torch.Generator().manual_seed(0)
        kl, nll = [], []
        bits_sum = 0.0
        for i in range(0, len(windows), args.batch):
            ids = windows[i : i + args.batch]
            signal = {"oracle": oracle, "local": local}.get(cfg.policy, attention)
            kb, vb = zip(
                *(token_bits(cfg, args.window, signal[i + j], gen) for j in range(len(ids))), strict=True
            )
            kb, vb = torch.stack(kb), torch.stack(vb)
            bits_sum += float(kb.float().mean() + vb.float().mean()) / 2 * len(ids)
            logp = F.log_softmax(sim.forward(ids, cfg.quant, kb, vb)[:, half - 1 : -1], -1)
            ref = ref_logp[i // args.batch]
            kl.extend((ref.exp() * (ref - logp)).sum(-1).mean(-1).tolist())
            nll.extend((-logp.gather(-1, targets[i : i + len(ids), :, None]).squeeze(-1)).mean(-1).tolist())
        kl_t = torch.tensor(kl)
        ratio = 768 / cfg.bytes_per_token()
        results[name] = {
            "kl": kl_t.mean().item(),
            "kl_se": (kl_t.std() / math.sqrt(len(kl))).item(),
            "ppl": math.exp(sum(nll) / len(nll)),
            "capacity": ratio,
            "bits_per_element": 16 / ratio,
            "avg_code_bits": bits_sum / len(windows),
            "per_window_kl": kl,
        }
        r = results[name]
        print(
            f"{name:28s} cap {ratio:5.2f}x  eff bits {16 / ratio:5.2f}  "
            f"KL {r['kl']:.4f} +- {r['kl_se']:.4f}  "
            f"PPL {r['ppl']:6.2f}  ({time.time() - started:.0f} s)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
