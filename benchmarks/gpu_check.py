"""One prepared GPU check: both Triton kernels against the oracle on SmolLM2 shapes, then decode
attention timed against a stock bf16 baseline, as ratios. Run it through benchmarks/gpu_check.sh.

    1. seal      kernels/triton_seal.seal_pages on the GPU vs PageCodec.encode on the CPU, byte for byte
                 (512 pages per bits config), and its time per page.
    2. oracle    the dense reference used below == kernels/attention_ref.paged_attention_ref on a
                 small problem (so the large checks are checks against the oracle).
    3. decode    kernels/triton_decode.paged_attention_triton vs that reference, for contexts
                 1k/4k/8k x batch 1/16 x bits 2/3/4/8/16/mixed/low, last block of every sequence staged,
                 shuffled block table; timed (eager call, and CUDA-graph replay where capture works)
                 against the baseline over the same context in bf16.

Baseline: vLLM's own Triton paged decode (`unified_attention`) when vllm imports, else torch SDPA
over contiguous bf16 K/V with GQA (FlashAttention on Hopper); the script says which it used.
SmolLM2-135M: 9 query heads, 3 KV heads, head_size 64, block_size 32, group 32, bf16 (quantized keys
and values Hadamard-rotated, as every page is).
Needs torch with CUDA and triton (no vLLM, no network). Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

BLOCK_SIZE, NUM_KV_HEADS, NUM_HEADS, HEAD_SIZE, GROUP_SIZE = 32, 3, 9, 64, 32
DTYPE = torch.bfloat16
CONTEXTS = (1024, 4096, 8192)
BATCHES = (1, 16)
BITS = ("2", "3", "4", "8", "16", "mixed", "low")  # mixed: uniform over 2/3/4/8/16; low: over 2/3/4
DEV = "cuda"  # "cpu" only for --cpu-dry-run (TRITON_INTERPRET=1): checks this script, times nothing real
# Output tolerance (fp32 out) against the fp32 reference, as in tests/kernels/test_triton_decode.py:
# summation order, exp, fused multiply-adds and the rotation moved onto the query and the value sum
# differ from the oracle by a few fp32 ulps.
RTOL, ATOL = 1e-5, 2e-6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one context, fewer bits (a smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json")
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="tiny shapes on CPU under TRITON_INTERPRET=1 (script check)",
    )
    args = parser.parse_args()
    global DEV, CONTEXTS, BATCHES
    if args.cpu_dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_check: --cpu-dry-run needs TRITON_INTERPRET=1 in the environment")
            return 2
        DEV, CONTEXTS, BATCHES = "cpu", (64, 96), (1, 2)
    elif not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; this script needs one (python3 with torch+CUDA, triton)")
        return 2
    import triton

    from adakv_vllm.kernels.triton_decode import paged_attention_triton
    from adakv_vllm.kernels.triton_seal import seal_pages

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is fp32
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_properties(0).name if DEV == "cuda" else "cpu (interpreter dry run)"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 0
    print(f"device {name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}")
    baseline = Baseline()
    print(f"baseline: {baseline.name}")
    contexts = CONTEXTS[:1] if args.quick else CONTEXTS
    bits_list = ("3", "mixed") if args.quick else BITS
    report = {"device": name, "baseline": baseline.name, "seal": [], "decode": []}
    ok = True
    start = time.time()

    for bits in bits_list:
        row = check_seal(seal_pages, bits)
        report["seal"].append(row)
        ok &= row["ok"]
        print(seal_line(row))

    ok &= check_dense_reference_is_the_oracle()
    for bits in bits_list:
        pool = Pool(bits, max(contexts), max(BATCHES))
        for context in contexts:
            for batch in BATCHES:
                row = check_decode(paged_attention_triton, pool, context, batch, baseline)
                report["decode"].append(row)
                ok &= row["ok"]
                print(decode_line(row))
        del pool
        if DEV == "cuda":
            torch.cuda.empty_cache()

    table = (
        format_table(report) + f"\ntotal {time.time() - start:.0f} s; all checks {'PASS' if ok else 'FAIL'}"
    )
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "gpu_check_table.txt"), "w") as f:
            f.write(table + "\n")
    return 0 if ok else 1


# ---- problems ----------------------------------------------------------------------------------
def codec_for(bits: str, key_bits: torch.Tensor | None = None, value_bits: torch.Tensor | None = None):
    """A PageCodec whose page fits `bits`: the target size for uniform bits, else the largest page
    the given bit maps need (a budget sized to its content, as the seal planner would choose)."""
    from adakv_vllm.kernels.page_codec import PageCodec
    from adakv_vllm.quant import format as fmt
    from adakv_vllm.quant.precision import PRECISIONS

    record = fmt.RecordLayout(HEAD_SIZE, GROUP_SIZE)
    if bits.isdigit():
        page_bytes = fmt.page_bytes_for_target(BLOCK_SIZE, NUM_KV_HEADS, record, int(bits), int(bits))
    else:
        full = fmt.page_bytes_for_target(BLOCK_SIZE, NUM_KV_HEADS, record, 16, 16)
        header = fmt.PageLayout(BLOCK_SIZE, NUM_KV_HEADS, record, full).header_bytes
        rec = torch.zeros(17, dtype=torch.int64)  # record bytes by bit-width
        for p in PRECISIONS:
            rec[p.bits] = record.record_bytes(p)
        used = header + NUM_KV_HEADS * (rec[key_bits].sum(1) + rec[value_bits].sum(1))
        page_bytes = (int(used.max()) + fmt.PAGE_ALIGN - 1) // fmt.PAGE_ALIGN * fmt.PAGE_ALIGN
    layout = fmt.PageLayout(BLOCK_SIZE, NUM_KV_HEADS, record, page_bytes)
    return PageCodec(layout, DTYPE)


def random_bits(bits: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, BLOCK_SIZE] int64 bit-widths."""
    from adakv_vllm.quant.precision import ALL_BITS

    if bits.isdigit():
        return torch.full((n, BLOCK_SIZE), int(bits))
    choices = torch.tensor(ALL_BITS if bits == "mixed" else (2, 3, 4))
    return choices[torch.randint(0, choices.numel(), (n, BLOCK_SIZE), generator=gen)]


