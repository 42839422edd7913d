"""The stage probe's figures, drawn from a run folder's files alone (the experiment and the notebook both use this).

    run = load_probe_run("outputs/stage_probe/<run>")
    figures = probe_figures(run)   # {name: matplotlib Figure}

Every plot against the scale index shades the detected stages and marks their boundaries: the visible ones
beside visible curves, the decided ones beside the continuation probe's. Figures are made without pyplot, so
nothing is shown or kept open until a caller decides to.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from analysis.rows import band_key, rank_key, scale_means, scale_percentiles

STAGE_COLORS = {"semantic": "tab:blue", "structure": "tab:green", "refinement": "tab:red"}
STRIP_IMAGE = re.compile(r"(\d+)_scale(\d+)\.png")


@dataclass
class ProbeRun:
    rows: list[dict]  # results.jsonl: one per prompt and scale
    stages: dict  # stages.json
    spectra: dict  # spectra.json
    strip: dict[int, list[np.ndarray]]  # prompt index -> its partial image after every scale
    prompt_texts: dict[int, str]

    @property
    def schedule(self) -> list[list[int]]:
        return self.stages["schedule"]


def load_probe_run(run_dir: str | Path) -> ProbeRun:
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    strip: dict[int, dict[int, np.ndarray]] = {}
    for path in sorted((run_dir / "images" / "strip").glob("*.png")):
        index, scale = map(int, STRIP_IMAGE.fullmatch(path.name).groups())
        strip.setdefault(index, {})[scale] = np.asarray(Image.open(path))
    return ProbeRun(
        rows=rows,
        stages=json.loads((run_dir / "stages.json").read_text()),
        spectra=json.loads((run_dir / "spectra.json").read_text()),
        strip={index: [images[k] for k in sorted(images)] for index, images in strip.items()},
        prompt_texts={row["index"]: row["prompt"] for row in rows},
    )


def probe_figures(run: ProbeRun) -> dict[str, Figure]:
    fidelity = {"fidelity_curves": metric_curves(run, "fidelity")} if run.stages["rule"].get("fidelity_metrics") else {}
    decided = {"visible_vs_decided": visible_vs_decided(run)} if run.stages.get("decided") else {}
    return {
        "fig1a_semantic_curves": metric_curves(run, "semantic"),
        "fig1b_structural_curves": metric_curves(run, "structural"),
        **fidelity,
        **decided,
        "fig1c_frequency_band_changes": band_changes(run),
        "partial_images": partial_image_strip(run),
        "power_spectra": power_spectra(run),
        "singular_value_spectra": singular_value_spectra(run),
        "rank_fraction": rank_fractions(run),
    }


def draw_stages(axis: Axes, stages: dict, evidence: str = "visible") -> None:
    """Shade each stage the `evidence` (visible or decided) found and mark the boundaries between them."""
    num_scales = len(stages["schedule"])
    boundaries = stages.get(evidence) or stages  # files written before the decided evidence hold the visible alone
    semantic_end, refinement_start = boundaries["semantic_end"], boundaries["refinement_start"]
    spans = {
        "semantic": (-0.5, semantic_end + 0.5),
        "structure": (semantic_end + 0.5, refinement_start - 0.5),
        "refinement": (refinement_start - 0.5, num_scales - 0.5),
    }
    for stage, (start, end) in spans.items():
        if end > start:
            axis.axvspan(start, end, color=STAGE_COLORS[stage], alpha=0.08, label=f"{stage} stage")
        else:  # said in the legend, so a figure never hides that a stage was not found
            axis.axvspan(0, 0, color=STAGE_COLORS[stage], alpha=0.0, label=f"no {stage} stage found")
    for boundary in sorted({semantic_end + 0.5, refinement_start - 0.5}):
        if boundary < num_scales - 0.5:
            axis.axvline(boundary, color="0.3", linestyle="--", linewidth=0.8)


def grid_label(grid: list[int]) -> str:
    height, width = grid
    return f"{height}" if height == width else f"{height}x{width}"


def scale_axis(axis: Axes, schedule: list[list[int]]) -> None:
    axis.set_xticks(range(len(schedule)), [grid_label(grid) for grid in schedule])
    axis.set_xlim(-0.5, len(schedule) - 0.5)
    axis.set_xlabel("scale (token grid side)")


def metric_curves(run: ProbeRun, kind: str) -> Figure:
    """Fig. 1 (a) or (b): each semantic or structural metric's mean over prompts, per scale; or the fidelity
    metrics', which the stage rule does not read."""
    fig = Figure(figsize=(6, 3.6))
    axis = fig.subplots()
    for name in run.stages["rule"][f"{kind}_metrics"]:
        axis.plot(run.stages["curves"][name], marker="o", label=name)
    draw_stages(axis, run.stages)
    scale_axis(axis, run.schedule)
    panel = {"semantic": "(a) ", "structural": "(b) "}.get(kind, "")
    axis.set_title(f"{panel}{kind} metrics of each partial image vs the final image (or prompt)")
    axis.set_ylabel("mean over prompts")
    axis.legend(fontsize=7, loc="best")
    return fig


