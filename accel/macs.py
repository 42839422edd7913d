"""Analytic multiply-accumulates (MACs) of one generation under a policy, without running the model.

Counted: the transformer blocks and the head, the parts a policy changes. Not counted: the text encoder and the
text conditioning (once per generation), the scale-input embedding, token reduction and restoration, code
sampling and the VAE. FLOPs = 2 x MACs.

At scale k the policy's plan gives the rows R (2B under CFG until a branch is dropped, else B) and, per block,
the tokens each residual branch runs on (M = h * w, r under a token subset, fewer under a router). What a
branch and a scale's head cost per row is the family's own (`branch_macs`, `scale_macs` of its transformer
config: models/infinity.py, models/var.py); the KV length a self-attention branch reads grows by the tokens
it ran on. A skipped scale costs nothing and adds nothing to the KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from accel.sampler import BaselinePolicy, Policy
from models.family import TransformerCosts
from models.schedules import Grid


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
    config: TransformerCosts,
    schedule: Sequence[Grid],
    policy: Policy | None = None,
    *,
    batch_size: int,
    text_length: int,
    guidance: bool = True,
) -> MacCount:
    """MACs per scale of generating `batch_size` images with `policy` (the baseline when None).

    `guidance`: whether CFG runs (any cfg != 1), i.e. two rows per prompt until the policy drops a branch.
    `text_length`: the padded text tokens cross-attention reads (0 for a family without it).
    """
    policy = policy or BaselinePolicy()
    kv_lengths = [0] * config.depth
    both_branches = guidance
    blocks_per_chunk = config.depth // config.block_chunks
    scales = []
    for k, (h, w) in enumerate(schedule):
        plan = policy.plan(k, (h, w), schedule)
        if plan.skip:
            scales.append(ScaleMacs(k, (h, w), 0, 0, list(kv_lengths), 0))
            continue
        both_branches = both_branches and plan.branches == "both"
        rows = batch_size * (2 if both_branches else 1)
        chunk_tokens = [
            h * w if plan.token_subset is None else plan.token_subset.num_tokens((h, w), chunk)
            for chunk in range(config.block_chunks)
        ]
        per_row = config.scale_macs(h * w)
        for layer in range(config.depth):
            tokens = chunk_tokens[layer // blocks_per_chunk]
            for name in config.branches:
                branch_tokens = tokens if plan.router is None else plan.router.tokens_run(name, layer, tokens)
                if name == "sa":
                    kv_lengths[layer] += branch_tokens
                per_row += config.branch_macs(name, branch_tokens, kv_lengths[layer], text_length)
        scales.append(ScaleMacs(k, (h, w), rows, chunk_tokens[0], list(kv_lengths), rows * per_row))
    return MacCount(scales)
