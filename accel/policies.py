"""Acceleration policies: what the one sampler runs at each scale, built from `conf/accel/*.yaml`.

`build_policy(cfg.accel, model)` instantiates the config's `_target_` with the model's `ModelSpec`, so every
value is checked against the model and its schedule before any compute. This file holds the baseline (`none`),
dropping the text condition in the refinement stage (`cfg_drop`, StageVAR's part (a)) and the helpers the
other policies share; StageVAR, FastVAR and SkipVAR have a file each.

Scale indices in configs are 0-based; negative ones count from the end (-3 = the last three scales), so one
setting fits every schedule of a model family.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import hydra.utils
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from accel.sampler import BaselinePolicy, Policy, ScalePlan
from analysis.stages import load_stages
from errors import UserError
from models.pipeline import TextToImageModel, schedule_and_transformer
from models.schedules import Grid

log = logging.getLogger(__name__)

KeptBranch = Literal["uncond", "cond"]
RUN_KEYS = ("name", "allow_noop")  # conf/accel keys read by the experiments, not by the policy
RESIZE_MODES = ("area", "bilinear", "bicubic", "nearest", "nearest-exact")


@dataclass(frozen=True)
class ModelSpec:
    """What a policy may know about the model it plans for."""

    name: str
    schedule: list[Grid]
    depth: int  # transformer blocks
    block_chunks: int = 1  # the checkpoint's block chunks (the released StageVAR reduces tokens per chunk)

    @classmethod
    def of(cls, model: TextToImageModel) -> ModelSpec:
        config = model.transformer.config
        return cls(model.name, list(model.schedule), config.depth, config.block_chunks)

    @classmethod
    def of_config(cls, model_cfg: DictConfig) -> ModelSpec:
        """The spec of a `conf/model/*.yaml` node, without building the model (to check a policy before compute)."""
        schedule, config = schedule_and_transformer(model_cfg)
        return cls(model_cfg.name, schedule, config.depth, config.block_chunks)


def build_policy(accel_cfg: DictConfig, model: TextToImageModel | ModelSpec) -> Policy:
    """Instantiate `cfg.accel` for a model (or a spec, to count MACs of a model that is not loaded)."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec.of(model)
    options = OmegaConf.masked_copy(accel_cfg, [key for key in accel_cfg if key not in RUN_KEYS])
    make_policy = hydra.utils.instantiate(options, _partial_=True, _convert_="all")
    return make_policy(spec=spec)  # not an instantiate argument: Hydra would turn the dataclass into a config


def baseline(spec: ModelSpec) -> BaselinePolicy:
    """accel=none: every scale in full with both CFG branches; there is nothing to check against the model."""
    return BaselinePolicy()


class CFGDropPolicy:
    """accel=cfg_drop: from the first refinement scale on, run one CFG branch only (StageVAR's part (a)).

    The sampler slices the text rows, the KV caches and the previous hidden states to the kept branch.
    """

    def __init__(
        self,
        spec: ModelSpec,
        refinement_start: int = -3,
        stages_file: str | None = None,
        keep_branch: KeptBranch = "uncond",
    ):
        stages = load_stages(stages_file, spec.name, spec.schedule) if stages_file else None
        self.refinement_start = first_refinement_scale(spec, refinement_start, stages)
        self.keep_branch = check_choice("keep_branch", keep_branch, ("uncond", "cond"))

    def plan(self, scale_index: int, grid: Grid, schedule: Sequence[Grid]) -> ScalePlan:
        return ScalePlan(branches=self.keep_branch if scale_index >= self.refinement_start else "both")


# ----------------------------------------------------------------------------------------------------------
# Shared helpers: config checks


def check_choice(key: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UserError(f"accel.{key}={value!r} is not one of {list(choices)}")
    return value


def check_seed(seed: int) -> int:
    """A policy's own seed (its random projections and index draws)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"accel.seed={seed!r} must be a whole number >= 0 (it seeds the policy's own draws)")
    return seed


def resolve_scale(spec: ModelSpec, key: str, value: int, allow_end: bool = False) -> int:
    """A config's scale index as 0-based; negative counts from the end. `allow_end` admits K (= no scale)."""
    num_scales = len(spec.schedule)
    last = num_scales if allow_end else num_scales - 1
    if not isinstance(value, int) or not -num_scales <= value <= last:
        raise UserError(
            f"accel.{key}={value!r} is outside the {num_scales}-scale schedule of {spec.name}: "
            f"use an index in [{-num_scales}, {last}] (negative counts from the end)"
        )
    return value % num_scales if value < 0 else value


def first_refinement_scale(spec: ModelSpec, refinement_start: int, stages: dict | None) -> int:
    """The stage probe's refinement_start when a stages file is given, else accel.refinement_start."""
    if stages is not None:
        if stages["refinement_start"] >= len(spec.schedule):
            log.warning(
                "NO REFINEMENT STAGE: the stages file of %s found none (refinement_start=%d of %d scales), so this "
                "policy changes nothing", spec.name, stages["refinement_start"], len(spec.schedule)
            )
        return stages["refinement_start"]
    return resolve_scale(spec, "refinement_start", refinement_start, allow_end=True)


def count_from_end(spec: ModelSpec, key: str, value: int) -> int:
    """A count of last scales (skip_last, cond_only_last): 0 .. K - 1, so that the first scale always runs."""
    if not isinstance(value, int) or not 0 <= value < len(spec.schedule):
        raise UserError(f"accel.{key}={value!r} must be an integer in [0, {len(spec.schedule) - 1}] for {spec.name}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Shared helpers: token maps


def gather_tokens(tokens: Tensor, positions: Tensor) -> Tensor:
    """Tokens (R, M, C) at raster positions (r,) or (R, r) -> (R, r, C)."""
    index = positions.expand(tokens.shape[0], -1) if positions.dim() == 1 else positions
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(base: Tensor, positions: Tensor, tokens: Tensor) -> Tensor:
    """`base` (R, M, C) with the tokens (R, r, C) written at raster positions (r,) or (R, r)."""
    index = positions.expand(base.shape[0], -1) if positions.dim() == 1 else positions
    return base.to(tokens.dtype).scatter(1, index.unsqueeze(-1).expand(-1, -1, base.shape[-1]), tokens)


def resize_tokens(tokens: Tensor, grid: Grid, new_grid: Grid, mode: str) -> Tensor:
    """A token map (R, h*w, C) on `grid` resized to `new_grid` -> (R, h'*w', C)."""
    rows, _, channels = tokens.shape
    image = tokens.transpose(1, 2).reshape(rows, channels, *grid)
    resized = F.interpolate(image.float(), size=new_grid, mode=mode).to(tokens.dtype)
    return resized.flatten(2).transpose(1, 2)