def random_kv(n: int, gen: torch.Generator):
    """[n, BLOCK_SIZE, H, D] bf16 keys (a few outlier channels, as real keys have) and values (CPU)."""
    key = torch.randn(n, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, generator=gen)
    key[..., :3] *= 6
    value = torch.randn(n, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, generator=gen)
    return key.to(DTYPE), value.to(DTYPE)


# ---- 1. seal -------------------------------------------------------------------------------------
def bench(fn) -> float:
    """Median ms per call (CUDA events); one wall-clock call in a CPU dry run."""
    if DEV == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def check_seal(seal_pages, bits: str) -> dict:
    n = 512 if DEV == "cuda" else 4
    gen = torch.Generator().manual_seed(1)
    key, value = random_kv(n, gen)
    kb, vb = random_bits(bits, n, gen), random_bits(bits, n, gen)
    codec = codec_for(bits, kb, vb)
    expected = codec.encode(key, value, kb, vb)  # CPU, the oracle's bytes
    dev = [x.to(DEV) for x in (key, value, kb, vb)]
    pages = seal_pages(codec, *dev).cpu()
    # The rotation is exact butterflies on any device, so pages must be byte-equal; the one
    # documented exception (triton_seal.py: fp64 error sums in another order deciding a near-tie
    # between two clip factors) would show here as a differing page.
    differ = (pages != expected).any(1)
    ms = bench(lambda: seal_pages(codec, *dev))
    return {
        "bits": bits,
        "pages": n,
        "page_bytes": codec.layout.page_bytes,
        "equal": bool(not differ.any()),
        "pages_differing": int(differ.sum()),
        "us_per_page": ms * 1e3 / n,
        "ok": bool(not differ.any()),
    }


