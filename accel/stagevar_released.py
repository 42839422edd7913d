"""StageVAR as its authors released it (sen-mao/FasterVAR, the Infinity code; shared/research/fastervar_code.md).

The release differs from the paper. Counted from the end of the schedule (1024 x 1024 Infinity-2B: 40, 48, 64):
- the last `skip_last` (2) scales are skipped outright: no transformer pass, nothing added to the latent, and the
  image is decoded from the codes accumulated through the third scale from the end;
- the last `cfg_drop_last` (3) scales run the null-text row only (the release's cfg 0 there);
- the last `reduce_last` (3) scales that run (with the skip: the third from the end only) run every block chunk on
  r_c tokens: before the chunk, positions I are drawn per row without replacement with probability proportional
  to the squared token norm (`index_sampling`), and the chunk sees the r_c mixtures Q^T X of a Gaussian Q (N, r_c)
  with entries N(0, 1/r_c), drawn fresh for every row and chunk, in fp32 (`sketch: gaussian_mixture`), with the
  RoPE of the first r_c raster positions (`rope_positions: first_r`); after the chunk, its r_c outputs are
  scattered at I over the previous executed scale's output of the same chunk, area-resized (`restore`);
- r_c = int(ratio_c * N) + 1, ratio_c from the offline presets at `alpha` (conf/stagevar_released_presets.yaml) by
  the scale's position from the end, or from the stage probe's per-chunk ranks (`ranks: probe`).
Every deviation is a switch whose default is the released behaviour. Unlike the release, our draws come from a
generator seeded by `seed` (the same seed gives the same images), and any aspect ratio works.

The presets were measured on Infinity-2B's 8 chunks. For other schedules they are mapped by the scale's position
from the end; a model with another number of chunks takes, for each of its chunks, the mean ratio of the preset
chunks over the same share of the depth. Both mappings are ours, said in a warning.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from omegaconf import OmegaConf
from torch import Tensor

from accel.policies import (
    RESIZE_MODES,
    ModelSpec,
    check_choice,
    check_seed,
    count_from_end,
    gather_tokens,
    resize_tokens,
    scatter_tokens,
)
from accel.sampler import ReducedTokens, ScalePlan
from accel.stagevar import dither_order
from analysis.stages import load_stages
from errors import UserError
from models.schedules import Grid

log = logging.getLogger(__name__)

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "stagevar_released_presets.yaml"
RELEASED_SCHEDULE_END = ((40, 40), (48, 48), (64, 64))  # what the presets' positions -3, -2, -1 were measured at
MIN_SCALES = 4  # the release's skip and reduction act on the last 3 scales; at least one scale must run before

Sketch = Literal["gaussian_mixture", "selection"]
IndexSampling = Literal["norm_multinomial", "uniform_grid"]
RopePositions = Literal["first_r", "indices"]


class ReleasedStageVARPolicy:
    def __init__(
        self,
        spec: ModelSpec,
        skip_last: int = 2,
        cfg_drop_last: int = 3,
        reduce_last: int = 3,
        alpha: float = 0.96,
        ranks: Literal["preset", "probe"] = "preset",
        stages_file: str | None = None,
        sketch: Sketch = "gaussian_mixture",
        index_sampling: IndexSampling = "norm_multinomial",
        rope_positions: RopePositions = "first_r",
        restore: str = "area",
        seed: int = 0,
    ):
        num_scales = len(spec.schedule)
        if num_scales < MIN_SCALES:
            raise UserError(
                f"accel=stagevar_released needs a schedule of at least {MIN_SCALES} scales (its skip and reduction act on "
                f"the last 3); {spec.name} has {num_scales}"
            )
        self.first_skipped = num_scales - count_from_end(spec, "skip_last", skip_last)
        self.first_cfg_dropped = num_scales - count_from_end(spec, "cfg_drop_last", cfg_drop_last)
        self.first_reduced = num_scales - count_from_end(spec, "reduce_last", reduce_last)
        self.sketch = check_choice("sketch", sketch, ("gaussian_mixture", "selection"))
        self.index_sampling = check_choice("index_sampling", index_sampling, ("norm_multinomial", "uniform_grid"))
        self.rope_positions = check_choice("rope_positions", rope_positions, ("first_r", "indices"))
        self.restore = check_choice("restore", restore, RESIZE_MODES)
        check_choice("ranks", ranks, ("preset", "probe"))
        self.seed = check_seed(seed)
        reduced, num_chunks = list(range(self.first_reduced, self.first_skipped)), spec.block_chunks
        if ranks == "probe":
            if not stages_file:
                raise UserError("accel.ranks=probe takes the per-chunk ranks from the stage probe: set accel.stages_file")
            stages = load_stages(stages_file, spec.name, spec.schedule)
            ratios = probe_chunk_ratios(stages, stages_file, alpha, reduced, num_chunks)
        else:
            ratios = {k: preset_ratios(alpha, k - num_scales, num_chunks) for k in reduced}
            if spec.schedule[-3:] != list(RELEASED_SCHEDULE_END) or num_chunks != 8:
                _warn_mapped_presets(spec.name, num_chunks, tuple(spec.schedule[-3:]))
        self.ranks = {}
        for k in reduced:
            tokens = spec.schedule[k][0] * spec.schedule[k][1]
            # The release's r = int(ratio * N) + 1, at most N (a measured ratio of 1 would ask for N + 1 tokens).
            self.ranks[k] = [min(int(ratio * tokens) + 1, tokens) for ratio in ratios[k]]
        self._generator: torch.Generator | None = None

    def plan(self, scale_index: int, grid: Grid, schedule: Sequence[Grid]) -> ScalePlan:
        if scale_index == 0:  # a new generation draws the same Q and I again
            self._generator = None
        if scale_index >= self.first_skipped:
            return ScalePlan(skip=True)
        branches = "uncond" if scale_index >= self.first_cfg_dropped else "both"
        if scale_index not in self.ranks:
            return ScalePlan(branches=branches)
        subset = ChunkRepresentatives(
            self.ranks[scale_index], self.sketch, self.index_sampling, self.rope_positions, self.restore, self._draws
        )
        return ScalePlan(branches=branches, token_subset=subset)

    def _draws(self, device: torch.device) -> torch.Generator:
        """The generation's generator, made on the features' device so that drawing never waits for it."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device).manual_seed(self.seed)
        return self._generator


