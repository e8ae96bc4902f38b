"""One attention layer, decode (or a prefill chunk with --query-len): the fused kernel vs the scratch
path vs stock vLLM CPU attention.

    flock /tmp/adakv-engine.lock .venv/bin/python benchmarks/attention_micro.py [--quick]

Shape: SmolLM2-135M (9 query heads, 3 KV heads, head_size 64, bf16, block_size 32). For each batch
size, context length and bits, the blocks the step's query tokens fall in are open (FP16 staging:
the last one for decode) and the rest are sealed pages at `bits` (static). Three paths run side by
side on the same query:
  fused    kernels/cpu.py over the packed pages (ADAKV_CPU_ATTENTION=fused)
  scratch  backend.gather_scratch + vLLM's CPU kernel, exactly as AdaKVAttentionImpl.forward does
  stock    CPUAttentionBackendImpl.forward over a bf16 cache of the same shape (stock vLLM)
With --torch-decoder, a fourth column times the scratch path with the torch page decoder (what
KVStore.gather falls back to without the compiled library), beside the compiled one.
Each path cycles over `--layers` distinct copies of its cache (like a real step walks 30 layers), so
reads come from DRAM rather than a warm L3. Figures are medians of interleaved repeats (shared,
noisy machine); ratios > 1 mean the fused kernel is faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import types
from unittest import mock

import torch
from vllm import _custom_ops as ops
from vllm.config import set_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata, _get_attn_isa

from adakv_vllm.attention.backend import gather_scratch, scheduler_metadata
from adakv_vllm.blocks.spec import page_layout
from adakv_vllm.blocks.store import KVStore
from adakv_vllm.config import AdaKVConfig
from adakv_vllm.kernels import cpu, library
from adakv_vllm.kernels.page_codec import PageCodec

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, DTYPE = 9, 3, 64, 32, torch.bfloat16
SCALE = HEAD_SIZE**-0.5


def metadata(
    seq_lens: torch.Tensor, block_table: torch.Tensor, isa: str, q_len: int = 1
) -> CPUAttentionMetadata:
    b = seq_lens.numel()
    query_start_loc = torch.arange(b + 1, dtype=torch.int32) * q_len
    sched = scheduler_metadata(NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, DTYPE, isa, seq_lens, query_start_loc)
    return CPUAttentionMetadata(
        num_actual_tokens=b * q_len,
        max_query_len=q_len,
        query_start_loc=query_start_loc,
        max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens,
        block_table=block_table,
        slot_mapping=torch.zeros(b * q_len, dtype=torch.int64),
        scheduler_metadata=sched,
    )


# The layer the benchmark reads: not 0, whose forward also does the step's read accounting.
LAYER = 1


def make_store(layout, num_blocks: int, bits: int, open_blocks: torch.Tensor, gen) -> KVStore:
    """A KVStore whose blocks in LAYER are sealed at `bits` except `open_blocks` (staged)."""
    h, d, bs = NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE
    store = KVStore(layout, LAYER + 1, num_blocks, DTYPE, max_staging_slots=open_blocks.numel() + 1)
    kv_cache = torch.empty(num_blocks, h, bs, layout.page_bytes // (h * bs), dtype=torch.uint8)
    store.bind(LAYER, kv_cache)
    codec = PageCodec(layout, DTYPE)
    chunk = 256
    for start in range(0, num_blocks, chunk):
        n = min(chunk, num_blocks - start)
        key = torch.randn(n, bs, h, d, generator=gen).to(DTYPE)
        value = torch.randn(n, bs, h, d, generator=gen).to(DTYPE)
        b = torch.full((n, bs), bits)
        store.pages[LAYER][start : start + n] = codec.encode(key, value, b, b)
    store.sealed[:] = True
    slots = (open_blocks[:, None] * bs + torch.arange(bs)).reshape(-1)
    kv = torch.randn(slots.numel(), h, d, generator=gen).to(DTYPE)
    store.write(LAYER, slots, kv, kv)
    return store


def stock_impl() -> CPUAttentionBackendImpl:
    # The impl reads only these two fields of the current config (model dtype, context parallelism).
    config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(dtype=DTYPE),
        parallel_config=types.SimpleNamespace(decode_context_parallel_size=1),
    )
    with set_current_vllm_config(config):
        return CPUAttentionBackendImpl(NUM_HEADS, HEAD_SIZE, SCALE, NUM_KV_HEADS, None, None, "auto")


def run_case(
    batch: int,
    context: int,
    bits: int,
    layers: int,
    fused_module,
    min_time: float,
    q_len: int = 1,
    torch_decoder: bool = False,
) -> dict:
    gen = torch.Generator().manual_seed(0)
    bs, h, d = BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE
    blocks_per_seq = context // bs
    num_blocks = batch * blocks_per_seq
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    block_table = torch.randperm(num_blocks, generator=gen).to(torch.int32).reshape(batch, blocks_per_seq)
    # The blocks this step's query tokens write are still open (staged); earlier ones are sealed.
    open_blocks = max(1, -(-q_len // bs))
    isa = _get_attn_isa(DTYPE, bs, d)
    layer = types.SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    md = metadata(seq_lens, block_table, isa, q_len)
    impl = stock_impl()
    layout = page_layout(bs, h, d, AdaKVConfig(target_bits=bits, policy="static"))
    query = torch.randn(batch * q_len, NUM_HEADS, d, generator=gen).to(DTYPE)
    output = torch.empty_like(query)

    stores = [
        make_store(layout, num_blocks, bits, block_table[:, -open_blocks:].reshape(-1).to(torch.int64), gen)
        for _ in range(layers)
    ]
    caches = []
    for _ in range(layers):
        cache = torch.empty(num_blocks, h, 2 * bs, d, dtype=DTYPE)
        key_cache, value_cache = cache.chunk(2, dim=2)
        kv = torch.randn(num_blocks * bs, h, d, generator=gen).to(DTYPE)
        ops.cpu_attn_reshape_and_cache(kv, kv, key_cache, value_cache, torch.arange(num_blocks * bs), isa)
        caches.append(cache.view(num_blocks, h, bs, 2 * d))

    def fused(i):
        st = stores[i % layers]
        cpu.paged_attention(
            query,
            st.pages[LAYER],
            st.staging.key[LAYER],
            st.staging.value[LAYER],
            st.staging.slot_of_block,
            md.block_table,
            md.seq_lens,
            md.query_start_loc,
            layout,
            SCALE,
            out=output,
            module=fused_module,
        )

    def scratch(i):
        cache, table = gather_scratch(stores[i % layers], LAYER, md, isa)
        impl.forward(layer, query, None, None, cache, dataclasses.replace(md, block_table=table), output)

    def stock(i):
        impl.forward(layer, query, None, None, caches[i % layers], md, output)

    def scratch_torch(i):  # KVStore.gather decodes pages with PageCodec, as without a compiler
        with mock.patch.object(library, "load", lambda: None):
            scratch(i)

    paths = {"fused": fused, "scratch": scratch, "stock": stock}
    if torch_decoder:
        paths["scratch_torch"] = scratch_torch
    # One thread runs every path in this thread: count its CPU time, which other processes on a
    # shared machine do not inflate. Several threads: wall time.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in paths}
    iters = {}
    for name, fn in paths.items():  # warm up, and size each measurement to ~min_time
        fn(0)
        t0 = clock()
        fn(1)
        iters[name] = max(layers, int(min_time / max(clock() - t0, 1e-6)))
    for _ in range(5):
        for name, fn in paths.items():
            t0 = clock()
            for i in range(iters[name]):
                fn(i)
            times[name].append((clock() - t0) / iters[name] * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2, 8, 16])
    parser.add_argument("--layers", type=int, default=4, help="distinct cache copies cycled per path")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--query-len", type=int, default=1, help="query tokens per sequence (1: decode; >1: a prefill chunk)"
    )
    parser.add_argument("--quick", action="store_true", help="batch 16, context 4096, 4 bits only")
    parser.add_argument(
        "--torch-decoder",
        action="store_true",
        help="also time the scratch path with the torch page decoder (the fallback without a compiler)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # vLLM's AMX kernel (scratch and stock paths) runs only once Linux granted AMX tiles, which an
    # engine's first bf16 matmul (oneDNN) has asked for by the time attention runs; here none ran
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()
    if args.quick:
        args.batch, args.context, args.bits = [16], [4096], [4]
    module = library.build()
    clock = "thread CPU time" if torch.get_num_threads() == 1 else "wall time"
    print(
        f"threads={torch.get_num_threads()} ({clock}) avx512={module.has_avx512()} layers={args.layers} "
        f"query_len={args.query_len}"
    )
    torch_column = f" {'scr+torch':>9}" if args.torch_decoder else ""
    print(
        f"{'batch':>5} {'ctx':>5} {'bits':>4} | {'fused':>8} {'scratch':>8} {'stock':>8}{torch_column} ms | "
        f"{'stock/fused':>11} {'scratch/fused':>13}"
    )
    for batch in args.batch:
        for context in args.context:
            for bits in args.bits:
                r = run_case(
                    batch,
                    context,
                    bits,
                    args.layers,
                    module,
                    args.min_time,
                    args.query_len,
                    args.torch_decoder,
                )
                times = f"{r['fused']:8.3f} {r['scratch']:8.3f} {r['stock']:8.3f}"
                times += f" {r['scratch_torch']:9.3f} ms" if args.torch_decoder else " ms"
                ratios = f"{r['stock'] / r['fused']:11.2f} {r['scratch'] / r['fused']:13.2f}"
                print(f"{batch:>5} {context:>5} {bits:>4} | {times} | {ratios}", flush=True)


if __name__ == "__main__":
    main()
