"""notebooks/paper_figures.ipynb runs on the run folders of a quick accel_compare and a quick rank sweep."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import quick_overrides, run_py, write_small_checkpoint

REPO = Path(__file__).resolve().parents[1]


def newest(folder: Path) -> Path:
    return max(path.parent for path in folder.glob("*/summary.json"))


def test_the_notebook_draws_table_1_and_the_rank_ablation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    quick = quick_overrides(write_small_checkpoint(tmp_path / "checkpoint"), tmp_path)
    run_py("experiment=accel_compare", *quick, "accel_compare.fid=false",
           "accel_compare.methods=[{label: stagevar, accel: stagevar}, {label: skipvar, accel: skipvar}]")
    run_py("-m", "experiment=rank_sweep", *quick, "accel_eval.fid=false", "accel.rank_ratio=0.25,0.5")
    run_py("experiment=rank_sweep", f"paths.output_root={tmp_path}", "rank_sweep.aggregate=true", "logger=none")
    monkeypatch.setenv("ACCEL_COMPARE_RUN", str(newest(tmp_path / "accel_compare")))
    monkeypatch.setenv("RANK_SWEEP_RUN", str(newest(tmp_path / "rank_sweep")))

    notebook = nbformat.read(REPO / "notebooks" / "paper_figures.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    tables = [output["data"]["text/markdown"] for output in outputs if "text/markdown" in output.get("data", {})]
    table_1, _, rank_table = tables
    assert "| Method" in table_1 and "Two Obj." in table_1 and "Overall" in table_1
    methods = [line.split("|")[1].strip() for line in table_1.splitlines()[2:]]
    assert methods == ["tiny (baseline)", "stagevar", "skipvar"]
    assert len(rank_table.splitlines()) == 2 + 2  # header, rule, one row per rank ratio
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 3  # two Pareto figures, rank ablation
