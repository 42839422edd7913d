"""The continuation probe: after which scale the rest of a run no longer changes its outcome ("decided" stages).

The sampler forks each prompt batch's run after every scale k and finishes it again with `probe.continuations`
other seeds (accel.sampler.Continuations: the KV cache and the latent are kept, not recomputed). A scale's decided
columns compare each continuation's final image with the original run's:
- an image metric (SSIM, ST-LPIPS, CLIP image, ...) between the two images;
- a prompt metric (ShapesEval, CLIP text score) as the agreement 1 - |score - original's score|: for a pass/fail
  scorer, 1 when the verdict is the original's and 0 when it flipped. NaN where the metric does not apply.
The spread compares the continuations with each other the same way (mean over pairs; none with one continuation).
The stage rule (analysis/stages.py) reads the curves of these columns as it reads the visible ones.

Cost: continuations x scales extra tail samples per prompt (the tail after scale k runs scales k+1 .. K-1), and as
many decodes and metric evaluations.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from analysis.metrics import Metric
from analysis.rows import decided_key, scale_means, scale_stderrs, spread_key
from analysis.stages import DecidedEvidence, StageRule, curves_by_kind, detect_stages

def continuation_seeds(batch_seed: int, count: int) -> list[int]:
    """The seeds of a batch's continuations: fixed by the batch's seed, so the same under any number of processes,
    and hashed apart from the batch seeds (seed + b). 32 bits: the CPU generator keeps only a seed's low 32 bits."""
    return [int(np.random.SeedSequence([batch_seed, c]).generate_state(1)[0]) for c in range(1, count + 1)]


@dataclass
class _Reading:
    """A batch of final images and their prompt metrics' scores."""

    images: Tensor  # (B, H, W, 3) uint8
    scores: dict[str, Tensor]  # prompt metric name -> (B,)


def decided_columns(
    original: Tensor, continuations: dict[int, list[Tensor]], prompts: Sequence[dict], metrics: dict[str, Metric]
) -> dict[int, dict[str, Tensor]]:
    """Per scale forked after: each metric's decided and spread columns, (B,) each, from the original's final images
    (B, H, W, 3) and each continuation's."""

    def read(images: Tensor) -> _Reading:
        return _Reading(images, {name: metric(images, prompts) for name, metric in metrics.items()
                                 if metric.compares_with == "prompt"})

    def agreement(name: str, a: _Reading, b: _Reading) -> Tensor:
        if metrics[name].compares_with == "image":
            return metrics[name](a.images, b.images)
        return 1 - (a.scores[name] - b.scores[name]).abs()

    reference = read(original)
    columns = {}
    for scale, images in continuations.items():
        readings = [read(batch) for batch in images]
        pairs = list(itertools.combinations(readings, 2))
        columns[scale] = {}
        for name in metrics:
            columns[scale][decided_key(name)] = torch.stack([agreement(name, r, reference) for r in readings]).mean(0)
            if pairs:
                columns[scale][spread_key(name)] = torch.stack([agreement(name, a, b) for a, b in pairs]).mean(0)
    return columns


def decided_evidence(
    rows: Sequence[dict], metrics: dict[str, Metric], rule: StageRule, num_scales: int, continuations: int
) -> DecidedEvidence:
    """The decided curves (mean over prompts, with standard errors) of the merged rows, and the rule's boundaries."""
    curves = {name: scale_means(rows, decided_key(name), num_scales) for name in metrics}
    by_kind = curves_by_kind(curves, {name: metric.kind for name, metric in metrics.items()})
    spread_names = list(metrics) if continuations > 1 else []
    return DecidedEvidence(
        boundaries=detect_stages(by_kind["semantic"], by_kind["structural"], rule),
        continuations=continuations,
        curves=curves,
        stderr={name: scale_stderrs(rows, decided_key(name), num_scales) for name in metrics},
        spread={name: scale_means(rows, spread_key(name), num_scales) for name in spread_names},
        spread_stderr={name: scale_stderrs(rows, spread_key(name), num_scales) for name in spread_names},
    )
