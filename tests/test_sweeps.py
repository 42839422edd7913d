"""Sweeps through hydra-submitit-launcher: a 2-job rank sweep as local submitit jobs completes and aggregates, a
relaunch runs only the unfinished job and leaves a finished job's folder byte for byte as it was; a SLURM launcher
without sbatch stops before submitting anything; an interrupted sweep says where it stands, and the same command
finds its folder again and runs only what did not finish."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from experiments import world_preview
from helpers import quick_overrides, run_py, write_small_checkpoint
from hydra_plugins.stagevar_sweeper.skip_finished_sweeper import sweep_folder_name

REPO = Path(__file__).resolve().parents[1]


def jobs_by_rank_ratio(sweep_dir: Path) -> dict[float, Path]:
    summaries = {path.parent: json.loads(path.read_text()) for path in sweep_dir.rglob("summary.json")}
    return {summary["methods"][1]["accel"]["rank_ratio"]: folder for folder, summary in summaries.items()}


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under a folder (hidden ones too): its content hash and modification time."""
    return {str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_relaunched_submitit_sweep_runs_only_the_unfinished_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)  # the job processes import run.py from here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two jobs at once on the test machine's cores
    sweep = ["-m", "experiment=rank_sweep", "hydra/launcher=local",
             *quick_overrides(write_small_checkpoint(tmp_path / "checkpoint"), tmp_path), "accel_eval.fid=false",
             "rank_sweep.name=test", "accel.rank_ratio=0.25,0.5"]
    run_py(*sweep)
    sweep_dir = tmp_path / "rank_sweep" / "test"
    jobs = jobs_by_rank_ratio(sweep_dir)
    assert sorted(jobs) == [0.25, 0.5] and len(list(sweep_dir.glob(".submitit/*/*_result.pkl"))) == 2  # two local jobs
    finished, unfinished = jobs[0.5], jobs[0.25]
    summary = json.loads((unfinished / "summary.json").read_text())
    (unfinished / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    before = snapshot(finished)

    run_py(*sweep)
    assert snapshot(finished) == before  # summary.json, config.yaml, .hydra, run.log: nothing rewritten
    assert json.loads((unfinished / "summary.json").read_text())["status"] == "complete"
    assert len(list(sweep_dir.glob(".submitit/*/*_result.pkl"))) == 3  # one more job: the unfinished one

    run_py("experiment=rank_sweep", f"paths.output_root={tmp_path}", "rank_sweep.name=test",
           "rank_sweep.aggregate=true", "logger=none")
    (aggregate_dir,) = [path.parent for path in (tmp_path / "rank_sweep").glob("*/summary.json")]
    aggregated = json.loads((aggregate_dir / "summary.json").read_text())
    assert [job["rank_ratio"] for job in aggregated["jobs"]] == [0.25, 0.5]


def test_a_slurm_sweep_without_sbatch_stops_before_submitting_anything(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "no_slurm_here"))
    with pytest.raises(SystemExit) as stop:
        run_py("-m", "experiment=world_preview", "hydra/launcher=slurm", f"paths.output_root={tmp_path}",
               "logger=none", "seed=0,1")
    assert stop.value.code == 2
    assert "sbatch" in capsys.readouterr().err
    assert not (tmp_path / "world_preview").exists()  # no sweep folder, no .submitit


def test_an_interrupted_sweep_resumes_with_the_same_command(tmp_path: Path, monkeypatch, capsys):
    run = world_preview.run
    runs = []  # the seeds of the jobs that ran

    def interrupted_at_seed_1(cfg, recorder):
        runs.append(cfg.seed)
        if runs == [0, 1]:
            raise KeyboardInterrupt  # Ctrl-C during the second job of the first launch
        return run(cfg, recorder)

    monkeypatch.setattr(world_preview, "run", interrupted_at_seed_1)
    sweep = ["-m", "experiment=world_preview", f"paths.output_root={tmp_path}", "logger=none", "seed=0,1,2",
             "preview.num_images=1", "preview.grid_columns=1", "prompts.limit=1"]
    with pytest.raises(SystemExit) as stop:
        run_py(*sweep)
    assert stop.value.code == 130
    (sweep_dir,) = (tmp_path / "world_preview" / "multirun").iterdir()
    assert sweep_dir.name == "logger=none__preview.grid_columns=1__preview.num_images=1__prompts.limit=1__seed=0,1,2"
    message = capsys.readouterr().err
    assert f"sweep {sweep_dir}: 1 job(s) finished (" in message and "seed=0)" in message  # the job folder's name
    assert message.rstrip().endswith(f"run the same command again: python run.py {' '.join(sweep)}")
    (finished,) = [path.parent for path in sweep_dir.glob("*/summary.json") if "seed=0" in path.parent.name]
    before = snapshot(finished)

    runs.clear()
    run_py(*sweep)  # the identical command
    assert runs == [1, 2]  # the unfinished jobs, once each
    assert list((tmp_path / "world_preview" / "multirun").iterdir()) == [sweep_dir]  # found again, no new folder
    assert snapshot(finished) == before
    assert [json.loads(path.read_text())["status"] for path in sorted(sweep_dir.glob("*/summary.json"))] == \
        ["complete"] * 3


def test_a_sweep_folder_is_named_by_its_overrides_in_any_order():
    name = sweep_folder_name(["seed=0,1", "experiment=world_preview", "prompts.limit=2", "paths.output_root=/out"],
                             task="world_preview")
    assert name == "prompts.limit=2__seed=0,1"  # the task and the output root are in its path already
    assert sweep_folder_name(["prompts.limit=2", "seed=0,1"], task="world_preview") == name
    assert sweep_folder_name(["experiment=world_preview"], task="world_preview") == "no_overrides"
    # Two presets of one task (train_tiny, train_tiny_gpu) share <task>/multirun/, so the preset stays in the name.
    gpu = sweep_folder_name(["experiment=train_tiny_gpu", "seed=0,1"], task="train_tiny")
    assert gpu == "experiment=train_tiny_gpu__seed=0,1" != sweep_folder_name(["experiment=train_tiny", "seed=0,1"],
                                                                              task="train_tiny")
    unsafe = sweep_folder_name(["prompts.path=data/a b.jsonl"], task="generate")
    assert re.fullmatch(r"prompts\.path=data_a_b\.jsonl-[0-9a-f]{8}", unsafe)  # replaced characters: hashed
    assert unsafe != sweep_folder_name(["prompts.path=data_a_b.jsonl"], task="generate")
    long = sweep_folder_name([f"accel.rank_ratio={','.join(str(i / 100) for i in range(40))}"], task="rank_sweep")
    other = sweep_folder_name([f"accel.rank_ratio={','.join(str(i) for i in range(40))}"], task="rank_sweep")
    assert len(long) == 120 and long != other
