"""The per-page budget: choose each token's precision so the page fits, greedily by gain per byte.

Given, per token, a weight w and a distortion d(p) for each precision p (non-increasing in p), the
planner maximises sum_t w_t * (d_t(2) - d_t(b_t)) subject to sum_t bytes(b_t) <= budget: every token
starts at 2 bits, then the upgrade step (to the next precision) with the largest gain per extra byte
is taken while it fits (a greedy knapsack, as in Huffman-style allocation; DESIGN.md section 2).
Steps with zero gain are never taken, so a static policy does not spend slack bytes. Ties break by
token position, so the result is a deterministic function of its inputs.
"""

from __future__ import annotations

import heapq

import torch

from adakv_vllm.kernels import cpu, library
from adakv_vllm.quant.precision import PRECISIONS

BITS = torch.tensor([p.bits for p in PRECISIONS])  # precision code -> bit-width


def allocate(
    weight: torch.Tensor,
    distortion: torch.Tensor,
    cost: torch.Tensor,
    budget: int,
    floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """weight: [T] >= 0; distortion: [T, P] per precision code (P = len(PRECISIONS)); cost: [P]
    bytes one token costs at each precision; budget: bytes for the T tokens; floor: optional [T]
    bit-widths granted first (in position order, as far as the budget allows) before the greedy
    competition.
    Returns [T] int64 bit-widths."""
    num_tokens = weight.numel()
    codes = [0] * num_tokens
    spent = int(cost[0]) * num_tokens
    if spent > budget:
        raise ValueError(
            f"{num_tokens} tokens at {PRECISIONS[0].bits} bits need {spent} bytes > budget {budget}"
        )
    w, d, c = weight.tolist(), distortion.tolist(), [int(x) for x in cost]
    if floor is not None:
        floor_codes = [next(i for i, p in enumerate(PRECISIONS) if p.bits >= b) for b in floor.tolist()]
        for t, target in enumerate(floor_codes):
            while codes[t] < target and spent + c[codes[t] + 1] - c[codes[t]] <= budget:
                spent += c[codes[t] + 1] - c[codes[t]]
                codes[t] += 1

    def step(t: int):
        code = codes[t]
        if code + 1 >= len(PRECISIONS):
            return None
        gain = d[t][code] - d[t][code + 1]
        if gain <= 0 or w[t] <= 0:
            return None
        return (-w[t] * gain / (c[code + 1] - c[code]), t, code)

    heap = [s for s in (step(t) for t in range(num_tokens)) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, t, code = heapq.heappop(heap)
        extra = c[code + 1] - c[code]
        if spent + extra > budget:
            continue  # this token cannot climb further; cheaper steps of others may still fit
        spent += extra
        codes[t] = code + 1
        nxt = step(t)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return BITS[torch.tensor(codes, dtype=torch.int64)]


def allocate_pages(
    weight: torch.Tensor,
    distortion: torch.Tensor,
    cost: torch.Tensor,
    budget: int,
    floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """`allocate` for n pages at once: weight [n, T], distortion [n, T, P], floor [n, T] bit-widths or
    None -> [n, T] int64 bit-widths, page i's exactly allocate(weight[i], distortion[i], ...). By the
    compiled planner of kernels/cpu.py where it builds (one call for all pages instead of a Python
    heap per page: a seal list of a 4096-token prompt is 128 pages per part), else page by page."""
    module = library.load()
    if module is not None:
        # a floor bit-width -> the first precision with at least those bits (past 16: no such code)
        codes_of_floor = None if floor is None else torch.searchsorted(BITS, floor.to(torch.int64))
        codes = cpu.plan_pages(weight, distortion, cost, budget, codes_of_floor, module)
        if codes is not None:
            return BITS[codes]
    pages = [
        allocate(weight[i], distortion[i], cost, budget, None if floor is None else floor[i])
        for i in range(len(weight))
    ]
    return torch.stack(pages) if pages else torch.empty(weight.shape, dtype=torch.int64)
