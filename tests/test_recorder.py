"""RunRecorder: what a run folder holds after a finished, failed or interrupted run."""

import contextlib
import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from errors import UserError
from experiments.recorder import RunRecorder, format_table


def make_cfg(**logger) -> DictConfig:
    return OmegaConf.create({"task": "unit", "seed": 3, "derived": "${seed}", "logger": logger or {"name": "none"}})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_complete_run_leaves_config_rows_and_summary(tmp_path: Path):
    with RunRecorder(make_cfg(), tmp_path) as recorder:
        recorder.log({"index": 0, "score": np.float32(0.5), "passed": np.bool_(True)})
        recorder.log({"index": 1, "score": 0.25, "passed": False})
        recorder.finish({"overall": 0.375})

    assert OmegaConf.load(tmp_path / "config.yaml").derived == 3  # saved resolved
    assert read_jsonl(tmp_path / "results.jsonl") == [
        {"index": 0, "score": 0.5, "passed": True},
        {"index": 1, "score": 0.25, "passed": False},
    ]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["overall"] == 0.375
    assert summary["task"] == "unit"
    assert summary["duration_s"] >= 0


def test_rows_are_on_disk_before_the_run_ends(tmp_path: Path):
    with RunRecorder(make_cfg(), tmp_path) as recorder:
        recorder.log({"index": 0})
        assert read_jsonl(tmp_path / "results.jsonl") == [{"index": 0}]
        recorder.finish({})


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError("boom"), "failed"), (KeyboardInterrupt(), "interrupted")]
)
def test_unfinished_run_never_looks_complete(tmp_path: Path, error: BaseException, status: str):
    with pytest.raises(type(error)):
        with RunRecorder(make_cfg(), tmp_path) as recorder:
            recorder.log({"index": 0})
            raise error

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == status
    assert type(error).__name__ in summary["error"]
    assert read_jsonl(tmp_path / "results.jsonl") == [{"index": 0}]  # finished work is kept
    assert not (tmp_path / "summary.json.tmp").exists()


def test_summary_cannot_overwrite_the_status(tmp_path: Path):
    with pytest.raises(ValueError, match="status"):
        with RunRecorder(make_cfg(), tmp_path) as recorder:
            recorder.finish({"status": "complete"})
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_figures_images_and_tables_land_in_the_run_folder(tmp_path: Path):
    with RunRecorder(make_cfg(), tmp_path) as recorder:
        fig, axis = plt.subplots()
        axis.plot([0, 1], [1, 0])
        figure_path = recorder.save_figure(fig, "line")
        image_paths = recorder.save_images(np.zeros((2, 8, 6, 3), np.uint8), ["a", "b"], subdir="samples")
        text = recorder.log_table("scores", ["tag", "accuracy"], [["colors", 0.5], ["position", 1.0]])
        recorder.finish({})

    assert figure_path == tmp_path / "figures" / "line.png" and figure_path.is_file()
    assert not plt.fignum_exists(fig.number)  # closed, so long experiments do not pile up figures
    assert image_paths == [tmp_path / "samples" / "a.png", tmp_path / "samples" / "b.png"]
    assert Image.open(image_paths[0]).size == (6, 8)
    with (tmp_path / "tables" / "scores.csv").open() as table:
        assert list(csv.reader(table)) == [["tag", "accuracy"], ["colors", "0.5"], ["position", "1.0"]]
    assert "| colors   | 0.5000   |" in text


def test_bad_images_and_rows_are_refused(tmp_path: Path):
    with RunRecorder(make_cfg(), tmp_path) as recorder:
        with pytest.raises(ValueError, match="uint8"):
            recorder.save_images(np.zeros((1, 4, 4, 3), np.float32), ["float"])
        with pytest.raises(ValueError, match="2 names"):
            recorder.save_images(np.zeros((1, 4, 4, 3), np.uint8), ["a", "b"])
        with pytest.raises(ValueError, match="columns"):
            recorder.log_table("short_row", ["a", "b"], [[1]])
        recorder.finish({})


def test_format_table_aligns_columns():
    rows = [["long name", 0.123456], ["b", 2], ["c", 1.0], ["d", np.float32(0.25)]]
    assert format_table(["name", "x"], rows).splitlines() == [
        "| name      | x      |",
        "|-----------|--------|",
        "| long name | 0.1235 |",
        "| b         | 2      |",
        "| c         | 1.000  |",
        "| d         | 0.2500 |",
    ]


def test_online_wandb_that_fails_to_start_falls_back_to_offline(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: online W&B has no key and refuses to start
    cfg = make_cfg(name="wandb", mode="online", project="stagevar-test", entity=None, tags=[])
    with RunRecorder(cfg, tmp_path / "run") as recorder:
        recorder.finish({"overall": 0.5})
    assert "W&B ONLINE FAILED" in caplog.text
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "complete"


def test_offline_wandb_keeps_its_files_in_the_run_folder(tmp_path: Path):
    cfg = make_cfg(name="wandb", mode="offline", project="stagevar-test", entity=None, tags=["unit"])
    with RunRecorder(cfg, tmp_path) as recorder:
        recorder.log({"index": 0, "score": 0.5})
        recorder.save_images(np.zeros((1, 4, 4, 3), np.uint8), ["black"])
        recorder.finish({"overall": 0.5})

    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("run-*.wandb"))  # the file `wandb sync` uploads
    assert list(offline_runs[0].glob("files/media/images/**/*.png"))


@pytest.mark.parametrize("outcome", ["complete", "failed"])
def test_a_failed_run_leaves_no_offline_wandb_run_and_no_upload_hint(tmp_path: Path, caplog, outcome: str):
    cfg = make_cfg(name="wandb", mode="offline", project="stagevar-test", entity=None, tags=[])
    with caplog.at_level("INFO"), contextlib.suppress(RuntimeError):
        with RunRecorder(cfg, tmp_path) as recorder:
            recorder.log({"index": 0, "score": 0.5})
            if outcome == "failed":
                raise RuntimeError("bad weights")
            recorder.finish({})
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == outcome
    if outcome == "failed":
        assert not (tmp_path / "wandb").exists() and "wandb sync" not in caplog.text
    else:
        (offline_run,) = (tmp_path / "wandb").glob("offline-run-*")
        assert f"wandb sync {offline_run}" in caplog.text


def test_an_error_while_the_run_starts_marks_its_folder_failed(tmp_path: Path):
    (tmp_path / "results.jsonl").write_text("not json\n")  # an earlier attempt's rows, damaged
    with pytest.raises(UserError, match="line 1: not a JSON row"):
        with RunRecorder(make_cfg(), tmp_path, resumable=True):
            pass
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_without_wandb_installed_logger_none_still_records(tmp_path: Path):
    # The GPU machine's image has no wandb: runs with logger=none must not need it.
    script = (
        "import sys; sys.modules['wandb'] = None\n"
        "from omegaconf import OmegaConf\n"
        "from experiments.recorder import RunRecorder\n"
        "cfg = OmegaConf.create({'task': 'unit', 'logger': {'name': 'none'}})\n"
        f"with RunRecorder(cfg, {str(tmp_path)!r}) as recorder:\n"
        "    recorder.finish({'overall': 1.0})\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], check=True)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "complete"
