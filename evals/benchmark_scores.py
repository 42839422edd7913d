"""The official scorers' outputs read back, and the paper's Table 1 drawn from them.

GenEval (djghosh13/geneval, `evaluation/evaluate_images.py <image folder> --outfile <file>`) writes JSON lines, one
per scored image:
    {"filename": "<image folder>/<prompt folder:05>/samples/<sample:05>.png", "tag": "<task>", "prompt": "...",
     "correct": true, "reason": "...", "metadata": "<the prompt's metadata line, as JSON text>", "details": "..."}
Its summary_scores.py scores a task as the share of its images that are correct, and overall as the mean over
the tasks.

DPG-Bench (ELLA's `dpg_bench/compute_dpg_bench.py --image-root-path <folder> --res-path <file>`) appends one line
per scored image, "<image path>, <score of each of its --pic-num tiles>, <their mean>", then the block it prints
at the end:
    Model: <folder name>
    L1 category scores:
    \t<category>: <score x 100>          (entity, attribute, relation, global, other)
    L2 category scores:
    \t<category>: <score x 100>          (entity - whole, attribute - color, ...)
    Image path: <folder>
    Save results to: <file>
    DPG-Bench score: <mean image score x 100>
An image's score is the share of its questions answered "yes" (a question whose parent failed counts 0), averaged
over its tiles; an image that the scorer could not read has no line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from errors import UserError

GENEVAL_IMAGE = re.compile(r"(\d+)[/\\]samples[/\\](\d+)\.png$")
DPG_SUMMARY_START = "Model:"
# Table 1's columns: the categories the paper reports, by the benchmark's own names.
TABLE_1_GENEVAL = {"two_object": "Two Obj.", "position": "Position", "color_attr": "Color Attri."}
TABLE_1_DPG = {"global": "DPG Global", "relation": "DPG Relation"}


class ScoreFileError(UserError, ValueError):
    """A scorer's output that cannot be read: the message names the file and line."""


# ----------------------------------------------------------------------------------------------------------
# GenEval


@dataclass(frozen=True)
class GenEvalImage:
    """One line of GenEval's results file."""

    line: int
    prompt_folder: int  # the export's <prompt folder> number
    sample: int
    tag: str
    correct: bool
    metadata: dict  # the prompt's metadata line, as the export wrote it


