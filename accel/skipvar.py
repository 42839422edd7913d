"""SkipVAR (arXiv 2506.08908) with a fixed decision: skip the last scales, and/or run only the conditional
branch in the last scales ("unconditional branch replacement": the CFG logits become the conditional ones).

SkipVAR itself picks, per sample, how many scales to skip or replace with a small classifier on
high-frequency features; a fixed count is the setting that classifier chooses from.
"""

from __future__ import annotations

from collections.abc import Sequence

from accel.policies import ModelSpec, count_from_end
from accel.sampler import ScalePlan
from models.schedules import Grid


class SkipVARPolicy:
    def __init__(self, spec: ModelSpec, skip_last: int = 1, cond_only_last: int = 0):
        num_scales = len(spec.schedule)
        self.first_skipped = num_scales - count_from_end(spec, "skip_last", skip_last)
        self.first_cond_only = num_scales - count_from_end(spec, "cond_only_last", cond_only_last)

    def plan(self, scale_index: int, grid: Grid, schedule: Sequence[Grid]) -> ScalePlan:
        if scale_index >= self.first_skipped:
            return ScalePlan(skip=True)
        return ScalePlan(branches="cond" if scale_index >= self.first_cond_only else "both")