@dataclass
class ChunkRepresentatives:
    """The release's random projection and representative token restoration around every block chunk of a scale."""

    ranks: list[int]  # r per chunk
    sketch: Sketch
    index_sampling: IndexSampling
    rope_positions: RopePositions
    restore_mode: str
    generator_on: Callable[[torch.device], torch.Generator]  # the generation's generator on a device
    per_chunk: bool = field(default=True, init=False)

    def num_tokens(self, grid: Grid, chunk: int) -> int:
        return self.ranks[chunk]

    def reduce(self, x: Tensor, grid: Grid, chunk: int) -> ReducedTokens:
        rank, rows = self.ranks[chunk], x.shape[0]
        generator = self.generator_on(x.device)
        if self.index_sampling == "norm_multinomial":
            weights = x.float().pow(2).sum(-1)  # squared token norms: length-squared sampling
            positions = torch.multinomial(weights, rank, replacement=False, generator=generator)  # (R, r), unsorted
        else:
            positions = dither_order(grid, x.device)[:rank].expand(rows, -1)
        if self.sketch == "selection":
            tokens = gather_tokens(x, positions)
        else:
            # Times 1/sqrt(r), as the release scales it: the quotient by sqrt(r) rounds differently.
            projection = torch.randn(rows, x.shape[1], rank, generator=generator, device=x.device) * (1 / rank**0.5)
            with torch.autocast(x.device.type, enabled=False):
                tokens = (projection.transpose(1, 2) @ x.float()).to(x.dtype)  # Q^T X: r mixtures of all N tokens
        first = torch.arange(rank, device=x.device)
        return ReducedTokens(tokens, positions, first if self.rope_positions == "first_r" else positions)

    def restore(
        self, hidden: Tensor, reduced: ReducedTokens, grid: Grid, previous: Tensor | None, previous_grid: Grid | None
    ) -> Tensor:
        if previous is None or previous_grid is None:
            raise ValueError("the released restoration needs the previous scale's output of the same chunk")
        return scatter_tokens(resize_tokens(previous, previous_grid, grid, self.restore_mode), reduced.positions, hidden)


@functools.cache  # once per model and process: every policy built for it would say the same
def _warn_mapped_presets(model: str, num_chunks: int, last_scales: tuple[Grid, ...]) -> None:
    log.warning(
        "stagevar_released: the rank presets were measured on Infinity-2B at 1024 x 1024 (8 chunks; scales 40, 48, 64 "
        "at the end); %s (%d chunks, ends %s) takes them by position from the end%s", model, num_chunks,
        list(last_scales), "" if num_chunks == 8 else " and by share of the depth",
    )


@functools.cache
def _presets() -> dict:
    return OmegaConf.to_container(OmegaConf.load(PRESETS))


def preset_ratios(alpha: float, position: int, num_chunks: int) -> list[float]:
    """The released ratios at `alpha` for the scale `position` from the end (-3, -2, -1), for `num_chunks` chunks."""
    presets = _presets()
    key = format(alpha, "g") if format(alpha, "g") in presets else f"{alpha:.2f}"
    if key not in presets:
        raise UserError(f"accel.alpha={alpha} has no rank preset; the release has {', '.join(presets)}")
    if str(position) not in presets[key]:
        raise UserError(f"accel.reduce_last reaches the scale at {position} from the end; the release's presets hold "
                        f"the last {len(presets[key])} scales only: reduce_last <= {len(presets[key])}, or ranks=probe")
    return chunk_shares(presets[key][str(position)], num_chunks)


def chunk_shares(ratios: Sequence[float], num_chunks: int) -> list[float]:
    """Per-chunk ratios of one chunking mapped to `num_chunks` chunks: each takes the mean over its share of depth."""
    if num_chunks == len(ratios):
        return list(ratios)
    per = len(ratios) / num_chunks
    shares = [ratios[int(c * per) : max(int(c * per) + 1, int((c + 1) * per))] for c in range(num_chunks)]
    return [sum(share) / len(share) for share in shares]


def probe_chunk_ratios(
    stages: dict, stages_file: str, alpha: float, scales: Sequence[int], num_chunks: int
) -> dict[int, list[float]]:
    """The stage probe's per-chunk rank ratios at energy `alpha` for `scales` (stages.json's `chunk_ranks`)."""
    chunk_ranks = stages.get("ranks", {}).get("chunk_ranks")
    remedy = "run experiment=stage_probe again (this code version measures them; probe.chunk_rank_energies lists the alphas)"
    if not chunk_ranks:
        raise UserError(f"stages file {stages_file} has no per-chunk ranks; {remedy}")
    by_alpha = chunk_ranks["ratio"].get(format(alpha, "g"))
    if by_alpha is None:
        raise UserError(f"stages file {stages_file} has per-chunk ranks at {list(chunk_ranks['ratio'])}, not at "
                        f"accel.alpha={alpha}; {remedy}")
    ratios = {k: by_alpha[str(k)] for k in scales}
    if any(len(chunk_ratios) != num_chunks for chunk_ratios in ratios.values()):
        raise UserError(f"stages file {stages_file} has ranks for another number of block chunks than {num_chunks}")
    return ratios
