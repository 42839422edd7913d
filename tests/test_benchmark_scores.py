"""The GenEval / DPG-Bench round trip: a run exports its images in the official scorers' layouts, their outputs
(fixtures written from the formats their scripts write) are read back into the run folder, and Table 1 is drawn
from them; a malformed scorer output is an error naming its file and line."""

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from errors import UserError
from evals.benchmark_scores import geneval_scores, read_dpg_scores, read_geneval_results, table_1
from evals.prompt_files import export_dpg_layout
from evals.prompts import load_prompts
from evals.shapes_world import make_suite

from helpers import quick_overrides, run_py, write_small_checkpoint


def geneval_line(image: str, tag: str, correct: bool, metadata: dict) -> str:
    """One line as evaluate_images.py writes it (pandas' to_json: slashes escaped, metadata as JSON text)."""
    row = {"filename": image, "tag": tag, "prompt": metadata["prompt"], "correct": correct,
           "reason": "" if correct else "expected cube>=1, found 0", "metadata": json.dumps(metadata),
           "details": json.dumps({"cube": [[1.0, 2.0, 30.0, 40.0, 0.9]]})}
    return json.dumps(row).replace("/", "\\/")


def dpg_score_file(images: dict[str, list[float]], root: str = "/scratch/dpg/baseline") -> str:
    """A --res-path file as compute_dpg_bench.py writes it: a line per image, then its category block."""
    lines = [f"{root}/{item}.png, " + ", ".join(str(s) for s in tiles) + f", {sum(tiles) / len(tiles)}"
             for item, tiles in images.items()]
    overall = np.mean([sum(tiles) / len(tiles) for tiles in images.values()]) * 100
    return "\n".join(lines + [
        "Model: baseline", "L1 category scores:", "\tentity: 81.25", "\tglobal: 75.0", "\trelation: 62.5",
        "L2 category scores:", "\tentity - whole: 81.25", "\tglobal - global: 75.0", "\trelation - spatial: 62.5",
        f"Image path: {root}", f"Save results to: {root}/dpg-bench_results.txt", f"DPG-Bench score: {overall}",
    ]) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Reading the scorers' outputs


def test_geneval_results_give_the_summary_its_script_prints(tmp_path: Path):
    two, position = {"tag": "two_object", "prompt": "a photo of a cube and a cone"}, {"tag": "position", "prompt": "x"}
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join([
        geneval_line("/out/geneval/00000/samples/00000.png", "two_object", True, two),
        geneval_line("/out/geneval/00000/samples/00001.png", "two_object", False, two),
        geneval_line("/out/geneval/00001/samples/00000.png", "position", False, position),
        geneval_line("/out/geneval/00001/samples/00001.png", "position", False, position),
    ]) + "\n")
    images = read_geneval_results(path)
    assert [(image.prompt_folder, image.sample, image.correct) for image in images] == [
        (0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False)]
    scores = geneval_scores(images)
    assert scores["per_category"] == {"two_object": 0.5, "position": 0.0}
    assert scores["overall"] == 0.25  # the mean over tasks, as summary_scores.py
    assert (scores["correct_images"], scores["correct_prompts"], scores["images"]) == (0.25, 0.5, 4)


@pytest.mark.parametrize(("bad_line", "complaint"), [
    ('{"filename": "00000/samples/00000.png", "tag": ', "not valid JSON"),
    (json.dumps({"filename": "00000/samples/00000.png", "tag": "position", "correct": "yes", "metadata": "{}"}),
     "'correct'"),
    (json.dumps({"filename": "00000/00000.jpg", "tag": "position", "correct": True, "metadata": "{}"}),
     "not <prompt folder>/samples/<n>.png"),
])
def test_a_malformed_geneval_results_line_is_named(tmp_path: Path, bad_line: str, complaint: str):
    path = tmp_path / "results.jsonl"
    path.write_text(geneval_line("/o/00000/samples/00000.png", "position", True, {"prompt": "x"}) + "\n" + bad_line)
    with pytest.raises(UserError) as raised:
        read_geneval_results(path)
    assert f"{path}, line 2" in str(raised.value) and complaint in str(raised.value)


def test_a_dpg_score_file_gives_its_categories_and_images(tmp_path: Path):
    path = tmp_path / "dpg-bench_results.txt"
    path.write_text(dpg_score_file({"a12": [1.0, 0.5, 0.75, 0.75], "b7": [0.25, 0.25, 0.5, 0.0]}))
    scores = read_dpg_scores(path)
    assert scores.images == {"a12": 0.75, "b7": 0.25}
    assert scores.l1 == {"entity": 81.25, "global": 75.0, "relation": 62.5}
    assert scores.l2["relation - spatial"] == 62.5 and scores.overall == pytest.approx(50.0)


