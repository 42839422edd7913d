"""The stage probe's rows (results.jsonl), one per prompt and scale: their keys, and per-scale curves from them.

A row holds index, prompt, scale, grid, tokens; one value per metric name (None where a prompt metric does
not apply); band_change/<band>; rank/<source>@<energy> and rank_fraction/<source>@<energy>, where the source
is "inputs" (the scale input F~) or "block<i>". No torch here, so the notebook loads quickly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

INPUTS = "inputs"  # the rank source of the scale input F~


def rank_key(source: str, energy: float, fraction: bool = False) -> str:
    return f"{'rank_fraction' if fraction else 'rank'}/{source}@{energy:g}"


def chunk_rank_key(energy: float) -> str:
    """The row key of the per-chunk rank ratios (a list, one per block chunk) at one energy."""
    return f"chunk_rank_ratio@{energy:g}"


def band_key(label: str) -> str:
    return f"band_change/{label}"


def scale_means(rows: Sequence[dict], key: str, num_scales: int) -> list[float]:
    """Mean of `key` over prompts at each scale, skipping rows where it is None (NaN where all are)."""
    values = [[] for _ in range(num_scales)]
    for row in rows:
        if row.get(key) is not None:
            values[row["scale"]].append(row[key])
    return [float(np.mean(v)) if v else float("nan") for v in values]


def scale_percentiles(rows: Sequence[dict], key: str, num_scales: int, percentile: float) -> list[float]:
    values = [[] for _ in range(num_scales)]
    for row in rows:
        values[row["scale"]].append(row[key])
    return [float(np.percentile(v, percentile)) for v in values]
