"""benchmark: method x (latency, speedup with their spread, MAC speedup, ShapesEval delta), in minutes on a CPU.

1. experiments/accel_common.py's protocol on the configured model with ShapesEval as the only quality measure.
   With model=infinity2b model.random_init=true it times the full architecture with random weights (no quality):
   meaningful on a GPU.
2. The analytic MAC speedup of the same methods on Infinity-2B's schedule (1024 x 1024 by default, the paper's
   setting: refinement = the last 3 scales, as conf/accel counts from the end), next to the wall-clock speedups
   the paper reports. Counted by accel/macs.py without building the 2B model.
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
from models.infinity import InfinityConfig
from models.schedules import NUM_STEPS_BY_PN, infinity_schedule

log = logging.getLogger(__name__)

# Wall-clock speedups on Infinity-2B in the paper's Table 1 (StageVAR's authors' numbers for all three).
PAPER_SPEEDUPS = {"stagevar": 3.4, "fastvar": 2.75, "skipvar": 2.62}


def check(cfg: DictConfig) -> None:
    methods = methods_from(cfg.benchmark.methods)
    check_comparison(cfg, methods, "benchmark")
    check_infinity_2b_settings(cfg.benchmark.infinity_2b, "benchmark.infinity_2b")
    infinity_2b_macs(methods, cfg.benchmark.infinity_2b)  # analytic, milliseconds: every method's plan on Infinity-2B


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
    return {**summary, "infinity_2b_macs": rows}


def paper_speedup(label: str) -> str:
    return f"{PAPER_SPEEDUPS[label]:.2f}x" if label in PAPER_SPEEDUPS else "-"


def infinity_2b_macs(methods: list[Method], settings: DictConfig) -> list[dict]:
    """MACs of one Infinity-2B generation per method (the baseline first) and their speedup over the baseline."""
    config = InfinityConfig.infinity_2b()
    schedule = infinity_schedule(settings.h_div_w, settings.pn)
    spec = ModelSpec("infinity2b", schedule, config.depth, config.block_chunks)

    def macs(policy: Policy | None) -> int:
        return count_macs(config, schedule, policy, batch_size=1, text_length=settings.text_length).total

    baseline = macs(None)
    rows = [{"method": BASELINE, "tmacs": baseline / 1e12, "mac_speedup": 1.0}]
    for method in methods:
        total = macs(build_policy(method.accel, spec))
        rows.append({"method": method.label, "tmacs": total / 1e12, "mac_speedup": baseline / total})
    return rows
