"""StageVAR: accelerate only the fidelity-refinement scales (arXiv 2512.16483).

From the first refinement scale on (the stage probe's stages.json, or accel.refinement_start):
(a) the text condition is dropped: one CFG branch runs, the null text by default (`drop_cfg`, `keep_branch`);
(b) random projection: the scale input F~ (M x C) is reduced to r tokens, Q^T F~ (`reduce_tokens`);
(c) the transformer runs on those r tokens with RoPE at their representative positions I, and only their
    K/V enter the cache;
(d) representative token restoration: the outputs land at I, every other position takes the previous
    scale's final hidden state resized to the current grid (`restore_from: previous`, the paper), or, our
    variant, a Gaussian-weighted mean of this scale's outputs at nearby positions of I (`representatives`):
    the head then reads states of the scale it predicts, not of the coarser one before.

The paper leaves the form of Q and the choice of I open, so both are options:
- `sketch`: `selection` (Q selects the columns I, so the r tokens are F~[I]; unscaled, because the transformer
  is not linear and expects tokens at their usual magnitude) or a dense seeded Q with the r mixed tokens
  placed at I: `gaussian` (entries N(0, 1/M), so a mixed token keeps the mean token energy of F~) or
  `orthonormal` (the same, orthonormalised by QR);
- `indices`: `uniform_grid` (an evenly spread, deterministic subset: the first r positions in ordered-dither
  rank, e.g. the stride-2 sub-grid for r = M / 4), `topk_norm` (the r tokens farthest from the mean token,
  FastVAR's score, per row), `leverage` (the r largest leverage scores of the centred F~, estimated from a
  seeded Gaussian range sketch, per row) or `random` (seeded).
r is ceil(rank_ratio * M), or the probe's per-scale rank (`ranks: probe`). A scale where r >= M runs in full.
The defaults measured best on the tiny model; see conf/accel/stagevar.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from accel.policies import (
    RESIZE_MODES,
    KeptBranch,
    ModelSpec,
    check_choice,
    check_seed,
    count_from_end,
    first_refinement_scale,
    gather_tokens,
    resize_tokens,
    scatter_tokens,
)
from accel.sampler import ReducedTokens, ScalePlan
from analysis.stages import load_stages
from errors import UserError
from models.schedules import Grid

Sketch = Literal["selection", "gaussian", "orthonormal"]
IndexRule = Literal["uniform_grid", "topk_norm", "leverage", "random"]


class StageVARPolicy:
    def __init__(
        self,
        spec: ModelSpec,
        refinement_start: int = -3,
        stages_file: str | None = None,
        drop_cfg: bool = True,
        keep_branch: KeptBranch = "uncond",
        reduce_tokens: bool = True,
        ranks: Literal["ratio", "probe"] = "ratio",
        rank_ratio: float = 0.25,
        sketch: Sketch = "selection",
        indices: IndexRule = "uniform_grid",
        restore_mode: str = "bicubic",
        restore_from: Literal["previous", "representatives"] = "representatives",
        seed: int = 0,
        skip_last: int = 0,
    ):
        stages = load_stages(stages_file, spec.name, spec.schedule) if stages_file else None
        self.first_skipped = len(spec.schedule) - count_from_end(spec, "skip_last", skip_last)
        self.refinement_start = first_refinement_scale(spec, refinement_start, stages)
        self.drop_cfg, self.reduce_tokens = drop_cfg, reduce_tokens
        self.keep_branch = check_choice("keep_branch", keep_branch, ("uncond", "cond"))
        self.sketch = check_choice("sketch", sketch, ("selection", "gaussian", "orthonormal"))
        self.indices = check_choice("indices", indices, ("uniform_grid", "topk_norm", "leverage", "random"))
        self.restore_mode = check_choice("restore_mode", restore_mode, RESIZE_MODES)
        self.restore_from = check_choice("restore_from", restore_from, ("previous", "representatives"))
        self.seed = check_seed(seed)
        if isinstance(rank_ratio, bool) or not isinstance(rank_ratio, (int, float)) or not 0 < rank_ratio <= 1:
            raise UserError(f"accel.rank_ratio={rank_ratio!r} must be in (0, 1]: the share r / M of tokens kept")
        check_choice("ranks", ranks, ("ratio", "probe"))
        if ranks == "probe" and stages is None:
            raise UserError("accel.ranks=probe takes the ranks from the stage probe: set accel.stages_file")
        refined = {k: h * w for k, (h, w) in enumerate(spec.schedule) if k >= self.refinement_start}
        if ranks == "probe":
            self.rank_by_scale = {k: max(1, int(stages["ranks"]["per_scale"][k])) for k in refined}
        else:  # the tolerance keeps float noise (0.3 * 100 = 30.000000000000004) from adding a token
            self.rank_by_scale = {k: math.ceil(rank_ratio * size - 1e-9) for k, size in refined.items()}
        self._generator = torch.Generator()

    def plan(self, scale_index: int, grid: Grid, schedule: Sequence[Grid]) -> ScalePlan:
        if scale_index == 0:  # a new generation draws the same Q and I again
            self._generator = torch.Generator().manual_seed(self.seed)
        if scale_index >= self.first_skipped:  # as the released code skips its last 2 scales (skip_last: 2)
            return ScalePlan(skip=True)
        if scale_index < self.refinement_start:
            return ScalePlan()
        rank = self.rank_by_scale[scale_index]
        reduce = self.reduce_tokens and rank < grid[0] * grid[1]
        branches = self.keep_branch if self.drop_cfg else "both"
        if not reduce:
            return ScalePlan(branches=branches)
        subset = RepresentativeTokens(
            rank, self.sketch, self.indices, self.restore_mode, self.restore_from, self._generator
        )
        return ScalePlan(branches=branches, token_subset=subset)


@dataclass
class RepresentativeTokens:
    """Random projection to r tokens (reduce) and representative token restoration (restore) at one scale."""

    rank: int
    sketch: Sketch
    indices: IndexRule
    restore_mode: str
    restore_from: Literal["previous", "representatives"]
    generator: torch.Generator  # CPU, shared by the scales of one generation
    per_chunk = False  # around the whole block stack

    def num_tokens(self, grid: Grid, chunk: int) -> int:
        return self.rank

    def reduce(self, x: Tensor, grid: Grid, chunk: int) -> ReducedTokens:
        positions = self.representative_positions(x, grid)
        if self.sketch == "selection":
            return ReducedTokens(gather_tokens(x, positions), positions, positions)
        projection = dense_sketch(self.sketch, x.shape[1], self.rank, self.generator)
        return ReducedTokens(torch.einsum("mr,bmc->brc", projection.to(x), x), positions, positions)

    def restore(
        self, hidden: Tensor, reduced: ReducedTokens, grid: Grid, previous: Tensor | None, previous_grid: Grid | None
    ) -> Tensor:
        if previous is None or previous_grid is None:
            raise ValueError("representative token restoration needs the previous scale's hidden states")
        restored = resize_tokens(previous, previous_grid, grid, self.restore_mode)
        if self.restore_from == "representatives":
            restored = interpolate_from(hidden, reduced.positions, grid, fallback=restored)
        return scatter_tokens(restored, reduced.positions, hidden)

    def representative_positions(self, inputs: Tensor, grid: Grid) -> Tensor:
        """The index set I: raster positions (r,) shared by all rows, or (R, r) per row."""
        if self.indices == "uniform_grid":
            positions = dither_order(grid, inputs.device)[: self.rank]  # built on the device: no copy
        elif self.indices == "random":
            positions = torch.randperm(grid[0] * grid[1], generator=self.generator)[: self.rank]
        else:
            centred = inputs.float() - inputs.float().mean(1, keepdim=True)
            if self.indices == "topk_norm":
                scores = centred.pow(2).sum(-1)
            else:
                scores = leverage_scores(centred, self.rank, self.generator)
            positions = scores.topk(self.rank, dim=1).indices
        return positions.to(inputs.device).sort(dim=-1).values


def interpolate_from(tokens: Tensor, positions: Tensor, grid: Grid, fallback: Tensor) -> Tensor:
    """A full token map (R, M, C) from tokens (R, r, C) known at raster positions (r,) or (R, r): each position
    takes the Gaussian-weighted mean of the known tokens around it (normalised convolution, sigma = half the
    mean spacing sqrt(M / r) of the known positions); where none is within reach, `fallback` (R, M, C)."""
    rows, rank, channels = tokens.shape
    h, w = grid
    spacing = math.sqrt(h * w / rank)
    radius = math.ceil(1.5 * spacing)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=tokens.device)
    bump = torch.exp(-0.5 * (offsets / (spacing / 2)) ** 2)
    kernel = (bump[:, None] * bump[None, :])[None, None]  # (1, 1, k, k)
    known = scatter_tokens(tokens.new_zeros(rows, h * w, channels + 1), positions,
                           torch.cat((tokens, tokens.new_ones(rows, rank, 1)), dim=-1))
    maps = known.float().transpose(1, 2).reshape(rows * (channels + 1), 1, h, w)
    blurred = F.conv2d(maps, kernel, padding=radius).view(rows, channels + 1, h * w).transpose(1, 2)
    weight = blurred[..., -1:]
    reached = weight > 1e-3  # the kernel peaks at 1: a known token within ~3.7 sigma
    mean = blurred[..., :-1] / weight.clamp_min(1e-12)
    return torch.where(reached, mean.to(tokens.dtype), fallback.to(tokens.dtype))


def dither_order(grid: Grid, device: torch.device | str = "cpu") -> Tensor:
    """Raster positions of a grid sorted by their ordered-dither (Bayer) rank: every prefix is evenly spread."""
    h, w = grid
    rows, columns = torch.arange(h, device=device), torch.arange(w, device=device)
    ys, xs = (axis.flatten() for axis in torch.meshgrid(rows, columns, indexing="ij"))
    rank = torch.zeros_like(ys)
    for bit in range(max(h, w).bit_length()):  # interleave the bits of (y xor x, y), least significant first
        rank = (rank << 2) | ((ys ^ xs) >> bit & 1) << 1 | (ys >> bit & 1)
    return rank.argsort(stable=True)


def leverage_scores(centred: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """Row leverage scores (R, M) of token matrices (R, M, C) in their dominant subspace, from a range sketch."""
    width = min(rank, centred.shape[-1])
    probe = torch.randn(centred.shape[-1], width, generator=generator).to(centred)
    basis = torch.linalg.qr(centred @ probe).Q  # orthonormal basis of the sketched column space
    return basis.pow(2).sum(-1)


def dense_sketch(sketch: Sketch, num_tokens: int, rank: int, generator: torch.Generator) -> Tensor:
    """A seeded dense Q (M, r) whose columns have about unit norm."""
    gaussian = torch.randn(num_tokens, rank, generator=generator) / math.sqrt(num_tokens)
    return torch.linalg.qr(gaussian).Q if sketch == "orthonormal" else gaussian