@pytest.mark.parametrize(("edit", "complaint"), [
    (lambda text: text.replace("a12.png, 1.0", "a12.png, one"), "line 1"),
    (lambda text: text.split("Model:")[0], "did not finish"),
    (lambda text: text.replace("\tglobal: 75.0", "\tglobal: high"), "line 6"),
    (lambda text: text + "/scratch/dpg/baseline/c3.png, 1.0, 1.0\n", "unexpected"),
    (lambda text: "/scratch/dpg/baseline/c3.png, 1.0, 1.0\n" + text, "another run"),
])
def test_a_malformed_dpg_score_file_is_named(tmp_path: Path, edit, complaint: str):
    path = tmp_path / "dpg-bench_results.txt"
    path.write_text(edit(dpg_score_file({"a12": [1.0, 0.5, 0.75, 0.75], "b7": [0.25, 0.25, 0.5, 0.0]})))
    with pytest.raises(UserError) as raised:
        read_dpg_scores(path)
    assert str(path) in str(raised.value) and complaint in str(raised.value)


def test_a_rewrite_map_must_be_json_and_cover_every_prompt(tmp_path: Path):
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text(json.dumps({"tag": "single_object", "prompt": "a photo of a cube"}) + "\n")
    prompts = {"name": "geneval", "path": str(metadata), "limit": None, "samples_per_prompt": 4}
    rewrites = tmp_path / "rewrites.json"
    rewrites.write_text('{\n  "a photo of a cube": "a red cube on a table",\n  "a photo of a cone": \n}')
    with pytest.raises(UserError, match=f"{rewrites}, line 4"):
        load_prompts(OmegaConf.create({**prompts, "rewrite_map": str(rewrites)}))
    rewrites.write_text(json.dumps({"a photo of a cone": "a cone"}))
    with pytest.raises(UserError, match="no rewrite of 1 prompt"):
        load_prompts(OmegaConf.create({**prompts, "rewrite_map": str(rewrites)}))


# ----------------------------------------------------------------------------------------------------------
# Export, score, import


def test_dpg_layout_is_a_2x2_grid_per_prompt_named_by_its_item_id(tmp_path: Path):
    samples = [np.full((8, 6, 3), value, np.uint8) for value in (10, 20, 30, 40)]
    export_dpg_layout(tmp_path, [{"id": "a12", "prompt": "..."}], [samples])
    grid = np.asarray(Image.open(tmp_path / "a12.png"))
    assert grid.shape == (16, 12, 3)  # the scorer crops tiles of --resolution pixels: top left, top right, ...
    assert [grid[0, 0, 0], grid[0, 6, 0], grid[8, 0, 0], grid[8, 6, 0]] == [10, 20, 30, 40]


