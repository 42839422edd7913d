"""Stage boundaries found from the probe's per-scale curves, and stages.json, which the accelerated sampler reads.

The rule (its tolerances are the `stages:` keys of conf/experiment/stage_probe.yaml):

1. A curve c_0 .. c_{K-1} (one metric, the mean over prompts at each scale) has *settled* at scale k when it
   stays near its final value from k on:  |c_j - c_{K-1}| <= tolerance * (max c - min c)  for every j >= k.
   The band is a share of the curve's own span, so one tolerance fits similarities, distances and pass rates.
2. semantic_end is the first scale at which every semantic metric has settled; structure_end the same for
   every structural metric. Scales are 0-based.
3. refinement_start = max(semantic_end, structure_end) + 1: fidelity refinement begins once both meaning
   and structure are fixed. It equals K (no refinement stage) when a curve only settles at the last scale.

Semantics are expected to settle no later than structure; the rule does not assume it, and
`semantics_settle_first` says whether a run showed it. Fidelity curves (pixel-level metrics such as SSIM) are
kept in stages.json beside the others but decide nothing: fidelity is what the refinement stage still changes.

The same rule reads two kinds of evidence. *Visible*: each partial image against the final one (the paper's
probe). *Decided*: continuations forked after each scale against the original run (analysis/continuations.py),
that is, from which scale on the rest of the run no longer changes the outcome. stages.json keeps both sets;
its `evidence` says which one its top-level boundaries (those the accelerated sampler reads) are: visible,
decided, or both, each boundary then the later of the two.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from errors import UserError

STAGES_KEYS = (
    "model", "schedule", "semantic_end", "structure_end", "refinement_start", "ranks", "rule", "curves",
    "num_prompts", "code_version",
)
EVIDENCE = ("visible", "decided", "both")  # which boundaries stages.json hands the sampler


@dataclass(frozen=True)
class StageRule:
    semantic_tolerance: float = 0.1  # share of a semantic curve's span it may still move after settling
    structure_tolerance: float = 0.1

    def __post_init__(self) -> None:
        for key in ("semantic_tolerance", "structure_tolerance"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise UserError(f"stages.rule.{key}={value!r} must be in [0, 1): a share of each curve's span")


@dataclass(frozen=True)
class StageBoundaries:
    semantic_end: int
    structure_end: int
    refinement_start: int

    @property
    def semantics_settle_first(self) -> bool:
        return self.semantic_end <= self.structure_end

    def empty_stages(self, num_scales: int) -> list[str]:
        """The stages that hold no scale: structure when it settles with semantics, refinement when a curve
        settles only at the last scale."""
        empty = ["structure"] if self.refinement_start <= self.semantic_end + 1 else []
        return empty + (["refinement"] if self.refinement_start >= num_scales else [])

    def stage(self, scale: int) -> str:
        """The stage a scale belongs to: semantic, structure or refinement."""
        if scale <= self.semantic_end:
            return "semantic"
        return "structure" if scale < self.refinement_start else "refinement"

    def later(self, other: StageBoundaries) -> StageBoundaries:
        """Each boundary at the later of the two sets': a stage is over once both kinds of evidence say so."""
        return StageBoundaries(max(self.semantic_end, other.semantic_end), max(self.structure_end, other.structure_end),
                               max(self.refinement_start, other.refinement_start))


@dataclass(frozen=True)
class DecidedEvidence:
    """The continuation probe's result: the boundaries the rule finds on its curves, and the curves."""

    boundaries: StageBoundaries
    continuations: int  # per prompt and scale
    curves: dict[str, list[float]]  # per metric and scale: continuation vs original, mean over prompts
    stderr: dict[str, list[float]]  # the curves' standard errors over prompts
    spread: dict[str, list[float]]  # the metric between two continuations (none with one continuation)
    spread_stderr: dict[str, list[float]]


def fed_boundaries(evidence: str, visible: StageBoundaries, decided: StageBoundaries | None) -> StageBoundaries:
    """The boundaries the sampler gets: the visible or the decided set, or for `both` the later of the two."""
    if evidence not in EVIDENCE:
        raise ValueError(f"evidence {evidence!r} is not one of {EVIDENCE}")
    if evidence == "visible":
        return visible
    if decided is None:
        raise ValueError(f"evidence {evidence!r} needs the decided boundaries of the continuation probe")
    return decided if evidence == "decided" else visible.later(decided)


def settling_scale(curve: Sequence[float], tolerance: float) -> int:
    """The first scale from which the curve stays within tolerance * span of its final value."""
    values = np.asarray(curve, dtype=float)
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all():
        raise ValueError(f"a curve needs one finite value per scale; got {curve}")
    band = tolerance * (values.max() - values.min())
    outside = np.flatnonzero(np.abs(values - values[-1]) > band)
    return int(outside[-1]) + 1 if len(outside) else 0


