"""import_scores: the official GenEval / DPG-Bench scores of a run's exported images, back into that run's folder.

A generate, accel_eval or accel_compare run on prompts=geneval or prompts=dpg exports each method's images in the
benchmark's layout (its summary's "exports": <benchmark> -> method -> folder). After the official scorer has read
a folder (on a machine with its models), this checks that its output scores exactly that export (every image once,
each with the prompt the export gave it) and writes into the run folder:
    benchmark_scores.json       <benchmark> -> method -> per-category and overall scores, and the file they came from
    tables/<benchmark>_scores.csv
so Table 1 (evals/benchmark_scores.table_1, notebooks/paper_figures.ipynb) is drawn from real scores. Importing one
benchmark or method again replaces only its entry.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from errors import UserError
from evals.benchmark_scores import (
    ScoreFileError,
    geneval_scores,
    read_dpg_scores,
    read_geneval_results,
)
from experiments.recorder import RunRecorder, is_complete, write_csv

log = logging.getLogger(__name__)

SCORES_FILE = "benchmark_scores.json"
BENCHMARKS = ("geneval", "dpg")


def check(cfg: DictConfig) -> None:
    imported_scores(cfg.import_scores)  # reads and checks every file; nothing is written


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    settings = cfg.import_scores
    run_dir = Path(settings.run)
    scores = imported_scores(settings)
    scores_path = run_dir / SCORES_FILE
    merged = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
    for benchmark, methods in scores.items():
        merged.setdefault(benchmark, {}).update(methods)
    partial = scores_path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(partial, scores_path)  # never half written: the run folder is someone's record
    for benchmark in scores:
        columns, rows = score_table(benchmark, merged[benchmark])
        table = recorder.log_table(f"{benchmark}_scores", columns, rows)
        (run_dir / "tables").mkdir(exist_ok=True)
        write_csv(run_dir / "tables" / f"{benchmark}_scores.csv", columns, rows)
        log.info("%s scores of %s, now in %s:\n%s", benchmark, run_dir, scores_path, table)
    return {"run": str(run_dir), "scores": scores}


def imported_scores(settings: DictConfig) -> dict[str, dict[str, dict]]:
    """<benchmark> -> method -> scores, from the files `settings` names, each checked against the run's export."""
    if OmegaConf.is_missing(settings, "run"):
        raise UserError("import_scores.run is not set: add import_scores.run=<the run folder whose export was scored>")
    run_dir = Path(settings.run)
    if not is_complete(run_dir):
        raise UserError(f"import_scores.run={settings.run!r} is not the folder of a complete run (its summary.json "
                        "says so): pass the generate / accel_eval / accel_compare run whose export was scored")
    exports = json.loads((run_dir / "summary.json").read_text()).get("exports", {})
    files = {}
    for benchmark in BENCHMARKS:
        value = settings[benchmark]
        if value is not None and not OmegaConf.is_dict(value):
            raise UserError(f"import_scores.{benchmark}={value!r} must map methods to the scorer's files: "
                            f"'import_scores.{benchmark}={{baseline: <file>}}'")
        files[benchmark] = OmegaConf.to_container(value) if value is not None else {}
    if not any(files.values()):
        raise UserError("import_scores: give the scorer's output of at least one method, e.g. 'import_scores.geneval="
                        "{baseline: results.jsonl}' or 'import_scores.dpg={baseline: scores.txt}'")
    scores: dict[str, dict[str, dict]] = {}
    for benchmark, by_method in files.items():
        for method, path in by_method.items():
            folder = exports.get(benchmark, {}).get(method)
            if folder is None:
                known = {name: list(methods) for name, methods in exports.items()} or "nothing"
                raise UserError(f"import_scores.{benchmark}.{method}: {run_dir} exported no {benchmark} images of "
                                f"{method!r} (it exported {known}); run it with prompts={benchmark}")
            read = import_geneval if benchmark == "geneval" else import_dpg
            scores.setdefault(benchmark, {})[method] = {**read(Path(path), Path(folder)), "source": str(path)}
    return scores


def import_geneval(results_path: Path, export: Path) -> dict:
    """GenEval's summary of a results file that scored every image of `export` once, with the export's prompts."""
    images = read_geneval_results(results_path)
    exported = {int(folder.name): json.loads((folder / "metadata.jsonl").read_text())
                for folder in export.iterdir() if folder.name.isdigit()}
    expected = {(index, int(sample.stem)) for index in exported
                for sample in (export / f"{index:05d}" / "samples").glob("*.png")}
    seen: dict[tuple[int, int], int] = {}
    for image in images:
        key = (image.prompt_folder, image.sample)
        where = f"{results_path}, line {image.line}"
        if key not in expected:
            raise ScoreFileError(f"{where}: image {image.prompt_folder:05d}/samples/{image.sample:05d}.png is not in "
                                 f"the export {export}: these results are of another folder")
        if key in seen:
            raise ScoreFileError(f"{where}: image {image.prompt_folder:05d}/samples/{image.sample:05d}.png was scored "
                                 f"before, on line {seen[key]}")
        exported_prompt = exported[image.prompt_folder]
        if image.metadata != exported_prompt:
            raise ScoreFileError(f"{where}: scored with the prompt {image.metadata.get('prompt')!r}, but the export's "
                                 f"prompt {image.prompt_folder:05d} is {exported_prompt.get('prompt')!r}: these results "
                                 "are of another export")
        seen[key] = image.line
    if missing := sorted(expected - seen.keys()):
        index, sample = missing[0]
        raise ScoreFileError(f"{results_path} scores {len(seen)} of the {len(expected)} images of {export}; "
                             f"{index:05d}/samples/{sample:05d}.png and {len(missing) - 1} more have no result: "
                             "score the whole folder")
    return geneval_scores(images)


def import_dpg(score_path: Path, export: Path) -> dict:
    """DPG-Bench's scores of a score file that scored every prompt grid of `export`."""
    scores = read_dpg_scores(score_path)
    exported = {path.stem for path in export.glob("*.png")}
    if stray := sorted(scores.images.keys() - exported):
        raise ScoreFileError(f"{score_path}, line {scores.lines[stray[0]]}: image {stray[0]!r} is not in the export "
                             f"{export}: these scores are of another folder")
    if missing := sorted(exported - scores.images.keys()):
        raise ScoreFileError(f"{score_path} scores {len(scores.images)} of the {len(exported)} prompts of {export}; "
                             f"{missing[0]}.png and {len(missing) - 1} more have no line (the scorer prints "
                             "'Failed filename' for those): score the whole folder")
    return {"l1": scores.l1, "l2": scores.l2, "overall": scores.overall, "prompts": len(scores.images)}


def score_table(benchmark: str, by_method: dict[str, dict]) -> tuple[list[str], list[list]]:
    """One row per method: the categories (GenEval's tasks, DPG-Bench's L1 categories), then overall."""
    key = "per_category" if benchmark == "geneval" else "l1"
    categories = list(dict.fromkeys(category for scores in by_method.values() for category in scores[key]))
    rows = [[method, *(scores[key].get(category) for category in categories), scores["overall"]]
            for method, scores in by_method.items()]
    return ["method", *categories, "overall"], rows
