"""The learned controller's inputs: one definition, used by the scheduler at seal time and by training.

Every feature is a function of the token, its prefix and what its writer measured, so a block's bits
stay a deterministic function of its content (the prefix-caching rule of engine/scheduler.py).

    name          definition (units)                                              normalisation
    log_qerr2..8  ln relative L2 error ||x - stored(x)|| / ||x|| at 2, 3, 4 and 8   ln, clamped to
                  bits, mean over layers, KV heads and K/V (the store's quantizer);  [-12, 2]; unknown
                  "quality score", measured by the worker at write                  -> typical value
    log_position  ln(1 + position in the sequence); sinks sit at 0                  / ln 8192
    rarity        the paper's -ln((count + 1) / (N + |V| + 1)), count = earlier     / ln(N + |V| + 1)
                  occurrences of the id in the sequence, N = position
    seq_freq      count / (N + 1): in-sequence frequency so far                     none (in [0, 1))
    token_rank    ln(1 + token id): BPE ids are ordered by merge, so low ids are    / ln |V|
                  frequent pieces (a corpus-free rarity prior)
    entropy       entropy (nats) of the next-token distribution that produced the   / ln |V|
                  token: the sampler's for generated tokens; for prompt tokens only
                  when prompt logits are computed, else missing (0)
    confidence    probability of the token under that distribution (missing: 0)     none
    has_dist      1 when entropy/confidence are known, else 0                        none
    attention     mean attention the token received from the later queries of its   none (in [0, 1])
                  own block while it was open (the worker's measurement; missing: 0)
    has_attention 1 when attention is known                                         none
"""

from __future__ import annotations

import math

import torch

from adakv_vllm.quant.precision import Precision

FEATURE_NAMES: tuple[str, ...] = (
    "log_qerr2",
    "log_qerr3",
    "log_qerr4",
    "log_qerr8",
    "log_position",
    "rarity",
    "seq_freq",
    "token_rank",
    "entropy",
    "confidence",
    "has_dist",
    "attention",
    "has_attention",
)
# The precisions whose reconstruction error the worker measures for every written token (the
# log_qerr features, in this order); 16 bits has none.
QERR_BITS: tuple[int, ...] = (2, 3, 4, 8)
QERR_PRECISIONS: tuple[Precision, ...] = tuple(Precision(bits) for bits in QERR_BITS)
NUM_QERR = len(QERR_BITS)
MAX_POSITION = 8192
LOG_QERR_RANGE = (-12.0, 2.0)
# ln of typical relative errors at QERR_BITS (a Gaussian vector under the codebook quantizer): used
# when a writer reported none
TYPICAL_LOG_QERR = torch.tensor([math.log(0.33), math.log(0.17), math.log(0.083), math.log(0.0057)])


def feature_matrix(
    token_ids: torch.Tensor,  # [T] int64
    positions: torch.Tensor,  # [T] int64
    prior_count: torch.Tensor,  # [T] int64, earlier occurrences of the id in the sequence
    qerr: torch.Tensor,  # [T, NUM_QERR] relative error at QERR_BITS, NaN = unknown
    entropy: torch.Tensor,  # [T] nats, NaN = unknown
    prob: torch.Tensor,  # [T], NaN = unknown
    attention: torch.Tensor,  # [T], NaN = unknown
    vocab_size: int,
) -> torch.Tensor:
    """-> [T, len(FEATURE_NAMES)] fp32."""
    pos = positions.to(torch.float32)
    count = prior_count.to(torch.float32)
    log_qerr = qerr.to(torch.float32).clamp_min(1e-12).log().clamp(*LOG_QERR_RANGE)
    log_qerr = torch.where(torch.isnan(log_qerr), TYPICAL_LOG_QERR.expand_as(log_qerr), log_qerr)
    norm = (pos + vocab_size + 1).log()
    known = ~(torch.isnan(entropy) | torch.isnan(prob))
    seen = ~torch.isnan(attention)
    columns = [
        *log_qerr.unbind(-1),
        torch.log1p(pos) / math.log(MAX_POSITION),
        -torch.log((count + 1) / (pos + vocab_size + 1)) / norm,
        count / (pos + 1),
        torch.log1p(token_ids.to(torch.float32)) / math.log(vocab_size),
        torch.where(known, entropy.float(), 0.0) / math.log(vocab_size),
        torch.where(known, prob.float(), 0.0),
        known.float(),
        torch.where(seen, attention.float(), 0.0),
        seen.float(),
    ]
    return torch.stack(columns, -1)