def detect_stages(
    semantic_curves: dict[str, Sequence[float]], structural_curves: dict[str, Sequence[float]], rule: StageRule
) -> StageBoundaries:
    """Apply the rule to per-scale curves (each metric's mean over prompts, one value per scale)."""
    if not semantic_curves or not structural_curves:
        raise ValueError("stage detection needs at least one semantic and one structural curve")
    semantic_end = max(settling_scale(curve, rule.semantic_tolerance) for curve in semantic_curves.values())
    structure_end = max(settling_scale(curve, rule.structure_tolerance) for curve in structural_curves.values())
    return StageBoundaries(semantic_end, structure_end, max(semantic_end, structure_end) + 1)


def curves_by_kind(
    curves: dict[str, Sequence[float]], kinds: dict[str, str]
) -> dict[str, dict[str, Sequence[float]]]:
    """Per-metric curves grouped by the stage their metric tells about (semantic, structural, fidelity)."""
    return {kind: {name: curve for name, curve in curves.items() if kinds[name] == kind}
            for kind in ("semantic", "structural", "fidelity")}


def write_stages(
    path: Path,
    *,
    model: str,
    schedule: Sequence[Sequence[int]],
    boundaries: StageBoundaries,
    ranks: dict,
    rule: StageRule,
    semantic_curves: dict[str, Sequence[float]],
    structural_curves: dict[str, Sequence[float]],
    num_prompts: int,
    code_version: str,
    fidelity_curves: dict[str, Sequence[float]] | None = None,
    source: str = "model",
    decided: DecidedEvidence | None = None,
    evidence: str = "visible",
) -> dict:
    """Write stages.json (the schema `load_stages` reads) and return what was written. `source` says whose
    partial images the curves come from: the model's samples or the ground truth's bits. `boundaries` and the
    curves are the visible evidence; `decided`, the continuation probe's; `evidence` picks the top-level
    boundaries (`fed_boundaries`)."""
    fidelity_curves = fidelity_curves or {}
    fed = fed_boundaries(evidence, boundaries, decided.boundaries if decided else None)
    stages = {
        "model": model,
        "source": source,
        "schedule": [list(grid) for grid in schedule],
        "evidence": evidence,
        "semantic_end": fed.semantic_end,
        "structure_end": fed.structure_end,
        "refinement_start": fed.refinement_start,
        "visible": asdict(boundaries),
        "decided": None if decided is None else {
            **asdict(decided.boundaries),
            "continuations": decided.continuations,
            **{key: {name: [_number(v) for v in curve] for name, curve in getattr(decided, key).items()}
               for key in ("curves", "stderr", "spread", "spread_stderr")},
        },
        "ranks": ranks,
        "rule": {
            **asdict(rule), "semantic_metrics": list(semantic_curves), "structural_metrics": list(structural_curves),
            "fidelity_metrics": list(fidelity_curves),
        },
        "curves": {
            name: [float(v) for v in curve]
            for name, curve in {**semantic_curves, **structural_curves, **fidelity_curves}.items()
        },
        "num_prompts": num_prompts,
        "code_version": code_version,
    }
    Path(path).write_text(json.dumps(stages, indent=1) + "\n")
    return stages


def _number(value: float) -> float | None:
    """A curve value for JSON: NaN (a standard error of one prompt) becomes None."""
    return None if np.isnan(value) else float(value)


def load_stages(path: str | Path, model_name: str, schedule: Sequence[Sequence[int]]) -> dict:
    """Read a stages.json and check it was made for this model and schedule."""
    path = Path(path)
    probe_it = f"make one with `python run.py experiment=stage_probe model={model_name}`"
    if not path.is_file():
        raise UserError(f"stages file {path} does not exist; {probe_it}")
    try:
        stages = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"stages file {path} is not valid JSON ({error}); {probe_it}") from None
    missing = [key for key in STAGES_KEYS if key not in stages]
    if missing:
        raise UserError(f"stages file {path} lacks {', '.join(missing)}; {probe_it}")
    wanted_schedule = [list(grid) for grid in schedule]
    if stages["model"] != model_name or stages["schedule"] != wanted_schedule:
        raise UserError(
            f"stages file {path} was made for model {stages['model']!r} with schedule {stages['schedule']}, "
            f"but this run uses {model_name!r} with {wanted_schedule}; {probe_it}"
        )
    num_scales = len(wanted_schedule)
    if not 0 <= stages["refinement_start"] <= num_scales or len(stages["ranks"]["per_scale"]) != num_scales:
        raise UserError(f"stages file {path} does not fit its {num_scales}-scale schedule; {probe_it}")
    return stages
