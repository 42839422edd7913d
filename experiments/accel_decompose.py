"""accel_decompose: where StageVAR's speedup comes from, as its authors released it and as the paper describes it.

On the same prompts and seeds, in one process with interleaved timing (experiments/accel_common.py's protocol):
the baseline; the release's skip of the last 2 scales alone; its CFG drop on the last 3 alone; both; the released
policy in full; without the skip (random projection on all of the last 3 scales, as the paper describes); with the
RoPE at the representative positions; our `stagevar`, and with the skip. Per row: wall-clock speedup with its spread,
analytic MAC speedup, quality against the baseline (ShapesEval delta with its standard error, the per-image metrics,
FID against the baseline images). Also the analytic MAC table of every row on Infinity-2B (no weights), and
figures/speedup_sources.png: the `chain` of cumulative rows as stacked bars, each segment one step's share of the
total speedup on a log scale (wall-clock here, MACs here, MACs on Infinity-2B).
"""

from __future__ import annotations

import logging
import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from omegaconf import DictConfig

from errors import UserError
from experiments.accel_common import check_comparison, compare_methods, methods_from
from experiments.benchmark import check_infinity_2b_settings, infinity_2b_macs
from experiments.recorder import RunRecorder

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    settings = cfg.accel_decompose
    methods = methods_from(settings.methods)
    check_comparison(cfg, methods, "accel_decompose")
    labels = [method.label for method in methods]
    if unknown := [label for label in settings.chain if label not in labels]:
        raise UserError(f"accel_decompose.chain names {unknown}, which are not among the methods {labels}")
    check_infinity_2b_settings(settings.infinity_2b, "accel_decompose.infinity_2b")
    infinity_2b_macs(methods, settings.infinity_2b)  # analytic, milliseconds: every method's plan on Infinity-2B


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    settings = cfg.accel_decompose
    methods = methods_from(settings.methods)
    summary = compare_methods(cfg, recorder, methods, "accel_decompose")
    macs_2b = infinity_2b_macs(methods, settings.infinity_2b)
    table = recorder.log_table(
        "infinity_2b_macs", ["method", "TMACs", "MAC speedup"],
        [[row["method"], row["tmacs"], row["mac_speedup"]] for row in macs_2b],
    )
    log.info(f"analytic MACs of the same rows on Infinity-2B ({settings.infinity_2b.pn}, batch 1):\n{table}")
    chain = list(settings.chain)
    speedups = {
        "wall-clock, here": {row["method"]: row["speedup"] for row in summary["methods"]},
        "MACs, here": {row["method"]: row["mac_speedup"] for row in summary["methods"]},
        "MACs, Infinity-2B 1024 px": {row["method"]: row["mac_speedup"] for row in macs_2b},
    }
    recorder.save_figure(speedup_sources(chain, speedups, f"{cfg.model.name}: where the speedup comes from"),
                         "speedup_sources")
    return {**summary, "infinity_2b_macs": macs_2b, "chain": chain}


def speedup_sources(chain: list[str], speedups: dict[str, dict[str, float]], title: str) -> Figure:
    """One stacked bar per measure: step i's segment is log(s_i / s_(i-1)) of the chain's cumulative speedups s_i,
    so the segments add up to the total log speedup; labelled with the step's own factor."""
    fig, axis = plt.subplots(figsize=(7.5, 4.2))
    for bar, (measure, by_method) in enumerate(speedups.items()):
        bottom, before = 0.0, 1.0
        for step, (label, color) in enumerate(zip(chain, plt.rcParams["axes.prop_cycle"].by_key()["color"])):
            factor = by_method[label] / before
            height = math.log(max(factor, 1e-9))
            axis.bar(bar, height, bottom=bottom, color=color, label=label if bar == 0 else None, edgecolor="white")
            axis.text(bar, bottom + height / 2, f"x{factor:.2f}", ha="center", va="center", fontsize=8)
            bottom, before = bottom + height, by_method[label]
        axis.text(bar, bottom, f"x{before:.2f}", ha="center", va="bottom", fontsize=9, weight="bold")
    axis.axhline(0, color="0.5", linewidth=0.8)
    axis.set_xticks(range(len(speedups)), list(speedups))
    axis.set_ylabel("log speedup over the baseline")
    axis.set_title(title, fontsize=10)
    axis.legend(title="cumulative step", fontsize=8)
    return fig
