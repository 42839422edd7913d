"""A run killed mid-way and continued with resume=<run folder> gives the results of an uninterrupted run, no row
twice and none missing; a run continued with other settings is refused."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_py, write_small_checkpoint

GENERATE = ["experiment=generate", "model.batch_size=1", "prompts.limit=4", "logger=none"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """The overrides of a small generate run (4 prompts, one per batch) and its finished folder."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    overrides = [*GENERATE, f"model.checkpoint_dir={write_small_checkpoint(tmp / 'checkpoint')}",
                 f"paths.output_root={tmp}"]
    run_py(*overrides)
    (run_dir,) = (tmp / "generate").iterdir()
    return overrides, run_dir


def killed_during_the_third_row(finished: Path, into: Path) -> Path:
    """What a run killed while writing its third row leaves: two whole rows and half a line in its rows file, the
    third image written (its row is not), no fourth image, no summary, figures or tables."""
    run_dir = Path(shutil.copytree(finished, into))
    rows = (run_dir / "results.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "results.rank0.jsonl").write_text(rows[0] + rows[1] + rows[2][:15])
    (run_dir / "results.jsonl").unlink()
    sorted((run_dir / "images").iterdir())[3].unlink()
    for produced_last in ("figures", "tables"):
        shutil.rmtree(run_dir / produced_last)
    (run_dir / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    return run_dir


def test_a_killed_run_continues_to_the_results_of_an_uninterrupted_one(uninterrupted, tmp_path: Path):
    overrides, finished = uninterrupted
    run_dir = killed_during_the_third_row(finished, tmp_path / "killed")
    kept = {path.name: path.stat().st_mtime_ns for path in sorted((run_dir / "images").iterdir())[:2]}

    run_py(*overrides, f"resume={run_dir}")
    assert (run_dir / "results.jsonl").read_text() == (finished / "results.jsonl").read_text()  # every row once
    assert not list(run_dir.glob("results.rank*.jsonl"))
    for image in (finished / "images").iterdir():
        assert (run_dir / "images" / image.name).read_bytes() == image.read_bytes()
    assert {name: (run_dir / "images" / name).stat().st_mtime_ns for name in kept} == kept  # not made again
    summary, reference = (json.loads((folder / "summary.json").read_text()) for folder in (run_dir, finished))
    assert summary["status"] == "complete"
    assert (summary["shapes_eval"], summary["fid_vs_world"]) == (reference["shapes_eval"], reference["fid_vs_world"])
    assert (run_dir / "figures" / "contact_sheet.png").is_file()


def test_a_run_from_before_a_new_config_key_continues_with_that_key_at_its_preset_value(uninterrupted, tmp_path: Path):
    overrides, finished = uninterrupted
    run_dir = killed_during_the_third_row(finished, tmp_path / "killed")
    saved = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(saved.replace("  allow_noop: false\n", ""))  # a run from before that key
    assert (run_dir / "config.yaml").read_text() != saved
    run_py(*overrides, f"resume={run_dir}")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "complete"


def test_a_run_continued_with_other_settings_is_refused(uninterrupted, tmp_path: Path, capsys):
    overrides, finished = uninterrupted
    run_dir = killed_during_the_third_row(finished, tmp_path / "killed")
    with pytest.raises(SystemExit) as stop:
        run_py(*overrides, "seed=1", f"resume={run_dir}")
    assert stop.value.code == 2
    assert "seed=0 there, 1 now" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_py(*overrides, f"resume={tmp_path / 'nowhere'}")
    assert "is not a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_py("experiment=world_preview", "logger=none", f"resume={run_dir}")
    assert "world_preview cannot continue a run" in capsys.readouterr().err
