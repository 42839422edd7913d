"""The stage probe's measurements: a sampler observer per prompt batch, and per-scale rows from what it saw.

`ScaleTrace` watches one `generate()` call: after every scale it decodes the partial image from the latent
accumulated so far (at full resolution) and takes the singular values of the conditional rows' scale input
F~ and of chosen block outputs. `measure` then turns the trace into one row per prompt and scale: every
metric against the final image (or the prompt), the frequency-band change from the previous scale, and the
ranks at each energy. Per-image spectra only enter running means, so a run never holds more than one batch
of images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from accel.sampler import ScaleRecord, to_uint8
from analysis.metrics import Metric
from analysis.ranks import RankAggregate, aggregate_rank, cumulative_energy, energy_ranks, singular_values
from analysis.rows import INPUTS, UPDATE_RATIO, band_key, chunk_rank_key, rank_key
from analysis.spectra import band_change, band_labels, check_band_edges, radial_power_spectrum
from analysis.stages import EVIDENCE
from errors import UserError
from models.family import MultiScaleTokenizer
from models.schedules import Grid


PROBE_SOURCES = ("model", "ground_truth")


@dataclass
class ProbeConfig:
    num_prompts: int = 64  # spread evenly over the prompt list
    batch_size: int = 16
    rank_energies: Sequence[float] = (0.9, 0.95, 0.99)
    rank_blocks: Sequence[int] = (0, -1)  # blocks whose output ranks are measured too; -1 is the last
    band_edges: Sequence[float] = (0.25, 0.5)  # normalised radii cutting the frequency bands (analysis/spectra.py)
    strip_prompts: int = 4  # prompts whose partial images are saved for the strip figure
    chunk_rank_energies: Sequence[float] = (0.9, 0.95, 0.96, 0.99)  # alphas of the per-chunk ranks (the released
    # StageVAR's presets: rank of the centred block-chunk input at energy alpha over min(M, d))
    source: str = "model"  # model: its own samples; ground_truth: every scale's bits from the world's renders
    evidence: str = "both"  # visible: partial images vs the final one; decided: continuations vs the original
    # (analysis/continuations.py); both: the two, the later boundary of each fed to the sampler
    continuations: int = 2  # per prompt and scale, for decided and both

    def __post_init__(self) -> None:
        if self.source not in PROBE_SOURCES:
            raise UserError(f"probe.source={self.source!r}: use one of {', '.join(PROBE_SOURCES)}")
        if self.evidence not in EVIDENCE:
            raise UserError(f"probe.evidence={self.evidence!r}: use one of {', '.join(EVIDENCE)}")
        if self.decided and self.source == "ground_truth":
            raise UserError(f"probe.evidence={self.evidence} forks the model's own run, but probe.source=ground_truth "
                            "takes every scale's bits from the world: add probe.evidence=visible (experiment="
                            "prefix_probe continues the world's prefixes with the model)")
        continuations_ok = isinstance(self.continuations, int) and not isinstance(self.continuations, bool)
        if self.decided and (not continuations_ok or self.continuations < 1):
            raise UserError(f"probe.continuations={self.continuations!r} must be a positive whole number with "
                            f"probe.evidence={self.evidence}; probe.evidence=visible runs no continuations")
        for key in ("num_prompts", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise UserError(f"probe.{key}={getattr(self, key)!r} must be a positive whole number")
        if not isinstance(self.strip_prompts, int) or self.strip_prompts < 0:
            raise UserError(f"probe.strip_prompts={self.strip_prompts!r} must be a whole number >= 0")
        for key in ("rank_energies", "chunk_rank_energies"):
            energies = list(getattr(self, key))
            if not energies or not all(0 < e <= 1 for e in energies):
                raise UserError(f"probe.{key}={energies} must be shares in (0, 1]")
        try:
            check_band_edges(self.band_edges)
        except ValueError as error:
            raise UserError(f"probe.band_edges: {error}") from None

    @property
    def decided(self) -> bool:
        """Whether the probe forks continuations (the decided evidence)."""
        return self.evidence != "visible"

    def blocks(self, depth: int) -> list[int]:
        """rank_blocks as block indices of a transformer of this depth."""
        wrong = [b for b in self.rank_blocks if not -depth <= b < depth]
        if wrong:
            raise UserError(f"probe.rank_blocks={list(self.rank_blocks)}: {wrong} outside a {depth}-block model")
        return sorted({b % depth for b in self.rank_blocks})


@dataclass(frozen=True)
class RankChoice:
    """Which measured rank becomes the r_k that the accelerated sampler uses."""

    source: str = INPUTS
    energy: float = 0.95
    aggregate: RankAggregate = "p90"

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "p90"):
            raise UserError(f"stages.ranks.aggregate={self.aggregate!r} is unknown: use p90 or mean")


class ScaleTrace:
    """Sampler observer for one prompt batch: partial images, feature singular values and the relative size of
    each scale's update to the latent (`update_ratio`: a signal the sampler has for free, recorded beside the
    continuation probe's verdict agreement, as a candidate for deciding per image when refinement starts)."""

    def __init__(self, vae: MultiScaleTokenizer, rank_blocks: Sequence[int], chunk_starts: Sequence[int] = (0,)):
        self.vae = vae
        self.rank_blocks = tuple(rank_blocks)
        # A chunk's input is the scale input (level embedding added) or the output of the block before it.
        self.chunk_input_blocks = tuple(start - 1 for start in chunk_starts if start > 0)
        self.capture_blocks = tuple(sorted({*self.rank_blocks, *self.chunk_input_blocks}))
        self.chunk_singular_values: list[Tensor] = []  # per scale, (B, chunks, min(M, d)) of the centred inputs
        self.start_image: Tensor | None = None  # the empty latent decoded: the image before scale 0
        self.partial_images: list[Tensor] = []  # per scale, uint8 (B, H, W, 3)
        self.singular_values: list[dict[str, Tensor]] = []  # per scale, {source: (B, min(M, d))}
        self.grids: list[Grid] = []
        self.update_ratios: list[Tensor] = []  # per scale, (B,): |latent_k - latent_k-1| / |latent_k|
        self._previous_latent: Tensor | None = None

    def on_scale(self, record: ScaleRecord) -> None:
        if self.start_image is None:
            self.start_image = to_uint8(self.vae.decode(torch.zeros_like(record.latent)))
            self._previous_latent = torch.zeros_like(record.latent)
        self.partial_images.append(to_uint8(self.vae.decode(record.latent)))
        update = (record.latent - self._previous_latent).flatten(1).float().norm(dim=1)
        self.update_ratios.append((update / record.latent.flatten(1).float().norm(dim=1).clamp(min=1e-12)).cpu())
        self._previous_latent = record.latent  # the sampler makes a new latent each scale, never writes this one
        batch = record.latent.shape[0]  # under CFG rows [0, batch) are the conditional ones
        features = {INPUTS: record.inputs[:batch]}
        features |= {f"block{b}": record.block_hidden[b][:batch] for b in self.rank_blocks}
        self.singular_values.append({source: singular_values(f).cpu() for source, f in features.items()})
        chunk_inputs = [record.inputs[:batch]] + [record.block_hidden[b][:batch] for b in self.chunk_input_blocks]
        centred = [x.float() - x.float().mean(1, keepdim=True) for x in chunk_inputs]  # the level embedding cancels
        self.chunk_singular_values.append(torch.stack([singular_values(x) for x in centred], dim=1).cpu())
        self.grids.append(record.grid)


