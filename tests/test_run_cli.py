"""run.py end to end, as a user calls it: run folders, W&B offline files, and the error messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
SMALL_PREVIEW = ["experiment=world_preview", "preview.num_images=2", "preview.grid_columns=2", "prompts.limit=3"]


def start_run(*overrides: str, output_root: Path) -> subprocess.Popen:
    # Without the test session's WANDB_MODE, as from a user's shell: the config alone picks the W&B mode.
    env = {key: value for key, value in os.environ.items() if key != "WANDB_MODE"}
    return subprocess.Popen(
        [sys.executable, "run.py", *overrides, f"paths.output_root={output_root}"],  # flags such as -m come first
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_folders(output_root: Path) -> list[Path]:
    return sorted(path.parent for path in output_root.glob("world_preview/*/config.yaml"))


@pytest.fixture(scope="module")
def runs_started_together(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small previews launched at the same moment: default logger (W&B offline) and logger=none.

    Returns each run's folder by logger.
    """
    output_root = tmp_path_factory.mktemp("outputs")
    processes = [
        start_run(*SMALL_PREVIEW, "seed=0", output_root=output_root),
        start_run(*SMALL_PREVIEW, "seed=1", "logger=none", output_root=output_root),
    ]
    for result in map(wait, processes):
        assert result.returncode == 0, result.stderr
    return {OmegaConf.load(folder / "config.yaml").logger.name: folder for folder in run_folders(output_root)}


def test_runs_started_together_get_their_own_folders(runs_started_together: dict[str, Path]):
    assert sorted(runs_started_together) == ["none", "wandb"]  # two folders, each with its own config
    assert OmegaConf.load(runs_started_together["none"] / "config.yaml").seed == 1


@pytest.mark.parametrize("logger", ["wandb", "none"])
def test_run_folder_holds_the_record_of_a_complete_run(runs_started_together: dict[str, Path], logger: str):
    folder = runs_started_together[logger]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert 0 <= summary["overall"] <= 1 and summary["per_category"]
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 56, 112]  # prompts.limit=3: one prompt of each of 3 categories
    assert {"tag", "prompt", "passed"} <= rows[0].keys()
    assert (folder / "figures" / "world_grid.png").is_file()
    assert len(list((folder / "images").glob("*.png"))) == 2
    assert (folder / "tables" / "shapes_eval_ground_truth.csv").is_file()
    assert (folder / ".hydra" / "overrides.yaml").is_file()
    config = OmegaConf.load(folder / "config.yaml")
    assert config.device in ("cpu", "cuda") and Path(config.paths.weights_dir).is_absolute()  # settled


def test_default_logger_keeps_offline_wandb_files_in_the_run_folder(runs_started_together: dict[str, Path]):
    (offline_run,) = (runs_started_together["wandb"] / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))  # what `wandb sync` uploads
    assert not (runs_started_together["none"] / "wandb").exists()


def test_w_and_b_says_one_line_of_ours_unless_verbose(tmp_path: Path):
    quiet = wait(start_run(*SMALL_PREVIEW, output_root=tmp_path / "quiet"))
    assert quiet.returncode == 0 and "wandb:" not in quiet.stdout + quiet.stderr
    (folder,) = run_folders(tmp_path / "quiet")
    assert "W&B: offline run in" in (folder / "run.log").read_text()
    verbose = wait(start_run(*SMALL_PREVIEW, "logger.verbose=true", output_root=tmp_path / "verbose"))
    assert verbose.returncode == 0 and "wandb:" in verbose.stdout + verbose.stderr  # W&B's own banner


def test_missing_geneval_file_is_a_short_error_naming_the_key(tmp_path: Path):
    missing = "missing/evaluation_metadata.jsonl"
    result = wait(start_run(*SMALL_PREVIEW, "logger=none", "prompts=geneval", f"prompts.path={missing}", output_root=tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: prompts.path='{missing}'")
    assert "Traceback" not in result.stderr
    assert not run_folders(tmp_path)  # checked before the run folder was made


def test_a_multirun_job_with_a_path_override_gets_one_folder(tmp_path: Path):
    # Job folders are named by their overrides; the slashes of a path value must not nest folders.
    suite = tmp_path / "prompts" / "suite.jsonl"
    suite.parent.mkdir()
    suite.write_text("".join((REPO / "evals/data/shapes_eval_metadata.jsonl").read_text().splitlines(True)[:3]))
    result = wait(start_run("-m", *SMALL_PREVIEW, "logger=none", f"prompts.path={suite}", output_root=tmp_path))
    assert result.returncode == 0, result.stderr
    configs = list((tmp_path / "world_preview" / "multirun").rglob("config.yaml"))
    job_configs = [path for path in configs if path.parent.name != ".hydra"]
    assert len(job_configs) == 1
    sweep_dir = job_configs[0].parents[1]
    assert sweep_dir.parent == tmp_path / "world_preview" / "multirun"
    assert job_configs[0].parent.name.endswith(f"prompts.path={str(suite).replace('/', '_')}")