@pytest.fixture(scope="module")
def geneval_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """generate on 2 GenEval prompts, 2 samples each, read through a rewrite map (the Infinity papers' variant)."""
    tmp = tmp_path_factory.mktemp("geneval")
    metadata = [make_suite(num_per_category=1)[i] for i in (1, 4)]  # two_object, position
    (tmp / "evaluation_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    (tmp / "rewrites.json").write_text(json.dumps({m["prompt"]: f"a detailed scene: {m['prompt']}" for m in metadata}))
    run_py("experiment=generate", *quick_overrides(write_small_checkpoint(tmp / "checkpoint"), tmp), "prompts=geneval",
           f"prompts.path={tmp / 'evaluation_metadata.jsonl'}", f"prompts.rewrite_map={tmp / 'rewrites.json'}",
           "prompts.samples_per_prompt=2")
    (run_dir,) = (tmp / "generate").iterdir()
    return run_dir


def scored_export(export: Path, correct: set[tuple[int, int]]) -> str:
    """What evaluate_images.py writes for an export folder: `correct` holds the (folder, sample) it finds right."""
    lines = []
    for folder in sorted(export.iterdir()):
        metadata = json.loads((folder / "metadata.jsonl").read_text())
        for sample in sorted((folder / "samples").iterdir()):
            lines.append(geneval_line(str(sample), metadata["tag"], (int(folder.name), int(sample.stem)) in correct,
                                      metadata))
    return "\n".join(lines) + "\n"


def test_geneval_scores_come_back_into_the_run_folder(geneval_run: Path, tmp_path: Path):
    summary = json.loads((geneval_run / "summary.json").read_text())
    export = Path(summary["exports"]["geneval"]["baseline"])
    assert sorted(path.name for path in (export / "00000" / "samples").iterdir()) == ["00000.png", "00001.png"]
    exported = json.loads((export / "00001" / "metadata.jsonl").read_text())
    assert exported["prompt"].startswith("a photo of") and set(exported) == {"tag", "include", "prompt"}  # GenEval's
    rows = [json.loads(line) for line in (geneval_run / "results.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].startswith("a detailed scene: ")  # what the model read

    results = tmp_path / "results.jsonl"
    results.write_text(scored_export(export, correct={(0, 0), (0, 1), (1, 1)}))
    run_py("experiment=import_scores", f"paths.output_root={tmp_path}", "logger=none",
           f"import_scores.run={geneval_run}", f"import_scores.geneval={{baseline: {results}}}")
    scores = json.loads((geneval_run / "benchmark_scores.json").read_text())["geneval"]["baseline"]
    assert scores["per_category"] == {"two_object": 1.0, "position": 0.5} and scores["overall"] == 0.75
    assert (geneval_run / "tables" / "geneval_scores.csv").read_text().splitlines()[1] == "baseline,1.0,0.5,0.75"

    compare = {"model": "tiny", "timing": {"batch_size": 2},
               "methods": [{"method": "baseline", "speedup": 1.0, "latency_s": 0.5}]}
    columns, (row,) = table_1(compare, {"geneval": {"baseline": scores}})
    assert dict(zip(columns, row)) == {"Method": "tiny (baseline)", "Speed": "1.00x",
                                       "Latency (s / batch of 2)": 0.5, "Two Obj.": 1.0, "Position": 0.5,
                                       "Color Attri.": "-", "Overall": 0.75}


def test_geneval_results_of_another_export_are_refused(geneval_run: Path, tmp_path: Path, capsys):
    export = Path(json.loads((geneval_run / "summary.json").read_text())["exports"]["geneval"]["baseline"])
    scores_file = geneval_run / "benchmark_scores.json"
    scores_before = scores_file.read_bytes() if scores_file.exists() else None
    results = tmp_path / "results.jsonl"
    lines = scored_export(export, correct=set()).splitlines()
    results.write_text("\n".join(lines[:2] + [lines[2].replace("a photo of", "a picture of")] + lines[3:]) + "\n")
    with pytest.raises(SystemExit) as stop:
        run_py("experiment=import_scores", f"paths.output_root={tmp_path}", "logger=none",
               f"import_scores.run={geneval_run}", f"import_scores.geneval={{baseline: {results}}}")
    assert stop.value.code == 2
    assert f"{results}, line 3" in capsys.readouterr().err
    results.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(SystemExit):
        run_py("experiment=import_scores", f"paths.output_root={tmp_path}", "logger=none",
               f"import_scores.run={geneval_run}", f"import_scores.geneval={{baseline: {results}}}")
    assert "scores 3 of the 4 images" in capsys.readouterr().err
    assert (scores_file.read_bytes() if scores_file.exists() else None) == scores_before  # nothing imported


def test_dpg_scores_come_back_into_the_run_folder(tmp_path: Path):
    prompts = tmp_path / "dpg_prompts"
    prompts.mkdir()
    for item, text in {"a12": "a red cube on a blue sphere", "b7": "two green cones"}.items():
        (prompts / f"{item}.txt").write_text(text)
    run_py("experiment=generate", *quick_overrides(write_small_checkpoint(tmp_path / "checkpoint"), tmp_path),
           "prompts=dpg", f"prompts.path={prompts}")
    (run_dir,) = (tmp_path / "generate").iterdir()
    export = Path(json.loads((run_dir / "summary.json").read_text())["exports"]["dpg"]["baseline"])
    grid = np.asarray(Image.open(export / "a12.png"))
    assert grid.shape == (64, 64, 3)  # 4 samples of 32 x 32
    assert np.array_equal(grid[32:, 32:], np.asarray(Image.open(run_dir / "images" / "00000_3.png")))

    scores = tmp_path / "dpg-bench_results.txt"
    scores.write_text(dpg_score_file({"a12": [1.0, 0.5, 0.75, 0.75], "b7": [0.25, 0.25, 0.5, 0.0]}, str(export)))
    run_py("experiment=import_scores", f"paths.output_root={tmp_path}", "logger=none",
           f"import_scores.run={run_dir}", f"import_scores.dpg={{baseline: {scores}}}")
    imported = json.loads((run_dir / "benchmark_scores.json").read_text())["dpg"]["baseline"]
    assert imported["l1"]["relation"] == 62.5 and imported["overall"] == pytest.approx(50.0)
    assert imported["prompts"] == 2