@dataclass
class RunningMeans:
    """Means of equal-length vectors per key, kept as sums so per-image spectra need not be stored."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, vectors: Tensor) -> None:
        total = vectors.double().sum(0)
        self.sums[key] = self.sums[key] + total if key in self.sums else total
        self.counts[key] = self.counts.get(key, 0) + len(vectors)

    def mean(self, key: str) -> list[float]:
        return (self.sums[key] / self.counts[key]).tolist()

    def add_means(self, other: RunningMeans) -> None:
        """Take in another's sums (a batch measured by another process), as if its vectors had been added here."""
        for key, total in other.sums.items():
            self.sums[key] = self.sums[key] + total if key in self.sums else total
            self.counts[key] = self.counts.get(key, 0) + other.counts[key]


def measure(
    trace: ScaleTrace, prompts: Sequence[dict], metrics: dict[str, Metric], config: ProbeConfig, spectra: RunningMeans,
    more_columns: Mapping[int, Mapping[str, Tensor]] | None = None,
) -> list[dict]:
    """One row per prompt and scale from a finished trace; power spectra and singular-value energies go to `spectra`.
    `more_columns`: per scale, more (B,) columns for the rows (the continuation probe's)."""
    final_images = trace.partial_images[-1]  # the final latent decoded the same way: the generated images
    previous_images = trace.start_image
    labels = band_labels(config.band_edges)
    rows = [[] for _ in prompts]
    scales = zip(trace.partial_images, trace.grids, trace.singular_values, trace.chunk_singular_values,
                 trace.update_ratios)
    for scale, (images, grid, values, chunk_values, update_ratio) in enumerate(scales):
        tokens = grid[0] * grid[1]
        columns = {
            name: metric(images, final_images if metric.compares_with == "image" else prompts)
            for name, metric in metrics.items()
        }
        columns[UPDATE_RATIO] = update_ratio
        bands = band_change(previous_images, images, config.band_edges)
        columns |= {band_key(label): bands[:, i] for i, label in enumerate(labels)}
        for source, source_values in values.items():
            ranks = energy_ranks(source_values, config.rank_energies)
            for i, energy in enumerate(config.rank_energies):
                columns[rank_key(source, energy)] = ranks[:, i]
                columns[rank_key(source, energy, fraction=True)] = ranks[:, i] / tokens
            spectra.add(f"cumulative_energy/{source}/{scale}", cumulative_energy(source_values))
        chunk_ranks = [energy_ranks(chunk_values[:, c], config.chunk_rank_energies) for c in range(chunk_values.shape[1])]
        for i, energy in enumerate(config.chunk_rank_energies):  # (B, chunks): rank / min(M, d), as the presets
            columns[chunk_rank_key(energy)] = torch.stack([ranks[:, i] for ranks in chunk_ranks], 1) / chunk_values.shape[-1]
        spectra.add(f"power_spectrum/{scale}", radial_power_spectrum(images))
        columns |= (more_columns or {}).get(scale, {})
        for i, prompt in enumerate(prompts):
            row = {"index": prompt["index"], "prompt": prompt["prompt"], "scale": scale, "grid": list(grid),
                   "tokens": tokens}
            rows[i].append(row | {key: _plain(column[i]) for key, column in columns.items()})
        previous_images = images
    return [row for prompt_rows in rows for row in prompt_rows]


