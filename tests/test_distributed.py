"""One run over several processes (torchrun, gloo on the CPU): the same images, rows and scores as one process;
more processes than batches is fine and said once; a failing process fails the run with its error shown once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_py, write_small_checkpoint

REPO = Path(__file__).resolve().parents[1]


def generate_overrides(checkpoint: Path, output_root: Path, prompts: int) -> list[str]:
    """generate on the small checkpoint, one prompt per batch, so that the processes interleave their batches."""
    return ["experiment=generate", f"model.checkpoint_dir={checkpoint}", f"paths.output_root={output_root}",
            "model.batch_size=1", f"prompts.limit={prompts}", "logger=none", "device=cpu"]


def torchrun(processes: int, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "run.py", *overrides]
    return subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


def only_run(output_root: Path) -> Path:
    (run_dir,) = (output_root / "generate").iterdir()  # one folder, whatever the number of processes
    return run_dir


def images(run_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((run_dir / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_checkpoint(tmp_path_factory.mktemp("small_checkpoint"))


@pytest.fixture(scope="module")
def one_process(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_root = tmp_path_factory.mktemp("one_process")
    run_py(*generate_overrides(checkpoint, output_root, prompts=4))
    return only_run(output_root)


def test_two_processes_write_the_images_rows_and_scores_of_one(checkpoint: Path, one_process: Path, tmp_path: Path):
    result = torchrun(2, *generate_overrides(checkpoint, tmp_path, prompts=4))
    assert result.returncode == 0, result.stderr
    run_dir = only_run(tmp_path)
    assert images(run_dir) == images(one_process) and len(images(run_dir)) == 4  # byte for byte
    assert (run_dir / "results.jsonl").read_bytes() == (one_process / "results.jsonl").read_bytes()
    summary, reference = (json.loads((folder / "summary.json").read_text()) for folder in (run_dir, one_process))
    assert summary["status"] == "complete"
    assert (summary["shapes_eval"], summary["fid_vs_world"]) == (reference["shapes_eval"], reference["fid_vs_world"])
    assert not list(run_dir.glob("results.rank*.jsonl"))  # merged


def test_more_processes_than_batches_leave_some_idle_and_say_so_once(checkpoint: Path, tmp_path: Path):
    result = torchrun(3, *generate_overrides(checkpoint, tmp_path, prompts=2), "generate.fid=false")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count("3 processes for 2 batches") == 1 and "rank 2 has nothing to do" in output
    assert len(images(only_run(tmp_path))) == 2


def test_a_failing_process_fails_the_run_with_its_error_shown_once(checkpoint: Path, one_process: Path,
                                                                  tmp_path: Path):
    # Continue a finished run whose second image (batch 1, rank 1's) cannot be written: only rank 1 fails.
    run_dir = Path(shutil.copytree(one_process, tmp_path / "run"))
    second = sorted((run_dir / "images").iterdir())[1]
    second.unlink()
    second.mkdir()
    result = torchrun(2, *generate_overrides(checkpoint, tmp_path, prompts=4), f"resume={run_dir}")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("IsADirectoryError") == 1 and "rank 1 failed:" in output  # rank 0 prints it, once
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("RankFailed: rank 1: IsADirectoryError")


def test_a_command_line_mistake_under_torchrun_is_said_once(tmp_path: Path):
    result = torchrun(2, "experiment=world_preview", "preview.num_image=3", f"paths.output_root={tmp_path}")
    assert result.returncode != 0
    assert result.stderr.count("error: preview.num_image is not a config key; did you mean preview.num_images?") == 1
    assert not list(tmp_path.iterdir())  # (torchrun itself reports the exit code with its own traceback)


def test_two_processes_probe_the_stages_of_one(checkpoint: Path, tmp_path: Path):
    probe = ["experiment=stage_probe", f"model.checkpoint_dir={checkpoint}", "probe.num_prompts=3",
             "probe.batch_size=1", "probe.strip_prompts=2", "metrics.names=[shapes_composition,shapes_eval]", "logger=none",
             "device=cpu"]
    run_py(*probe, f"paths.output_root={tmp_path / 'one'}")
    result = torchrun(2, *probe, f"paths.output_root={tmp_path / 'two'}")
    assert result.returncode == 0, result.stderr
    (one,), (two,) = ((tmp_path / count / "stage_probe").iterdir() for count in ("one", "two"))
    for produced in ("results.jsonl", "spectra.json", "stages.json"):  # rows in prompt order, sums in batch order
        assert (two / produced).read_bytes() == (one / produced).read_bytes(), produced
    assert sorted(path.name for path in (two / "images" / "strip").iterdir()) == sorted(
        path.name for path in (one / "images" / "strip").iterdir())


def test_two_processes_score_the_methods_of_one_and_time_on_rank_0(checkpoint: Path, tmp_path: Path):
    evaluation = ["experiment=accel_eval", f"model.checkpoint_dir={checkpoint}", "model.batch_size=1",
                  "prompts.limit=3", "metrics.names=[ssim]", "accel_eval.fid=false", "logger=none", "device=cpu"]
    run_py(*evaluation, f"paths.output_root={tmp_path / 'one'}")
    result = torchrun(2, *evaluation, f"paths.output_root={tmp_path / 'two'}")
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("TIMING ON RANK 0 ALONE") == 1
    (one,), (two,) = ((tmp_path / count / "accel_eval").iterdir() for count in ("one", "two"))
    for method in ("baseline", "stagevar"):
        assert {path.name: path.read_bytes() for path in (two / "images" / method).iterdir()} == {
            path.name: path.read_bytes() for path in (one / "images" / method).iterdir()}

    def quality(run_dir: Path) -> tuple[list, list]:
        rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
        methods = json.loads((run_dir / "summary.json").read_text())["methods"]
        return ([row for row in rows if row["kind"] == "image"],
                [{key: row[key] for key in ("method", "shapes_eval", "shapes_eval_delta", "ssim")} for row in methods])

    assert quality(two) == quality(one)
