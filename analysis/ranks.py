"""Low rank of token features: singular values of an (M x d) feature matrix and the rank that keeps an energy.

The rank at energy e is the smallest r whose leading singular values hold that share of the squared norm:
    r(e) = min { r : sum_{i<=r} s_i^2 >= e * sum_i s_i^2 }     (s sorted from largest)
Measured offline on many prompts and aggregated per scale, it is the fixed rank r_k the accelerated sampler
uses, with no SVD at generation time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

RankAggregate = Literal["mean", "p90"]


def singular_values(features: Tensor) -> Tensor:
    """(B, M, d) features -> (B, min(M, d)) singular values, largest first (in float32: bf16 has no SVD)."""
    return torch.linalg.svdvals(features.float())


def cumulative_energy(values: Tensor) -> Tensor:
    """(B, n) singular values -> (B, n) share of the squared norm held by the first 1..n of them."""
    energy = values.float().square()
    return energy.cumsum(-1) / energy.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def energy_ranks(values: Tensor, energies: Sequence[float]) -> Tensor:
    """(B, n) singular values -> (B, len(energies)) ranks r(e), each in 1..n; 0 for a matrix of zeros (a centred
    matrix whose tokens are all equal, e.g. a scale input upsampled from one token), which no rank describes."""
    cumulative = cumulative_energy(values)
    below = cumulative[:, None, :] < torch.tensor(energies, dtype=cumulative.dtype)[None, :, None]
    ranks = (below.sum(-1) + 1).clamp_max(values.shape[-1])  # rounding can leave the total a hair below 1
    return ranks.masked_fill(values.float().square().sum(-1, keepdim=True) == 0, 0)


def aggregate_rank(ranks: Sequence[int], how: RankAggregate) -> int:
    """One rank for a scale from the ranks of many prompts: the rounded-up mean, or the 90th percentile."""
    if how == "mean":
        return math.ceil(float(np.mean(ranks)) - 1e-9)
    if how == "p90":
        return int(np.percentile(ranks, 90, method="higher"))
    raise ValueError(f"rank aggregate {how!r} is unknown: use mean or p90")
