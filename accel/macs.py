"""Analytic multiply-accumulates (MACs) of one generation under a policy, without running the model.

Counted: the transformer blocks and the head, the parts a policy changes. Not counted: the text encoder and the
text conditioning (once per generation), the scale-input embedding, token reduction and restoration, bit
sampling and the VAE. FLOPs = 2 x MACs.

At scale k the policy's plan gives the rows R (2B under CFG until a branch is dropped, else B) and, per block,
the tokens each branch runs on: n_sa, n_ca, n_ffn (M = h * w, r under a token subset, fewer under a router).
With C the width, F the FFN width, T the (padded) text length, b the bits per token and L the block's KV length
after this scale (the self-attention tokens of every scale so far):

    self-attention   R (4 C^2 n_sa + 2 C n_sa L)             q, k, v and out projections; QK^T and AV
    cross-attention  R (2 C^2 n_ca + 2 C^2 T + 2 C n_ca T)   q and out projections; text K/V; QK^T and AV
    feed-forward     R 2 C F n_ffn
    head             R (2 C^2 + 2 b C M)                     AdaLN from the pooled text; two logits per bit

A skipped scale costs nothing and adds nothing to the KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from accel.sampler import BaselinePolicy, Policy
from models.infinity import InfinityConfig
from models.schedules import Grid

BRANCHES = ("sa", "ca", "ffn")


@dataclass(frozen=True)
class ScaleMacs:
    index: int
    grid: Grid
    rows: int  # CFG rows that ran (0 when skipped)
    tokens: int  # tokens entering the first block
    kv_lengths: list[int]  # per block, after this scale
    macs: int


@dataclass(frozen=True)
class MacCount:
    scales: list[ScaleMacs]

    @property
    def total(self) -> int:
        return sum(scale.macs for scale in self.scales)


def count_macs(
    config: InfinityConfig,
    schedule: Sequence[Grid],
    policy: Policy | None = None,
    *,
    batch_size: int,
    text_length: int,
    guidance: bool = True,
) -> MacCount:
    """MACs per scale of generating `batch_size` images with `policy` (the baseline when None).

    `guidance`: whether CFG runs (any cfg != 1), i.e. two rows per prompt until the policy drops a branch.
    """
    policy = policy or BaselinePolicy()
    C, F, T = config.embed_dim, config.mlp_hidden, text_length
    kv_lengths = [0] * config.depth
    both_branches = guidance
    scales = []
    for k, (h, w) in enumerate(schedule):
        plan = policy.plan(k, (h, w), schedule)
        if plan.skip:
            scales.append(ScaleMacs(k, (h, w), 0, 0, list(kv_lengths), 0))
            continue
        both_branches = both_branches and plan.branches == "both"
        rows = batch_size * (2 if both_branches else 1)
        blocks_per_chunk = config.depth // config.block_chunks
        chunk_tokens = [
            h * w if plan.token_subset is None else plan.token_subset.num_tokens((h, w), chunk)
            for chunk in range(config.block_chunks)
        ]
        per_row = 2 * C * C + 2 * config.bits_per_token * C * h * w  # head
        for layer in range(config.depth):
            tokens = chunk_tokens[layer // blocks_per_chunk]
            n_sa, n_ca, n_ffn = (
                tokens if plan.router is None else plan.router.tokens_run(name, layer, tokens) for name in BRANCHES
            )
            kv_lengths[layer] += n_sa
            per_row += 4 * C * C * n_sa + 2 * C * n_sa * kv_lengths[layer]
            per_row += 2 * C * C * n_ca + 2 * C * C * T + 2 * C * n_ca * T
            per_row += 2 * C * F * n_ffn
        scales.append(ScaleMacs(k, (h, w), rows, chunk_tokens[0], list(kv_lengths), rows * per_row))
    return MacCount(scales)