def read_geneval_results(path: str | Path) -> list[GenEvalImage]:
    """Every scored image of a GenEval results file (blank lines skipped)."""
    path = Path(path)
    images = []
    for number, line in enumerate(_text(path, "GenEval results").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ScoreFileError(f"{where}: not valid JSON ({error.msg}); expected one line of "
                                 "evaluate_images.py's --outfile") from None
        if not isinstance(row, dict):
            raise ScoreFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key, kind in (("filename", str), ("tag", str), ("correct", bool), ("metadata", str)):
            if not isinstance(row.get(key), kind):
                raise ScoreFileError(f"{where}: needs a {kind.__name__} {key!r}, got {row.get(key)!r}")
        image = GENEVAL_IMAGE.search(row["filename"])
        if image is None:
            raise ScoreFileError(f"{where}: filename {row['filename']!r} is not <prompt folder>/samples/<n>.png, "
                                 "as in GenEval's image layout")
        try:
            metadata = json.loads(row["metadata"])
        except json.JSONDecodeError as error:
            raise ScoreFileError(f"{where}: its metadata is not valid JSON ({error.msg})") from None
        images.append(GenEvalImage(number, int(image[1]), int(image[2]), row["tag"], row["correct"], metadata))
    if not images:
        raise ScoreFileError(f"{path} holds no scored image: pass the --outfile of evaluate_images.py")
    return images


def geneval_scores(images: Sequence[GenEvalImage]) -> dict:
    """GenEval's summary: each task's share of correct images (in the order the tasks appear), the overall mean
    over tasks, and the shares of correct images and of prompts with at least one correct image."""
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[int, list[bool]] = {}
    for image in images:
        by_tag.setdefault(image.tag, []).append(image.correct)
        by_prompt.setdefault(image.prompt_folder, []).append(image.correct)
    per_category = {tag: float(np.mean(correct)) for tag, correct in by_tag.items()}
    return {
        "per_category": per_category,
        "overall": float(np.mean(list(per_category.values()))),
        "correct_images": float(np.mean([image.correct for image in images])),
        "correct_prompts": float(np.mean([any(correct) for correct in by_prompt.values()])),
        "images": len(images),
    }


# ----------------------------------------------------------------------------------------------------------
# DPG-Bench


@dataclass(frozen=True)
class DpgScores:
    """A DPG-Bench score file: per image (by item id, the file's stem) its mean tile score in [0, 1], the category
    scores and the overall score as it printed them (x 100)."""

    images: dict[str, float]
    lines: dict[str, int]  # item id -> its line, for messages
    l1: dict[str, float]
    l2: dict[str, float]
    overall: float


def read_dpg_scores(path: str | Path) -> DpgScores:
    path = Path(path)
    lines = _text(path, "DPG-Bench score").splitlines()
    images: dict[str, float] = {}
    image_lines: dict[str, int] = {}
    number = 0
    for number, line in enumerate(lines, start=1):
        if line.startswith(DPG_SUMMARY_START):
            break
        if not line.strip():
            continue
        image_path, *scores = line.split(", ")  # as the scorer joins them (an image path holds no ", ")
        try:
            values = [float(score) for score in scores]
        except ValueError:
            values = []
        if len(values) < 2 or not image_path:
            raise ScoreFileError(f"{path}, line {number}: expected '<image path>, <tile scores>, <their mean>', "
                                 f"got {line!r}")
        item = Path(image_path).name.split(".")[0]  # the scorer's key: the file name up to its first dot
        if item in images:
            raise ScoreFileError(f"{path}, line {number}: image {item!r} was scored before, on line "
                                 f"{image_lines[item]}: one scorer run per file")
        images[item], image_lines[item] = values[-1], number
    else:
        raise ScoreFileError(f"{path}: no '{DPG_SUMMARY_START}' block after the image lines: the scorer did not "
                             "finish (it writes the category scores last)")
    l1, l2, overall = _dpg_summary(path, lines, number)
    if images and abs(np.mean(list(images.values())) * 100 - overall) > 1e-6 * max(1.0, abs(overall)):
        raise ScoreFileError(f"{path}: its image lines average {np.mean(list(images.values())) * 100:.6f}, not its "
                             f"DPG-Bench score {overall}: lines of another run are mixed in")
    return DpgScores(images, image_lines, l1, l2, overall)


def _dpg_summary(path: Path, lines: list[str], first: int) -> tuple[dict, dict, float]:
    """The category block that starts on line `first`: L1 scores, L2 scores, overall."""
    sections: dict[str, dict[str, float]] = {}
    section, overall = None, None
    for number, line in enumerate(lines[first:], start=first + 1):
        if line.startswith(("L1 category scores:", "L2 category scores:")):
            section = sections.setdefault(line[:2], {})
        elif line.startswith("\t") and section is not None:
            category, _, value = line.strip().rpartition(":")
            try:
                section[category.strip()] = float(value)
            except ValueError:
                raise ScoreFileError(f"{path}, line {number}: expected '<category>: <score>', got {line!r}") from None
        elif line.startswith("DPG-Bench score:"):
            try:
                overall = float(line.split(":", 1)[1])
            except ValueError:
                raise ScoreFileError(f"{path}, line {number}: expected 'DPG-Bench score: <number>', got "
                                     f"{line!r}") from None
        elif line.startswith(("Image path:", "Save results to:")) or not line.strip():
            section = None
        else:
            raise ScoreFileError(f"{path}, line {number}: unexpected in the score block: {line!r}")
    if overall is None or "L1" not in sections:
        raise ScoreFileError(f"{path}: the score block lacks its L1 category scores or its 'DPG-Bench score:' line")
    return sections["L1"], sections.get("L2", {}), overall


def _text(path: Path, what: str) -> str:
    if not path.is_file():
        raise ScoreFileError(f"{what} file {path} does not exist")
    return path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Table 1


def table_1(summary: dict, benchmark_scores: dict) -> tuple[list[str], list[list]]:
    """Columns and rows of the paper's Table 1 for a comparison run (accel_compare, accel_eval): speed, latency,
    GenEval's reported categories and overall, DPG-Bench's, per method. The GenEval part comes from imported
    official scores when the run has them, else from ShapesEval (GenEval's protocol on the shapes world); the DPG
    part only from imported scores."""
    geneval = benchmark_scores.get("geneval", {})
    dpg = benchmark_scores.get("dpg", {})
    columns = ["Method", "Speed", f"Latency (s / batch of {summary['timing']['batch_size']})",
               *TABLE_1_GENEVAL.values(), "Overall"]
    if dpg:
        columns += [*TABLE_1_DPG.values(), "DPG Overall"]
    rows = []
    for row in summary["methods"]:
        label = row["method"]
        name = f"{summary['model']} (baseline)" if label == "baseline" else label
        if geneval:
            scores = geneval.get(label, {})
            categories, overall = scores.get("per_category", {}), scores.get("overall")
        else:
            categories, overall = row.get("shapes_eval_per_category", {}), row.get("shapes_eval")
        cells = [name, f"{row['speedup']:.2f}x", row["latency_s"],
                 *(_dash(categories.get(tag)) for tag in TABLE_1_GENEVAL), _dash(overall)]
        if dpg:
            scores = dpg.get(label, {})
            cells += [*(_dash(scores.get("l1", {}).get(category)) for category in TABLE_1_DPG),
                      _dash(scores.get("overall"))]
        rows.append(cells)
    return columns, rows


def _dash(value: object) -> object:
    return "-" if value is None else value
