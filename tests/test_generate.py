"""generate on the ShapesEval suite: images, the ShapesEval table and FID against ground-truth renders."""

import json
from pathlib import Path

import numpy as np

from evals.shapes_eval import load_suite
from evals.shapes_world import TAGS
from experiments.generate import contact_sheet_positions

from helpers import quick_overrides, run_py, write_small_checkpoint


def test_generate_scores_the_suite_and_takes_fid_against_the_world(tmp_path: Path):
    quick = quick_overrides(write_small_checkpoint(tmp_path / "checkpoint"), tmp_path)
    run_py("experiment=generate", *quick)
    (run_dir,) = [path.parent for path in (tmp_path / "generate").glob("*/summary.json")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["num_images"] == 4
    assert set(summary["shapes_eval"]["per_category"]) <= {"single_object", "two_object", "counting", "colors",
                                                           "position", "color_attr"}
    assert np.isfinite(summary["fid_vs_world"]) and summary["fid_vs_world"] > 0  # random weights draw no world
    assert len(list((tmp_path / "cache").glob("fid_reference_*.npy"))) == 1  # paths.cache_dir: the renders' features
    assert len(list((run_dir / "images").glob("*.png"))) == 4


def test_the_contact_sheet_spreads_over_the_run_so_every_category_shows():
    suite = load_suite()
    shown = [suite[i]["tag"] for i in contact_sheet_positions(len(suite), 32)]
    assert len(shown) == 32 and set(shown) == set(TAGS)
    assert contact_sheet_positions(2, 32) == [0, 1]
