"""The acceleration experiments: timing core, Pareto front, and accel_compare / rank_sweep / benchmark
end to end on a small random checkpoint, through run.py in this process."""

import csv
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from accel.policies import ModelSpec, build_policy
from analysis.stages import StageBoundaries, StageRule, write_stages
from errors import UserError
from experiments.accel_common import (
    Method,
    ParetoPoint,
    PeakMemory,
    Timing,
    accel_option,
    check_policies,
    methods_from,
    paired_delta,
    pareto_front,
    speed_row,
    time_interleaved,
)
from experiments.benchmark import infinity_2b_macs, release_macs

from helpers import CHECKPOINT_CONFIG, quick_overrides, read_rows, run_py, write_small_checkpoint

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_checkpoint(tmp_path_factory.mktemp("small_checkpoint"))


# ----------------------------------------------------------------------------------------------------------
# Timing


def test_timing_interleaves_repeats_after_warm_up_and_reports_medians():
    calls = []

    def method(name: str, seconds: float, outlier_call: int = 0):
        def call():
            calls.append(name)
            time.sleep(seconds + (0.3 if calls.count(name) == outlier_call else 0))
        return call

    # "slow" has an outlier on its first timed call (its second call: one warm-up round comes first).
    methods = {"slow": method("slow", 0.03, outlier_call=2), "fast": method("fast", 0.005)}
    timings = time_interleaved(methods, repeats=5, warmup=1, device=torch.device("cpu"))
    assert calls == ["slow", "fast"] * 6  # one warm-up round, then 5 timed rounds in turn
    slow, fast = timings["slow"], timings["fast"]
    assert len(slow.seconds) == len(fast.seconds) == 5
    assert slow.seconds[0] >= 0.3 and slow.median < 0.2  # the median ignores the one outlier
    assert 0.005 <= fast.median < slow.median
    assert slow.peak_memory_mib > 0


def test_a_speedup_carries_the_range_of_its_rounds_and_says_when_it_is_not_significant():
    baseline = Timing([1.0, 1.1, 0.9, 1.0, 1.2], None)
    faster = speed_row("fast", Timing([0.5, 0.5, 0.5, 0.6, 0.5], None), baseline, 50.0, 100.0)
    assert faster["speedup"] == pytest.approx(2.0) and faster["speedup_verdict"] == ""
    assert (faster["speedup_min"], faster["speedup_max"]) == pytest.approx((1.0 / 0.6, 2.4))  # paired by round
    assert (faster["latency_min_s"], faster["latency_max_s"]) == (0.5, 0.6)
    noisy = speed_row("noisy", Timing([0.8, 1.2, 0.8, 1.1, 1.0], None), baseline, 90.0, 100.0)
    assert noisy["speedup_min"] < 1 < noisy["speedup_max"] and noisy["speedup_verdict"] == "not significant"


def test_a_plan_that_changes_no_mac_is_a_no_op_with_speedup_one(caplog: pytest.LogCaptureFixture):
    baseline = Timing([1.6, 1.7, 1.6, 1.6, 1.7], None)
    lucky = Timing([1.0, 1.0, 1.1, 1.0, 1.0], None)  # timing noise that would read as 1.6x
    row = speed_row("stagevar", lucky, baseline, 100.0, 100.0)
    assert (row["speedup"], row["speedup_min"], row["speedup_max"]) == (1.0, 1.0, 1.0)
    assert row["speedup_verdict"] == "no-op" and row["mac_speedup"] == 1.0
    assert "NO-OP: stagevar" in caplog.text


def test_a_shapes_eval_delta_carries_the_standard_error_of_the_paired_difference():
    delta, error = paired_delta([True, True, False, False], [True, False, False, True])
    assert delta == 0.0 and error == pytest.approx(np.std([0, 1, 0, -1], ddof=1) / 2)
    assert paired_delta([True, False], [True, False]) == (0.0, 0.0)