# ---- 2./3. decode ------------------------------------------------------------------------------
def dense_reference(query, key, value, staged_key, staged_value, block_table, seq_len, scale):
    """Decode attention of one query token per sequence, fp32, on query's device.

    query [B, H, D]; key/value [num_blocks, BLOCK_SIZE, H_kv, D] fp32 decoded pages; staged_key/value
    [B, BLOCK_SIZE, H_kv, D]: the exact last block of each sequence; block_table [B, >= nb].
    """
    nb = math.ceil(seq_len / BLOCK_SIZE)
    b = query.shape[0]
    k = key[block_table[:, :nb]].clone()  # [B, nb, bs, H_kv, D]
    v = value[block_table[:, :nb]].clone()
    k[:, -1], v[:, -1] = staged_key.float(), staged_value.float()
    k = k.reshape(b, nb * BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)[:, :seq_len]
    v = v.reshape(b, nb * BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)[:, :seq_len]
    q = query.float().reshape(b, NUM_KV_HEADS, -1, HEAD_SIZE)  # [B, H_kv, group, D]
    scores = torch.einsum("bgjd,bkgd->bgjk", q, k) * scale
    return torch.einsum("bgjk,bkgd->bgjd", scores.softmax(-1), v).reshape(b, -1, HEAD_SIZE)


def check_dense_reference_is_the_oracle() -> bool:
    """The dense reference, given codec-decoded pages, equals paged_attention_ref (CPU, small)."""
    from adakv_vllm.kernels.attention_ref import paged_attention_ref

    gen = torch.Generator().manual_seed(2)
    batch, seq_len = 3, 300
    nb = math.ceil(seq_len / BLOCK_SIZE)
    key, value = random_kv(batch * nb, gen)
    kb, vb = random_bits("mixed", batch * nb, gen), random_bits("mixed", batch * nb, gen)
    codec = codec_for("mixed", kb, vb)
    pages = codec.encode(key, value, kb, vb)
    table = torch.randperm(batch * nb, generator=gen).reshape(batch, nb)
    staging_slot = torch.full((batch * nb,), -1, dtype=torch.int64)
    staging_slot[table[:, -1]] = torch.arange(batch)
    query = torch.randn(batch, NUM_HEADS, HEAD_SIZE, generator=gen).to(DTYPE)
    expected = paged_attention_ref(
        query, pages, key[table[:, -1]], value[table[:, -1]], staging_slot, table,
        torch.full((batch,), seq_len), torch.arange(batch + 1), codec, HEAD_SIZE**-0.5,
    )  # fmt: skip
    k, v, _, _ = codec.decode(pages)
    dense = dense_reference(
        query, k, v, key[table[:, -1]], value[table[:, -1]], table, seq_len, HEAD_SIZE**-0.5
    )
    same = torch.allclose(dense, expected, rtol=1e-5, atol=1e-6)  # fp32 summation order only
    print(f"dense reference == paged_attention_ref: {same} (max diff {(dense - expected).abs().max():.1e})")
    return same


class Pool:
    """Pages for max_batch sequences of max_context tokens, sealed on the GPU, decoded by the codec."""

    def __init__(self, bits: str, max_context: int, max_batch: int):
        from adakv_vllm.kernels.triton_seal import seal_pages

        gen = torch.Generator().manual_seed(3)
        self.bits = bits
        self.num_blocks = max_batch * math.ceil(max_context / BLOCK_SIZE)
        key, value = random_kv(self.num_blocks, gen)
        kb, vb = random_bits(bits, self.num_blocks, gen), random_bits(bits, self.num_blocks, gen)
        self.codec = codec_for(bits, kb, vb)
        self.pages = seal_pages(self.codec, key.to(DEV), value.to(DEV), kb.to(DEV), vb.to(DEV))
        k, v, _, _ = self.codec.decode(self.pages.cpu())  # the oracle's view of these bytes
        self.key, self.value = k.to(DEV), v.to(DEV)  # [num_blocks, bs, H_kv, D] fp32
        self.raw_key, self.raw_value = key.to(DEV), value.to(DEV)  # bf16: the baseline's cache
        self.perm = torch.randperm(self.num_blocks, generator=gen).to(DEV)
        self.avg_bits = float((kb.float().mean() + vb.float().mean()) / 2)


