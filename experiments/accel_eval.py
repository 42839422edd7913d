"""accel_eval: one acceleration policy (cfg.accel) against the baseline, on the same prompts and seeds.

Speed (interleaved wall-clock median, peak memory, analytic MACs) and quality (ShapesEval or the GenEval layout,
CLIP score when its weights exist, per-image metrics and FID against the baseline) as experiments/accel_common.py
describes; one table row per method, a Pareto figure and a sample grid.
"""

from omegaconf import DictConfig

from errors import UserError
from experiments.accel_common import Method, check_comparison, compare_methods
from experiments.recorder import RunRecorder

SHARDED = True  # every process of a torchrun run makes its share of every method's images; rank 0 times alone
RESUMABLE = True  # resume=<run folder> keeps the images an interrupted run finished


def check(cfg: DictConfig) -> None:
    if cfg.accel.name == "none":
        raise UserError("accel=none is the baseline itself; choose a policy to evaluate, e.g. accel=stagevar")
    check_comparison(cfg, [Method(cfg.accel.name, cfg.accel)], "accel_eval")


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    return compare_methods(cfg, recorder, [Method(cfg.accel.name, cfg.accel)], "accel_eval")