def test_peak_memory_sees_what_a_call_allocates():
    with PeakMemory(torch.device("cpu")) as idle:
        pass
    with PeakMemory(torch.device("cpu")) as busy:
        np.ones(200 * 2**20 // 8).sum()  # 200 MiB, freed before the block ends
    assert busy.mib - idle.mib > 150


# ----------------------------------------------------------------------------------------------------------
# Methods, Pareto front


def test_accel_options_change_keys_and_reject_unknown_ones():
    assert accel_option("stagevar", {"rank_ratio": 0.1}).rank_ratio == 0.1
    with pytest.raises(UserError, match="has no key 'rank_ration'"):
        accel_option("stagevar", {"rank_ration": 0.1})
    with pytest.raises(UserError, match="does not exist; choose one of .*stagevar"):
        accel_option("stagevarr")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", ["experiment=accel_compare"])
    labels = [method.label for method in methods_from(cfg.accel_compare.methods)]
    assert {"cfg_drop", "stagevar", "fastvar", "skipvar"} <= set(labels)


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [ParetoPoint("base", 1.0, 0.80), ParetoPoint("a", 2.0, 0.80), ParetoPoint("b", 3.0, 0.70),
              ParetoPoint("c", 2.5, 0.60), ParetoPoint("d", 1.5, 0.85)]
    assert [p.label for p in pareto_front(points, higher_is_better=True)] == ["d", "a", "b"]
    assert [p.label for p in pareto_front(points, higher_is_better=False)] == ["c", "b"]  # e.g. a distance


def test_analytic_infinity_2b_speedups_follow_what_each_method_leaves_out():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", ["experiment=benchmark"])
    rows = infinity_2b_macs(methods_from(cfg.benchmark.methods), cfg.benchmark.infinity_2b)
    rows = {row["method"]: row for row in rows}
    assert rows["baseline"]["mac_speedup"] == 1.0
    # Dropping CFG halves the refinement scales, which hold most of the compute; low rank halves it again and more.
    assert 1.5 < rows["cfg_drop"]["mac_speedup"] < 2.0 < rows["stagevar"]["mac_speedup"]
    assert all(row["mac_speedup"] > 1 for name, row in rows.items() if name != "baseline")


FIVE_SCALES = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]


def five_scale_stages(folder: Path) -> Path:
    """A stages.json of a 5-scale tiny model: refinement from scale 3."""
    write_stages(folder / "stages.json", model="tiny", schedule=FIVE_SCALES, boundaries=StageBoundaries(1, 2, 3),
                 ranks={"per_scale": [1, 2, 4, 6, 8]}, rule=StageRule(), semantic_curves={}, structural_curves={},
                 num_prompts=1, code_version="test")
    return folder / "stages.json"


def test_benchmark_stages_file_sets_the_refinement_start_of_the_stage_aware_methods(tmp_path: Path):
    schedule = FIVE_SCALES
    five_scale_stages(tmp_path)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", ["experiment=benchmark", f"benchmark.stages_file={tmp_path / 'stages.json'}"])
    spec = ModelSpec("tiny", schedule, depth=2)
    policies = {method.label: build_policy(method.accel, spec) for method in methods_from(cfg.benchmark.methods)}
    assert policies["cfg_drop"].refinement_start == policies["stagevar"].refinement_start == 3  # the probe's
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        default = compose("config", ["experiment=benchmark"])
    policies = {method.label: build_policy(method.accel, spec) for method in methods_from(default.benchmark.methods)}
    assert policies["cfg_drop"].refinement_start == len(schedule) - 3  # the paper's last 3


def stages_without_refinement(folder: Path) -> Path:
    """A stages.json of the small checkpoint whose probe found no refinement stage (as the default model's does)."""
    schedule = [[side, side] for side in CHECKPOINT_CONFIG["schedule"]]
    path = folder / "stages.json"
    write_stages(path, model="tiny", schedule=schedule, boundaries=StageBoundaries(1, 2, len(schedule)),
                 ranks={"per_scale": [1] * len(schedule)}, rule=StageRule(), semantic_curves={}, structural_curves={},
                 num_prompts=1, code_version="test")
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experiment=accel_compare", "accel_compare.methods=[{label: s, accel: skipvar, overrides: {skip_last: 0}}]"],
         "s (conf/accel/skipvar.yaml) is a no-op: its plan runs every scale as the baseline does"),
        (["experiment=accel_eval", "accel=cfg_drop", "model.sampling.cfg=1"],
         "model.sampling.cfg=1 runs no second CFG"),
        (["experiment=accel_eval", "accel.refinement_start=4"],
         "set accel.refinement_start to a scale of the schedule"),
        (["experiment=accel_compare",
          "accel_compare.methods=[{label: probed, accel: cfg_drop, overrides: {stages_file: 'STAGES'}}]"],
         "set stages_file in the overrides of method probed to a stages.json"),
    ],
)
def test_every_kind_of_no_op_policy_is_refused_with_its_reason_and_fix(
    checkpoint: Path, tmp_path: Path, overrides: list[str], message: str
):
    overrides = [override.replace("STAGES", str(stages_without_refinement(tmp_path))) for override in overrides]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", [*overrides, f"model.checkpoint_dir={checkpoint}"])
        allowed = compose("config", [*overrides, f"model.checkpoint_dir={checkpoint}", "accel.allow_noop=true"])
    settings = cfg[cfg.task]
    methods = methods_from(settings.methods) if "methods" in settings else [Method(cfg.accel.name, cfg.accel)]
    with pytest.raises(UserError, match=re.escape(message)):
        check_policies(cfg, methods)
    check_policies(allowed, methods)