class Baseline:
    """Stock bf16 decode attention over the same context: vLLM's paged Triton kernel, else SDPA."""

    def __init__(self):
        self.vllm_attention = None
        if DEV == "cpu":
            self.name = "torch SDPA on CPU (dry run)"
            return
        try:
            from vllm.v1.attention.ops.triton_unified_attention import unified_attention

            self.vllm_attention = unified_attention
            self.name = "vLLM unified_attention (paged bf16 Triton)"
        except Exception as e:  # noqa: BLE001 - any import failure means: use SDPA
            self.name = (
                f"torch SDPA, contiguous bf16 K/V, enable_gqa (vllm not importable: {type(e).__name__})"
            )

    def prepare(self, pool: Pool, table: torch.Tensor, context: int, query: torch.Tensor):
        """-> a zero-argument callable running the baseline once."""
        batch = query.shape[0]
        scale = HEAD_SIZE**-0.5
        if self.vllm_attention is not None:
            try:
                return self._prepare_vllm(pool, table, context, query, scale)
            except Exception as e:  # noqa: BLE001
                print(f"vLLM baseline failed ({type(e).__name__}: {e}); using SDPA")
                self.vllm_attention = None
                self.name = "torch SDPA, contiguous bf16 K/V, enable_gqa (vLLM call failed)"
        nb = math.ceil(context / BLOCK_SIZE)
        k = pool.raw_key[table[:, :nb]].reshape(batch, -1, NUM_KV_HEADS, HEAD_SIZE)[:, :context]
        v = pool.raw_value[table[:, :nb]].reshape(batch, -1, NUM_KV_HEADS, HEAD_SIZE)[:, :context]
        k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [B, H_kv, ctx, D]
        q = query.unsqueeze(2)  # [B, H, 1, D]
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def _prepare_vllm(self, pool, table, context, query, scale):
        batch = query.shape[0]
        out = torch.empty_like(query)
        cu = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
        seq = torch.full((batch,), context, dtype=torch.int32, device=DEV)
        descale = torch.ones(batch, NUM_KV_HEADS, dtype=torch.float32, device=DEV)
        kwargs = dict(
            q=query, k=pool.raw_key, v=pool.raw_value, out=out, cu_seqlens_q=cu, max_seqlen_q=1,
            seqused_k=seq, max_seqlen_k=context, softmax_scale=scale, causal=True, window_size=(-1, -1),
            block_table=table.to(torch.int32), softcap=0, q_descale=None, k_descale=descale,
            v_descale=descale,
        )  # fmt: skip
        self.vllm_attention(**kwargs)
        return lambda: self.vllm_attention(**kwargs)


