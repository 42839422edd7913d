"""benchmark: method x (latency, speedup with their spread, MAC speedup, ShapesEval delta), in minutes on a CPU.

1. experiments/accel_common.py's protocol on the configured model with ShapesEval as the only quality measure.
   With model=infinity2b model.random_init=true it times the full architecture with random weights (no quality):
   meaningful on a GPU.
2. The analytic MAC speedup of the same methods on Infinity-2B's schedule (1024 x 1024 by default, the paper's
   setting: refinement = the last 3 scales, as conf/accel counts from the end), next to the wall-clock speedups
   the paper reports, and on the released models of the other families (`benchmark.release_macs`: VAR, STAR).
   Counted by accel/macs.py without building any model. A stages.json describes the model it was probed on, so
   these tables take each method's settings without it: refinement at the methods' own default (the last 3 scales).
"""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig

from accel.macs import count_macs
from accel.policies import ModelSpec, build_policy
from accel.sampler import Policy
from errors import UserError
from experiments.accel_common import BASELINE, Method, check_comparison, compare_methods, methods_from
from experiments.config_checks import number, whole
from experiments.recorder import RunRecorder
from models.family import TransformerCosts
from models.infinity import InfinityConfig
from models.schedules import NUM_STEPS_BY_PN, Grid, infinity_schedule
from models.star import RELEASES as STAR_RELEASES
from models.star import STARConfig
from models.text_encoder import CLIP_TOKENS
from models.var import VARConfig

log = logging.getLogger(__name__)

# Wall-clock speedups on Infinity-2B in the paper's Table 1 (StageVAR's authors' numbers for all three).
PAPER_SPEEDUPS = {"stagevar": 3.4, "fastvar": 2.75, "skipvar": 2.62}


def check(cfg: DictConfig) -> None:
    methods = methods_from(cfg.benchmark.methods)
    check_comparison(cfg, methods, "benchmark")
    check_infinity_2b_settings(cfg.benchmark.infinity_2b, "benchmark.infinity_2b")
    infinity_2b_macs(methods, cfg.benchmark.infinity_2b)  # analytic, milliseconds: every method's plan on Infinity-2B
    release_macs(methods, cfg.benchmark.release_macs)


def check_infinity_2b_settings(settings: DictConfig, key: str) -> None:
    """The schedule and text length of the analytic Infinity-2B MAC table (benchmark, accel_decompose)."""
    if settings.pn not in NUM_STEPS_BY_PN:
        raise UserError(f"{key}.pn={settings.pn!r} is not a known resolution; choose one of {sorted(NUM_STEPS_BY_PN)}")
    number(f"{key}.h_div_w", settings.h_div_w, 0, math.inf, low_open=True, why=" (height / width)")
    whole(f"{key}.text_length", settings.text_length, minimum=1)


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    methods = methods_from(cfg.benchmark.methods)
    summary = compare_methods(cfg, recorder, methods, "benchmark")
    rows = infinity_2b_macs(methods, cfg.benchmark.infinity_2b)
    table = recorder.log_table(
        "infinity_2b_macs", ["method", "TMACs", "MAC speedup", "paper wall-clock speedup"],
        [[row["method"], row["tmacs"], row["mac_speedup"], paper_speedup(row["method"])] for row in rows],
    )
    settings = cfg.benchmark.infinity_2b
    log.info(f"analytic MACs (transformer, head) on Infinity-2B, {settings.pn}, h/w {settings.h_div_w}, batch 1:\n{table}")
    releases = release_macs(methods, cfg.benchmark.release_macs)
    if releases:
        table = recorder.log_table("release_macs", ["model", "method", "TMACs", "MAC speedup"],
                                   [[row["model"], row["method"], row["tmacs"], row["mac_speedup"]] for row in releases])
        log.info(f"analytic MACs (transformer, head) on the released models, batch 1:\n{table}")
    return {**summary, "infinity_2b_macs": rows, "release_macs": releases}


def paper_speedup(label: str) -> str:
    return f"{PAPER_SPEEDUPS[label]:.2f}x" if label in PAPER_SPEEDUPS else "-"


def infinity_2b_macs(methods: list[Method], settings: DictConfig) -> list[dict]:
    """MACs of one Infinity-2B generation per method (the baseline first) and their speedup over the baseline."""
    config = InfinityConfig.infinity_2b()
    return analytic_macs(methods, "infinity2b", infinity_schedule(settings.h_div_w, settings.pn), config,
                         settings.text_length)


# The released models of the other families, by their conf/model name: the transformer (its schedule with it) and
# the text tokens its cross-attention reads.
RELEASES: dict[str, tuple[TransformerCosts, int]] = {
    **{f"var_d{depth}": (VARConfig.of_depth(depth), 0) for depth in (16, 20, 24, 30, 36)},
    **{f"star_{size}_d{depth}": (STARConfig.release(size, depth), CLIP_TOKENS) for size, depth in STAR_RELEASES},
}


def release_macs(methods: list[Method], names: list[str]) -> list[dict]:
    """`analytic_macs` on each released model in `names` (benchmark.release_macs), one row per model and method."""
    if unknown := [name for name in names if name not in RELEASES]:
        raise UserError(f"benchmark.release_macs names {unknown}; the releases counted here are {sorted(RELEASES)}")
    rows = []
    for name in names:
        config, text_length = RELEASES[name]
        rows += [{"model": name, **row} for row in analytic_macs(methods, name, config.schedule, config, text_length)]
    return rows


def analytic_macs(
    methods: list[Method], name: str, schedule: list[Grid], config: TransformerCosts, text_length: int
) -> list[dict]:
    """MACs of one generation (batch 1, CFG) per method, the baseline first, and their speedup over the baseline.
    Each method runs with its settings but a stages file's boundary, which belongs to the probed model."""
    spec = ModelSpec(name, schedule, config.depth, config.block_chunks)

    def macs(policy: Policy | None) -> int:
        return count_macs(config, schedule, policy, batch_size=1, text_length=text_length).total

    baseline = macs(None)
    rows = [{"method": BASELINE, "tmacs": baseline / 1e12, "mac_speedup": 1.0}]
    for method in methods:
        accel = method.accel.copy()
        if accel.get("stages_file") is not None:
            accel.stages_file = None
        total = macs(build_policy(accel, spec))
        rows.append({"method": method.label, "tmacs": total / 1e12, "mac_speedup": baseline / total})
    return rows
