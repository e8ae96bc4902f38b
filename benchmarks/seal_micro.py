"""The page encoder's cost (kernels/cpu.encode_pages, csrc/cpu_seal.cpp) on SmolLM2-135M shapes, no engine.

    .venv/bin/python benchmarks/seal_micro.py [--bits 4 3 2 8 16 mixed] [--pages 256] [--threads 1 2]

Seals `--pages` pages of 32 tokens x 3 KV heads x head_size 64 (the default layout: group 64, a page
budget of 4 bits per element) from bf16 K/V with outlier key channels, at one precision for every
record, or `mixed` (2/3/4/8/16 per token, key and value apart, lowered until the page fits). Prints
the median and best wall time of a call and nanoseconds per record (one token's key or value in one
head) for each thread count; the pages' md5 shows that two builds wrote the same bytes. Compare
builds side by side (a git worktree of the other commit on PYTHONPATH), in one session: figures on a
shared machine drift by tens of percent over minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch

from adakv_vllm.kernels import cpu, library
from adakv_vllm.quant import format as fmt
from adakv_vllm.quant.precision import ALL_BITS

BLOCK, HEADS, HEAD_SIZE, GROUP = 32, 3, 64, 64


def inputs(bits: str, pages: int, layout: fmt.PageLayout, gen: torch.Generator):
    shape = (pages, BLOCK, HEADS, HEAD_SIZE)
    key = (torch.randn(*shape, generator=gen) * torch.linspace(0.1, 8, HEAD_SIZE)).bfloat16()
    value = torch.randn(*shape, generator=gen).bfloat16()
    if bits != "mixed":
        kb = torch.full((pages, BLOCK), int(bits))
        return key, value, kb, kb.clone()
    choices = torch.tensor(ALL_BITS)
    kb, vb = (choices[torch.randint(0, len(ALL_BITS), (pages, BLOCK), generator=gen)] for _ in range(2))
    for i in range(pages):  # lower tokens to 2 bits, keys and values in turn, until the page fits
        pos = 0
        while not layout.fits(kb[i], vb[i]):
            (kb if pos // BLOCK % 2 == 0 else vb)[i, pos % BLOCK] = 2
            pos += 1
    return key, value, kb, vb


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", nargs="+", default=["4", "3", "mixed"])
    parser.add_argument("--pages", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    for b in args.bits:
        if b != "mixed" and not (b.isdigit() and int(b) in ALL_BITS):
            parser.error(f"--bits takes {list(ALL_BITS)} or mixed, got {b}")
    for name in ("pages", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.threads) < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    module = library.build()
    record = fmt.RecordLayout(HEAD_SIZE, GROUP)
    layout = fmt.PageLayout(BLOCK, HEADS, record, fmt.page_bytes_for_target(BLOCK, HEADS, record, 4.0, 4.0))
    threads = torch.get_num_threads()
    records = args.pages * BLOCK * HEADS * 2
    try:
        for bits in args.bits:
            key, value, kb, vb = inputs(bits, args.pages, layout, torch.Generator().manual_seed(0))
            pages = cpu.encode_pages(key, value, kb, vb, layout, torch.bfloat16, module)
            digest = hashlib.md5(pages.numpy().tobytes()).hexdigest()[:12]
            for n in args.threads:
                torch.set_num_threads(n)
                cpu.encode_pages(key, value, kb, vb, layout, torch.bfloat16, module)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    cpu.encode_pages(key, value, kb, vb, layout, torch.bfloat16, module)
                    times.append(time.perf_counter() - start)
                times.sort()
                median = times[len(times) // 2]
                print(
                    f"bits {bits:>5}  threads {n}  {args.pages} pages: median {median * 1e3:7.2f} ms, "
                    f"best {times[0] * 1e3:7.2f} ms, {median / records * 1e9:6.1f} ns/record  md5 {digest}"
                )
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
