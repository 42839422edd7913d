"""FastVAR (arXiv 2503.23367) as a policy: pivotal-token pruning with cached token restoration.

At a pruned scale, before each residual branch (self-attention, cross-attention, FFN) of the pruned blocks, every
row keeps its (1 - prune_ratio) tokens farthest from the row's mean token (the high-frequency "pivotal" ones),
runs the branch on them with RoPE gathered at their positions, and writes their outputs over the branch output
recorded at the cache scale, resized (area) to the current grid. Only the kept tokens' K/V enter the cache.
The last `skip_last` scales are skipped outright. CFG is untouched.

Published on Infinity-2B at 1024^2 (13 scales): cache at 24x24, prune 0.4 at 32x32 and 0.5 at 40x40 in blocks
3..27 of 32, skip 48x48 and 64x64. Scales are counted from the end (-5, -4, -3, last 2) and blocks as a share
of the depth, so the defaults reproduce that setting and carry over to other schedules and depths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from accel.policies import ModelSpec, count_from_end, gather_tokens, resize_tokens, resolve_scale, scatter_tokens
from accel.sampler import ScalePlan
from errors import UserError
from models.infinity import BranchFn, Rope
from models.schedules import Grid


class FastVARPolicy:
    def __init__(
        self,
        spec: ModelSpec,
        cache_scale: int = -5,
        prune_scales: Sequence[int] = (-4, -3),
        prune_ratios: Sequence[float] = (0.4, 0.5),
        skip_last: int = 2,
        pruned_layers: Sequence[float] = (0.09375, 0.875),
    ):
        num_scales = len(spec.schedule)
        self.first_skipped = num_scales - count_from_end(spec, "skip_last", skip_last)
        self.cache_scale = resolve_scale(spec, "cache_scale", cache_scale)
        if len(prune_scales) != len(prune_ratios):
            raise UserError(
                f"accel.prune_scales {list(prune_scales)} and accel.prune_ratios {list(prune_ratios)} must pair up"
            )
        self.prune_ratios = {resolve_scale(spec, "prune_scales", k): r for k, r in zip(prune_scales, prune_ratios)}
        if len(self.prune_ratios) != len(prune_scales):
            raise UserError(f"accel.prune_scales={list(prune_scales)} names a scale twice")
        for ratio in prune_ratios:
            if not 0 <= ratio < 1:
                raise UserError(f"accel.prune_ratios has {ratio}: each must be in [0, 1) (to skip a scale: skip_last)")
        pruned = sorted(self.prune_ratios)
        if pruned and not self.cache_scale < pruned[0] <= pruned[-1] < self.first_skipped:
            raise UserError(
                f"accel.prune_scales={list(prune_scales)} must come after accel.cache_scale={cache_scale} and before "
                f"the last accel.skip_last={skip_last} scales of the {num_scales}-scale schedule"
            )
        if len(pruned_layers) != 2 or not 0 <= pruned_layers[0] <= pruned_layers[1] <= 1:
            raise UserError(
                f"accel.pruned_layers={list(pruned_layers)} must be [first, last] shares of the depth, in [0, 1]"
            )
        self.pruned_layers = range(round(pruned_layers[0] * spec.depth), round(pruned_layers[1] * spec.depth))
        self._cache = BranchOutputCache((1, 1))

    def plan(self, scale_index: int, grid: Grid, schedule: Sequence[Grid]) -> ScalePlan:
        if scale_index >= self.first_skipped:
            return ScalePlan(skip=True)
        if scale_index == self.cache_scale and self.prune_ratios:
            self._cache = BranchOutputCache(grid)  # a new generation records afresh
            return ScalePlan(router=RecordingRouter(self._cache))
        if scale_index in self.prune_ratios:
            ratio = self.prune_ratios[scale_index]
            return ScalePlan(router=PivotalTokenRouter(self._cache, grid, ratio, self.pruned_layers))
        return ScalePlan()


@dataclass
class BranchOutputCache:
    """Every branch's output (R, n, C) at the cache scale, keyed by (branch name, block)."""

    grid: Grid
    outputs: dict[tuple[str, int], Tensor] = field(default_factory=dict)


@dataclass
class RecordingRouter:
    """Runs every branch on all tokens and records its output."""

    cache: BranchOutputCache

    def __call__(self, name: str, layer: int, x: Tensor, rope: Rope, branch: BranchFn) -> Tensor:
        output = branch(x, rope)
        self.cache.outputs[name, layer] = output
        return output

    def tokens_run(self, name: str, layer: int, num_tokens: int) -> int:
        return num_tokens


@dataclass
class PivotalTokenRouter:
    """Runs the pruned blocks' branches on the pivotal tokens and restores the rest from the cache."""

    cache: BranchOutputCache
    grid: Grid
    prune_ratio: float
    pruned_layers: range

    def tokens_run(self, name: str, layer: int, num_tokens: int) -> int:
        if layer not in self.pruned_layers:
            return num_tokens
        return num_tokens - int(num_tokens * self.prune_ratio)

    def __call__(self, name: str, layer: int, x: Tensor, rope: Rope, branch: BranchFn) -> Tensor:
        keep = self.tokens_run(name, layer, x.shape[1])
        if keep == x.shape[1]:
            return branch(x, rope)
        centred = x.float() - x.float().mean(1, keepdim=True)
        positions = centred.pow(2).sum(-1).topk(keep, dim=1).indices  # (R, keep)
        output = branch(gather_tokens(x, positions), rope.at(positions))
        cached = resize_tokens(self.cache.outputs[name, layer], self.cache.grid, self.grid, mode="area")
        return scatter_tokens(cached, positions, output)
