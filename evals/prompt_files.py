"""Prompt files of real benchmarks, and GenEval's folder layout for generated images.

- GenEval: `evaluation_metadata.jsonl`, one metadata dict per line, each with at least "prompt" and "tag".
- DPG-Bench: a folder with one `<item id>.txt` per prompt.
- GenEval's evaluator reads generated images from
  `<out_dir>/<prompt index:05>/metadata.jsonl` (the prompt's metadata on one line) and
  `<out_dir>/<prompt index:05>/samples/<sample index:05>.png`, as its generation script writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

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
        (prompt_dir / "metadata.jsonl").write_text(json.dumps(metadata) + "\n", encoding="utf-8")
        for sample_index, image in enumerate(samples):
            Image.fromarray(to_uint8_image(image)).save(prompt_dir / "samples" / f"{sample_index:05d}.png")