def visible_vs_decided(run: ProbeRun) -> Figure:
    """Per metric kind (rows), the visible curves (left: each partial image vs the final image) beside the decided
    ones (right: the continuations forked after each scale vs the original, +- one standard error over prompts,
    dashed: between two continuations), each shaded with its own stages."""
    rule, decided = run.stages["rule"], run.stages["decided"]
    kinds = [kind for kind in ("semantic", "structural", "fidelity") if rule.get(f"{kind}_metrics")]
    fig = Figure(figsize=(11, 3.2 * len(kinds)), layout="constrained")
    axes = fig.subplots(len(kinds), 2, squeeze=False, sharex=True)
    scales = np.arange(len(run.schedule))
    for row, kind in enumerate(kinds):
        visible_axis, decided_axis = axes[row]
        for i, name in enumerate(rule[f"{kind}_metrics"]):
            color = f"C{i}"
            visible_axis.plot(run.stages["curves"][name], marker="o", color=color, label=name)
            curve = np.asarray(decided["curves"][name], dtype=float)
            stderr = np.asarray(decided["stderr"][name], dtype=float)  # NaN (None) with a single prompt
            decided_axis.plot(curve, marker="o", color=color, label=name)
            decided_axis.fill_between(scales, curve - stderr, curve + stderr, color=color, alpha=0.2, linewidth=0)
            if name in decided["spread"]:
                decided_axis.plot(np.asarray(decided["spread"][name], dtype=float), color=color, linestyle="--",
                                  label=f"{name}, between continuations")
        for axis, evidence in ((visible_axis, "visible"), (decided_axis, "decided")):
            draw_stages(axis, run.stages, evidence)
            scale_axis(axis, run.schedule)
        visible_axis.set_ylabel(f"{kind}: mean over prompts")
        decided_axis.legend(fontsize=6, loc="best")
    axes[0, 0].set_title("visible: the partial image through scale k vs the final image (or prompt)", fontsize=9)
    axes[0, 1].set_title(f"decided: {decided['continuations']} continuation(s) forked after scale k vs the original "
                         "(prompt metrics: agreement)", fontsize=9)
    return fig


def band_changes(run: ProbeRun) -> Figure:
    """Fig. 1 (c): how much each scale changes the image, per frequency band (FFT magnitude of the change)."""
    fig = Figure(figsize=(6, 3.6))
    axis = fig.subplots()
    for label in run.spectra["band_labels"]:
        curve = scale_means(run.rows, band_key(label), len(run.schedule))
        axis.plot(curve, marker="o", label=f"band {label} x Nyquist")
    draw_stages(axis, run.stages)
    scale_axis(axis, run.schedule)
    axis.set_yscale("log")
    axis.set_title("(c) change from the previous scale, by frequency band")
    axis.set_ylabel("mean |FFT| of the change")
    axis.legend(fontsize=7)
    return fig