def _plain(value: Tensor) -> float | int | list | None:
    """A row value for JSON: NaN (a metric that does not apply to the prompt) becomes None; a vector, a list."""
    if value.dim() > 0:
        return value.tolist()
    number = value.item()
    return None if isinstance(number, float) and np.isnan(number) else number


def rank_summary(
    rows: Sequence[dict], choice: RankChoice, schedule: Sequence[Grid], chunk_rank_energies: Sequence[float]
) -> dict:
    """The per-scale ranks r_k for stages.json (`choice.aggregate` over prompts of the rank at `choice.energy`),
    and the per-chunk rank ratios for the released StageVAR: their mean over prompts, per alpha and scale."""
    key = rank_key(choice.source, choice.energy)
    if not rows or key not in rows[0]:
        raise UserError(f"stages.ranks: no rank was measured for source {choice.source!r} at energy {choice.energy}")
    per_scale = [
        aggregate_rank([row[key] for row in rows if row["scale"] == k], choice.aggregate) for k in range(len(schedule))
    ]
    return {
        "source": choice.source,
        "energy": choice.energy,
        "per_scale": per_scale,
        "fraction": [rank / (h * w) for rank, (h, w) in zip(per_scale, schedule)],
        "aggregate": choice.aggregate,
        "chunk_ranks": {
            "measure": "rank of the centred block-chunk input at energy alpha over min(M, d), mean over prompts",
            "ratio": {
                format(energy, "g"): {
                    str(k): np.mean([row[chunk_rank_key(energy)] for row in rows if row["scale"] == k], axis=0).tolist()
                    for k in range(len(schedule))
                }
                for energy in chunk_rank_energies
            },
        },
    }
