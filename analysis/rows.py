"""The stage probe's rows (results.jsonl), one per prompt and scale: their keys, and per-scale curves from them.

A row holds index, prompt, scale, grid, tokens; one value per metric name (None where a prompt metric does
not apply); band_change/<band>; rank/<source>@<energy> and rank_fraction/<source>@<energy>, where the source
is "inputs" (the scale input F~) or "block<i>"; with the continuation probe, decided/<metric> (the continuations
forked after the scale vs the original, mean over continuations) and decided_spread/<metric> (between two
continuations, mean over pairs). No torch here, so the notebook loads quickly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

INPUTS = "inputs"  # the rank source of the scale input F~
UPDATE_RATIO = "update_ratio"  # |latent_k - latent_k-1| / |latent_k| of each image: how much the scale changed it


def rank_key(source: str, energy: float, fraction: bool = False) -> str:
    return f"{'rank_fraction' if fraction else 'rank'}/{source}@{energy:g}"


def chunk_rank_key(energy: float) -> str:
    """The row key of the per-chunk rank ratios (a list, one per block chunk) at one energy."""
    return f"chunk_rank_ratio@{energy:g}"


def band_key(label: str) -> str:
    return f"band_change/{label}"


def decided_key(metric: str) -> str:
    return f"decided/{metric}"


def spread_key(metric: str) -> str:
    return f"decided_spread/{metric}"


def scale_means(rows: Sequence[dict], key: str, num_scales: int) -> list[float]:
    """Mean of `key` over prompts at each scale, skipping rows where it is None (NaN where all are)."""
    return [float(np.mean(v)) if v else float("nan") for v in _values_per_scale(rows, key, num_scales)]


def scale_stderrs(rows: Sequence[dict], key: str, num_scales: int) -> list[float]:
    """Standard error over prompts of `scale_means` at each scale (NaN where fewer than two prompts have a value)."""
    return [float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
            for v in _values_per_scale(rows, key, num_scales)]


def _values_per_scale(rows: Sequence[dict], key: str, num_scales: int) -> list[list[float]]:
    """The values of `key` at each scale, one per prompt that has one (not None)."""
    values = [[] for _ in range(num_scales)]
    for row in rows:
        if row.get(key) is not None:
            values[row["scale"]].append(row[key])
    return values


def scale_percentiles(rows: Sequence[dict], key: str, num_scales: int, percentile: float) -> list[float]:
    values = [[] for _ in range(num_scales)]
    for row in rows:
        values[row["scale"]].append(row[key])
    return [float(np.percentile(v, percentile)) for v in values]