def partial_image_strip(run: ProbeRun) -> Figure:
    """The partial image after every scale, one row per strip prompt."""
    indices = sorted(run.strip)
    rows, columns = max(len(indices), 1), len(run.schedule)
    fig = Figure(figsize=(1.2 * columns + 1, 1.2 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.set(xticks=[], yticks=[])
        axis.spines[:].set_visible(False)
    for scale, grid in enumerate(run.schedule):
        axes[0, scale].set_title(grid_label(grid), fontsize=8)
    for row, index in enumerate(indices):
        for scale, image in enumerate(run.strip[index]):
            axes[row, scale].imshow(image)
        axes[row, 0].set_ylabel(textwrap.fill(run.prompt_texts[index], 18), fontsize=6)
    fig.suptitle("partial images after each scale (titles: token grid side)", fontsize=9)
    return fig


def power_spectra(run: ProbeRun) -> Figure:
    """Radially averaged power spectrum of the partial images at each scale (mean over prompts)."""
    fig = Figure(figsize=(6, 3.6))
    axis = fig.subplots()
    radii = np.asarray(run.spectra["radii"])
    colors = colormaps["viridis"](np.linspace(0, 1, len(run.schedule)))
    for scale, (power, color) in enumerate(zip(run.spectra["power_spectrum"], colors)):
        axis.loglog(radii[1:], power[1:], color=color, label=f"grid {grid_label(run.schedule[scale])}")
    axis.set_xlabel("frequency (x Nyquist)")
    axis.set_ylabel("mean power")
    axis.set_title("power spectra of the partial images")
    axis.legend(fontsize=6, ncol=2)
    return fig


def singular_value_spectra(run: ProbeRun) -> Figure:
    """Share of the squared norm held by the leading r singular values, against r / M, per scale and source."""
    sources = run.spectra["rank_sources"]
    fig = Figure(figsize=(4.2 * len(sources), 3.4))
    axes = fig.subplots(1, len(sources), squeeze=False)
    colors = colormaps["viridis"](np.linspace(0, 1, len(run.schedule)))
    for axis, source in zip(axes[0], sources):
        for scale, (energy, color) in enumerate(zip(run.spectra["cumulative_energy"][source], colors)):
            tokens = run.schedule[scale][0] * run.schedule[scale][1]
            axis.plot(np.arange(1, len(energy) + 1) / tokens, energy, color=color,
                      label=f"grid {grid_label(run.schedule[scale])}")
        for level in run.spectra["rank_energies"]:
            axis.axhline(level, color="0.5", linestyle=":", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xlabel("rank r / tokens M")
        axis.set_title(f"{source}: cumulative singular-value energy", fontsize=9)
    axes[0, 0].set_ylabel("energy share (mean over prompts)")
    axes[0, -1].legend(fontsize=6, ncol=2)
    return fig


def rank_fractions(run: ProbeRun) -> Figure:
    """Rank at each energy as a fraction of the token count M, per scale: mean (solid) and p90 (dashed); and the
    per-chunk ranks of the released StageVAR (rank of the centred chunk input over min(M, d)), one line per chunk."""
    sources = run.spectra["rank_sources"]
    chunk_ratios = run.stages["ranks"].get("chunk_ranks", {}).get("ratio", {})  # probes before them have none
    fig = Figure(figsize=(4.2 * (len(sources) + bool(chunk_ratios)), 3.4))
    axes = fig.subplots(1, len(sources) + bool(chunk_ratios), squeeze=False, sharey=True)
    num_scales = len(run.schedule)
    for axis, source in zip(axes[0], sources):
        for i, energy in enumerate(run.spectra["rank_energies"]):
            color, key = f"C{i}", rank_key(source, energy, fraction=True)
            axis.plot(scale_means(run.rows, key, num_scales), color=color, marker="o", label=f"energy {energy:g} mean")
            axis.plot(scale_percentiles(run.rows, key, num_scales, 90), color=color, linestyle="--", label="p90")
        draw_stages(axis, run.stages)
        scale_axis(axis, run.schedule)
        axis.set_title(f"{source}: rank / M", fontsize=9)
    axes[0, 0].set_ylabel("rank fraction r / M")
    axes[0, len(sources) - 1].legend(fontsize=6)
    if chunk_ratios:
        alpha = "0.96" if "0.96" in chunk_ratios else next(iter(chunk_ratios))
        axis, per_scale = axes[0, -1], chunk_ratios[alpha]
        for c in range(len(per_scale["0"])):
            axis.plot([per_scale[str(k)][c] for k in range(len(run.schedule))], marker="o", label=f"chunk {c}")
        draw_stages(axis, run.stages)
        scale_axis(axis, run.schedule)
        axis.set_title(f"block-chunk inputs at alpha {alpha}: rank / min(M, d)", fontsize=9)
        axis.legend(fontsize=6)
    return fig