def test_a_no_op_policy_stops_accel_eval_before_anything_runs(capsys, checkpoint: Path, tmp_path: Path):
    # Before: "changes nothing" in the log, then the whole evaluation (28 minutes on the default model) for 1.000x.
    stages = stages_without_refinement(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_py("experiment=accel_eval", *quick_overrides(checkpoint, tmp_path / "outputs"),
               f"accel.stages_file={stages}")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: stagevar (conf/accel/stagevar.yaml) is a no-op")
    assert f"the stages file {stages} has no refinement stage (refinement_start=4 of 4 scales)" in err
    assert "set accel.stages_file to a stages.json of tiny" in err and "accel.allow_noop=true" in err
    assert not list((tmp_path / "outputs").rglob("*"))  # no run folder


# ----------------------------------------------------------------------------------------------------------
# End to end through run.py


def test_accel_compare_tabulates_every_method_against_the_baseline(checkpoint: Path, tmp_path: Path):
    run_py("experiment=accel_compare", *quick_overrides(checkpoint, tmp_path), "accel_compare.fid=false",
           "accel_compare.methods=[{label: stagevar, accel: stagevar},"
           " {label: skipvar, accel: skipvar, overrides: {skip_last: 2}}]")
    (run_dir,) = (tmp_path / "accel_compare").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete"
    methods = {row["method"]: row for row in summary["methods"]}
    assert list(methods) == ["baseline", "stagevar", "skipvar"]
    assert methods["baseline"]["speedup"] == 1.0 and methods["skipvar"]["accel"]["skip_last"] == 2
    for row in methods.values():
        assert row["latency_s"] > 0 and row["mac_speedup"] >= 1 and 0 <= row["shapes_eval"] <= 1
    assert methods["baseline"]["ssim"] == pytest.approx(1) and 0 < methods["skipvar"]["ssim"] < 1  # vs the baseline

    table = (run_dir / "tables" / "accel_compare.csv").read_text().splitlines()
    assert table[0].startswith("method,latency (s),latency min-max,speedup,speedup min-max,verdict,MAC speedup")
    assert [line.split(",")[0] for line in table[1:]] == ["baseline", "stagevar", "skipvar"]
    assert "median of 5 interleaved repeats" in (run_dir / "run.log").read_text()  # the printed table is logged
    rows = read_rows(run_dir)
    assert sum(row["kind"] == "timing" for row in rows) == 3 * 5  # every method, every timed repeat
    assert {(row["method"], row["index"]) for row in rows if row["kind"] == "image"} == {
        (method, index) for method in methods for index in (0, 56, 112, 168)  # one per category
    }
    assert (run_dir / "figures" / "pareto.png").is_file() and (run_dir / "figures" / "samples.png").is_file()


def sweep_jobs(sweep_dir: Path) -> dict[float, Path]:
    """Job folders of a sweep by rank ratio (a folder is named by its overrides, paths included)."""
    summaries = {path.parent: json.loads(path.read_text()) for path in sweep_dir.rglob("summary.json")}
    return {summary["methods"][1]["accel"]["rank_ratio"]: folder for folder, summary in summaries.items()}


def test_a_relaunched_sweep_runs_only_what_is_missing_and_aggregates_every_job(checkpoint: Path, tmp_path: Path):
    sweep = ["experiment=rank_sweep", *quick_overrides(checkpoint, tmp_path), "accel_eval.fid=false",
             "rank_sweep.name=test"]
    run_py("-m", *sweep, "accel.rank_ratio=0.25,0.5")
    sweep_dir = tmp_path / "rank_sweep" / "test"
    finished, failed = sweep_jobs(sweep_dir)[0.5], sweep_jobs(sweep_dir)[0.25]
    rows_before = read_rows(finished)
    summary = json.loads((failed / "summary.json").read_text())
    (failed / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    with (failed / "results.jsonl").open("a") as results:
        results.write('{"kind": "left over"}\n')

    run_py("-m", *sweep, "accel.rank_ratio=0.25,0.5,0.75")
    jobs = sweep_jobs(sweep_dir)
    assert sorted(jobs) == [0.25, 0.5, 0.75] and jobs[0.5] == finished
    assert read_rows(finished) == rows_before  # kept, not run again
    assert json.loads((failed / "summary.json").read_text())["status"] == "complete"  # continued in its folder
    assert {"kind": "left over"} not in read_rows(failed)

    run_py("experiment=rank_sweep", f"paths.output_root={tmp_path}", "rank_sweep.name=test",
           "rank_sweep.aggregate=true", "logger=none")
    (aggregate_dir,) = [path.parent for path in (tmp_path / "rank_sweep").glob("*/summary.json")]
    summary = json.loads((aggregate_dir / "summary.json").read_text())
    assert [job["rank_ratio"] for job in summary["jobs"]] == [0.25, 0.5, 0.75]
    with (aggregate_dir / "tables" / "rank_sweep.csv").open() as table:
        labels = [row[0] for row in csv.reader(table)][1:]
    assert labels == ["baseline"] + [f"r/M={r} from scale -3" for r in (0.25, 0.5, 0.75)]
    assert (aggregate_dir / "figures" / "pareto.png").is_file()


def test_aggregating_an_empty_sweep_says_how_to_run_it(tmp_path: Path):
    with pytest.raises(SystemExit) as exit_info:
        run_py("experiment=rank_sweep", f"paths.output_root={tmp_path}", "rank_sweep.aggregate=true", "logger=none")
    assert exit_info.value.code == 2


def test_accel_decompose_times_every_component_and_draws_where_the_speedup_comes_from(checkpoint: Path, tmp_path: Path):
    run_py("experiment=accel_decompose", *quick_overrides(checkpoint, tmp_path), "accel_decompose.fid=false",
           "accel_decompose.methods=[{label: skip2, accel: stagevar_released, overrides: {cfg_drop_last: 0, reduce_last: 0}},"
           " {label: released, accel: stagevar_released}]", "accel_decompose.chain=[skip2, released]")
    (run_dir,) = (tmp_path / "accel_decompose").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["method"] for row in summary["methods"]] == ["baseline", "skip2", "released"]
    by_method = {row["method"]: row for row in summary["infinity_2b_macs"]}
    assert by_method["skip2"]["mac_speedup"] == pytest.approx(3.14, abs=0.01)  # the release's skip alone, on 2B
    assert by_method["released"]["mac_speedup"] > by_method["skip2"]["mac_speedup"]
    assert (run_dir / "figures" / "speedup_sources.png").is_file()
    assert (run_dir / "tables" / "infinity_2b_macs.csv").is_file()


def test_analytic_tables_of_other_models_ignore_a_stages_file_of_the_probed_one(tmp_path: Path):
    # A stages.json names its model and schedule; the Infinity-2B and VAR tables used to hand it to the policies of
    # a model it does not describe, so `benchmark.stages_file=...` failed before any compute.
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", ["experiment=benchmark", f"benchmark.stages_file={five_scale_stages(tmp_path)}"])
    methods = methods_from(cfg.benchmark.methods)
    on_2b = {row["method"]: row["mac_speedup"] for row in infinity_2b_macs(methods, cfg.benchmark.infinity_2b)}
    on_var = {row["method"]: row["mac_speedup"] for row in release_macs(methods, ["var_d30"])
              if row["model"] == "var_d30"}
    assert on_2b["stagevar"] > 2 and on_var["stagevar"] > 1.5 and on_var["stagevar_released"] > on_var["cfg_drop"]