def check_decode(paged_attention_triton, pool: Pool, context: int, batch: int, baseline: Baseline) -> dict:
    gen = torch.Generator().manual_seed(context + batch)
    nb = math.ceil(context / BLOCK_SIZE)
    table = pool.perm[: batch * nb].reshape(batch, nb)  # shuffled blocks of the pool
    staging_slot = torch.full((pool.num_blocks,), -1, dtype=torch.int64, device=DEV)
    staging_slot[table[:, -1]] = torch.arange(batch, device=DEV)  # the open (staged) last block
    staged_key, staged_value = pool.raw_key[table[:, -1]], pool.raw_value[table[:, -1]]
    query = torch.randn(batch, NUM_HEADS, HEAD_SIZE, generator=gen).to(DTYPE).to(DEV)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEV)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
    scale = HEAD_SIZE**-0.5
    out = torch.empty(batch, NUM_HEADS, HEAD_SIZE, dtype=torch.float32, device=DEV)

    def ours():
        return paged_attention_triton(
            query, pool.pages, staged_key, staged_value, staging_slot, table, seq_lens, qsl, pool.codec,
            scale, out=out, max_seq_len=context,
        )  # fmt: skip

    ours()
    expected = dense_reference(query, pool.key, pool.value, staged_key, staged_value, table, context, scale)
    err = (out - expected).abs()
    ok = bool((err <= ATOL + RTOL * expected.abs()).all())
    base = baseline.prepare(pool, table, context, query)
    ms, base_ms = bench(ours), bench(base)
    graph_ms, graph_base_ms = (graph_time(ours), graph_time(base)) if DEV == "cuda" else (None, None)
    ours_bytes = batch * nb * pool.codec.layout.page_bytes  # pages read (staged block aside)
    base_bytes = batch * context * NUM_KV_HEADS * HEAD_SIZE * 2 * 2  # bf16 K and V
    return {
        "bits": pool.bits,
        "avg_bits": pool.avg_bits,
        "context": context,
        "batch": batch,
        "ok": ok,
        "max_err": float(err.max()),
        "ms": ms,
        "base_ms": base_ms,
        "ratio": ms / base_ms,
        "graph_ms": graph_ms,
        "graph_base_ms": graph_base_ms,
        "graph_ratio": graph_ms / graph_base_ms if graph_ms and graph_base_ms else float("nan"),
        "ours_GBps": ours_bytes / (graph_ms or ms) / 1e6,
        "base_GBps": base_bytes / (graph_base_ms or base_ms) / 1e6,
        "bytes_ratio": ours_bytes / base_bytes,
    }


def graph_time(fn, replays: int = 20) -> float | None:
    """ms per call from a CUDA graph of `replays` calls (no launch gaps), or None if capture fails."""
    try:
        fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(replays):
                fn()
        return bench(graph.replay) / replays
    except Exception as e:  # noqa: BLE001 - report and time eagerly only
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]})")
        torch.cuda.synchronize()
        return None


def seal_line(r: dict) -> str:
    return (
        f"seal bits={r['bits']:<6} ok={r['ok']!s:<5} bytes equal {r['equal']} "
        f"({r['pages_differing']}/{r['pages']} pages differ)  {r['us_per_page']:.2f} us/page"
    )


def decode_line(r: dict) -> str:
    return (
        f"decode bits={r['bits']:<9} ctx={r['context']:<5} batch={r['batch']:<2} ok={r['ok']!s:<5} "
        f"max_err={r['max_err']:.2e}  ours {r['ms']:.4f} ms, base {r['base_ms']:.4f} ms "
        f"(x{r['ratio']:.2f}; graph x{r['graph_ratio']:.2f})"
    )


def format_table(report: dict) -> str:
    lines = [
        f"\nbaseline: {report['baseline']}",
        "decode attention, ms per call (median); ratio = ours / baseline; g. = CUDA-graph replay",
        f"{'bits':<10}{'avg':>5}{'ctx':>6}{'B':>4}{'ok':>6}{'ours':>9}{'base':>9}{'ratio':>7}"
        f"{'g.ours':>9}{'g.base':>9}{'g.ratio':>8}{'GB/s':>7}{'bytes':>7}",
    ]
    for r in report["decode"]:
        g_ours = f"{r['graph_ms']:.4f}" if r["graph_ms"] else "-"
        g_base = f"{r['graph_base_ms']:.4f}" if r["graph_base_ms"] else "-"
        lines.append(
            f"{r['bits']:<10}{r['avg_bits']:>5.1f}{r['context']:>6}{r['batch']:>4}{r['ok']!s:>6}"
            f"{r['ms']:>9.4f}{r['base_ms']:>9.4f}{r['ratio']:>7.2f}{g_ours:>9}{g_base:>9}"
            f"{r['graph_ratio']:>8.2f}{r['ours_GBps']:>7.0f}{r['bytes_ratio']:>7.2f}"
        )
    lines.append("bytes = our page bytes read / baseline bf16 K+V bytes; GB/s = our bytes / our time")
    seal_ok = all(r["ok"] for r in report["seal"])
    us = [r["us_per_page"] for r in report["seal"]]
    lines.append(
        f"seal: {len(us)} configs ok={seal_ok}, {min(us):.2f}-{max(us):.2f} us/page (launcher included)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
