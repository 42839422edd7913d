"""accel_compare: every acceleration policy and ablation of the preset against the baseline, in one process.

The methods are the `accel_compare.methods` list (each a label, an accel option and the keys it changes); the
protocol, table and Pareto figure are experiments/accel_common.py's.
"""

from omegaconf import DictConfig

from experiments.accel_common import check_comparison, compare_methods, methods_from
from experiments.recorder import RunRecorder

SHARDED = True  # every process of a torchrun run makes its share of every method's images; rank 0 times alone
RESUMABLE = True  # resume=<run folder> keeps the images an interrupted run finished


def check(cfg: DictConfig) -> None:
    check_comparison(cfg, methods_from(cfg.accel_compare.methods), "accel_compare")


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    return compare_methods(cfg, recorder, methods_from(cfg.accel_compare.methods), "accel_compare")
