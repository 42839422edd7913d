"""Prompt files of real benchmarks, and GenEval's folder layout for generated images.

- GenEval: `evaluation_metadata.jsonl`, one metadata dict per line, each with at least "prompt" and "tag".
- DPG-Bench: a folder with one `<item id>.txt` per prompt.
- GenEval's evaluator reads generated images from
  `<out_dir>/<prompt index:05>/metadata.jsonl` (the prompt's metadata on one line) and
  `<out_dir>/<prompt index:05>/samples/<sample index:05>.png`, as its generation script writes them.
- DPG-Bench's scorer (compute_dpg_bench.py) reads one image per prompt, `<out_dir>/<item id>.png`, named by the
  prompt file's stem (its item_id), holding the prompt's samples as a 2 x 2 grid of `--resolution`-pixel tiles in
  the order it crops them: top left, top right, bottom left, bottom right (`--pic-num` = the number of samples).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from errors import UserError
from evals.shapes_world import ImageLike, to_uint8_image


class PromptFileError(UserError, ValueError):
    """A prompt file or folder that cannot be read; the message names it and what is wrong."""


def read_geneval_metadata(path: str | Path) -> list[dict]:
    """The metadata dicts of a GenEval evaluation_metadata.jsonl, in file order; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"GenEval metadata file {path} does not exist")
    metadatas = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            metadata = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from None
        if not isinstance(metadata, dict):
            raise PromptFileError(f"{path}, line {line_number}: expected a JSON object, got {type(metadata).__name__}")
        for key in ("prompt", "tag"):
            if not isinstance(metadata.get(key), str):
                found = metadata.get(key)
                raise PromptFileError(f"{path}, line {line_number}: needs a text {key!r} key, got {found!r}")
        metadatas.append(metadata)
    return metadatas


def read_prompt_map(path: str | Path) -> dict[str, str]:
    """A JSON object {prompt: the text the model reads instead}, e.g. StageVAR's GenEval prompt_rewrite_cache.json."""
    path = Path(path)
    try:
        rewrites = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(rewrites, dict) or not all(isinstance(text, str) for text in rewrites.values()):
        raise PromptFileError(f"{path}: expected one JSON object mapping each prompt to its rewritten text")
    return rewrites


def read_dpg_prompts(folder: str | Path) -> list[dict]:
    """[{"id": file stem, "prompt": text}] for every .txt file of a DPG-Bench prompt folder, sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PromptFileError(f"DPG-Bench prompt folder {folder} does not exist (expected one .txt file per prompt)")
    prompt_files = sorted(folder.glob("*.txt"))
    if not prompt_files:
        raise PromptFileError(f"DPG-Bench prompt folder {folder} has no .txt files (expected one per prompt)")
    prompts = []
    for prompt_file in prompt_files:
        text = prompt_file.read_text(encoding="utf-8").strip()
        if not text:
            raise PromptFileError(f"DPG-Bench prompt file {prompt_file} is empty")
        prompts.append({"id": prompt_file.stem, "prompt": text})
    return prompts


RUN_KEYS = ("index", "sample", "original_prompt")  # what evals/prompts.py adds to a benchmark's own metadata
DPG_GRID = (2, 2)  # the scorer's crops: (column, row) of sample i is (i % 2, i // 2)


def benchmark_metadata(prompt: dict) -> dict:
    """A prompt's metadata as the benchmark's file has it: the run's own keys out, a rewritten prompt undone."""
    metadata = {key: value for key, value in prompt.items() if key not in RUN_KEYS}
    if "original_prompt" in prompt:
        metadata["prompt"] = prompt["original_prompt"]
    return metadata


def export_geneval_layout(
    out_dir: str | Path,
    metadatas: list[dict],
    images: list[list[ImageLike]],
) -> None:
    """Write images[i] (the samples of prompt i) in GenEval's layout, ready for its evaluate_images.py."""
    if len(metadatas) != len(images):
        raise ValueError(f"{len(metadatas)} prompts but {len(images)} lists of images; give one list per prompt")
    for index, (metadata, samples) in enumerate(zip(metadatas, images)):
        prompt_dir = Path(out_dir) / f"{index:05d}"
        (prompt_dir / "samples").mkdir(parents=True, exist_ok=True)
        (prompt_dir / "metadata.jsonl").write_text(json.dumps(benchmark_metadata(metadata)) + "\n", encoding="utf-8")
        for sample_index, image in enumerate(samples):
            Image.fromarray(to_uint8_image(image)).save(prompt_dir / "samples" / f"{sample_index:05d}.png")


def export_dpg_layout(out_dir: str | Path, prompts: list[dict], images: list[list[ImageLike]]) -> None:
    """Write each DPG-Bench prompt's samples (at most 4, of one size) as <out_dir>/<item id>.png, a 2 x 2 grid."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} lists of images; give one list per prompt")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    columns, rows = DPG_GRID
    for prompt, samples in zip(prompts, images):
        if not 1 <= len(samples) <= columns * rows:
            raise ValueError(f"DPG-Bench scores 1 to {columns * rows} samples per prompt; {prompt['id']} has "
                             f"{len(samples)}")
        tiles = [to_uint8_image(image) for image in samples]
        height, width = tiles[0].shape[:2]
        used_rows, used_columns = -(-len(tiles) // columns), min(len(tiles), columns)
        grid = np.zeros((height * used_rows, width * used_columns, 3), np.uint8)
        for position, tile in enumerate(tiles):
            row, column = divmod(position, columns)
            grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = tile
        Image.fromarray(grid).save(Path(out_dir) / f"{prompt['id']}.png")


BENCHMARK_LAYOUTS = {"geneval": export_geneval_layout, "dpg": export_dpg_layout}


def export_benchmark_layout(benchmark: str, out_dir: str | Path, prompts: list[dict], images: list[ImageLike],
                            samples_per_prompt: int) -> None:
    """The images (each prompt's samples in a row, prompt by prompt) in the layout of a benchmark's official scorer."""
    per_prompt = [images[start : start + samples_per_prompt] for start in range(0, len(images), samples_per_prompt)]
    BENCHMARK_LAYOUTS[benchmark](out_dir, prompts, per_prompt)
