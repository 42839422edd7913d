"""rank_sweep: StageVAR's rank ratio and refinement start, one Hydra multirun job per setting, then one table.

    python run.py -m experiment=rank_sweep accel.rank_ratio=0.1,0.2,0.3 accel.refinement_start=-2,-3
    python run.py experiment=rank_sweep rank_sweep.aggregate=true

Each job is an accel_eval of its setting, in <rank_sweep.dir>/<its overrides>/. A relaunched or extended sweep
launches only the jobs whose folder has no complete summary.json and leaves the finished ones untouched
(hydra_plugins/stagevar_sweeper); a job that failed or was interrupted continues in its folder, keeping the
images it had finished (experiments/image_batches.py). Launched with hydra/launcher=slurm, each job may
itself run on several GPUs (tasks_per_node), sharing its images as under torchrun.
Aggregation reads the job folders and writes, in its own run folder, one row per setting (tables/rank_sweep.csv)
and the speed/quality Pareto figure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from errors import UserError
from experiments import accel_eval
from experiments.accel_common import BASELINE, ParetoPoint, comparison_table, pareto_figure
from experiments.config_checks import flag
from experiments.recorder import RunRecorder

log = logging.getLogger(__name__)

SHARDED = accel_eval.SHARDED
RESUMABLE = accel_eval.RESUMABLE


def check(cfg: DictConfig) -> None:
    if not flag("rank_sweep.aggregate", cfg.rank_sweep.aggregate):
        accel_eval.check(cfg)


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    if cfg.rank_sweep.aggregate:
        if not recorder.processes.is_main:
            return {}  # reading the sweep's folders is one process's work
        return aggregate(Path(cfg.rank_sweep.dir), recorder, cfg.accel_eval.pareto_quality)
    return accel_eval.run(cfg, recorder)


def sweep_jobs(sweep_dir: Path) -> list[tuple[str, dict]]:
    """(folder, summary) of every complete job of a sweep, unfinished ones left out with a warning.

    A job folder is named by its overrides, so a path among them nests it deeper: every summary.json counts.
    """
    jobs = []
    for summary_path in sorted(sweep_dir.rglob("summary.json")):
        folder = str(summary_path.parent.relative_to(sweep_dir))
        summary = json.loads(summary_path.read_text())
        if summary.get("status") != "complete":
            log.warning("left out %s: status %s", folder, summary.get("status"))
            continue
        jobs.append((folder, summary))
    if not jobs:
        raise UserError(
            f"no finished job in rank_sweep.dir={str(sweep_dir)!r}: run the sweep first "
            "(python run.py -m experiment=rank_sweep accel.rank_ratio=... [rank_sweep.name=...])"
        )
    return jobs


def aggregate(sweep_dir: Path, recorder: RunRecorder, pareto_quality: str) -> dict:
    """One row per job (the first job's baseline on top), tables/rank_sweep.csv and figures/pareto.png.

    Every job's speedup and quality deltas are against the baseline measured in that same job, never another's:
    timing drifts between jobs on a shared machine."""
    jobs = sweep_jobs(sweep_dir)
    first = jobs[0][1]
    if pareto_quality not in first["scores"]:
        raise UserError(
            f"accel_eval.pareto_quality={pareto_quality!r} was not measured by the sweep; it measured {first['scores']}"
        )
    baseline, scores = first["methods"][0], first["scores"]
    rows = []
    for folder, summary in jobs:
        (method,) = [row for row in summary["methods"] if row["method"] != BASELINE]
        accel = method["accel"]
        rank_ratio, refinement_start = accel.get("rank_ratio"), accel.get("refinement_start")
        rows.append({**method, "method": f"r/M={rank_ratio} from scale {refinement_start}", "job": folder,
                     "rank_ratio": rank_ratio, "refinement_start": refinement_start})
    rows.sort(key=lambda row: (row["refinement_start"], row["rank_ratio"]))
    table = recorder.log_table("rank_sweep", *comparison_table([baseline, *rows], scores))
    log.info(f"rank sweep {sweep_dir} ({len(rows)} settings):\n{table}")
    points = [ParetoPoint(row["method"], row["speedup"], row[pareto_quality]) for row in [baseline, *rows]]
    title = f"rank sweep {sweep_dir.name}: {first['model']}"
    higher_is_better = first["higher_is_better"][pareto_quality]
    recorder.save_figure(pareto_figure(points, pareto_quality, higher_is_better, title), "pareto")
    return {"sweep_dir": str(sweep_dir), "scores": scores, "higher_is_better": first["higher_is_better"],
            "pareto_quality": pareto_quality, "baseline": baseline, "jobs": rows}
