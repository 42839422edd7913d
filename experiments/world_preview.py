"""world_preview: a look at the offline shapes world, and a check of its scorer.

1. A captioned grid of random training scenes: figures/world_grid.png, one PNG per scene in images/.
2. ShapesEval on the ground-truth rendering of every prompt (the suite by default): one results row
   per prompt, then the per-category table and the overall score. The world draws exactly what each
   prompt asks for, so anything below 1.0 is a disagreement between the world and its scorer.
"""

import logging
import textwrap
from collections import Counter
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import font_manager
from matplotlib.ft2font import FT2Font
from matplotlib.figure import Figure
from omegaconf import DictConfig
from tqdm import tqdm

from evals.prompts import load_prompts
from evals.shapes_eval import evaluate
from evals.shapes_world import render, sample_batch, to_uint8_image
from experiments.config_checks import check_prompts, positive_wholes, whole
from experiments.recorder import RunRecorder

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    check_prompts(cfg)
    positive_wholes(cfg.preview, "preview", ["num_images", "grid_columns"])
    whole("preview.resolution", cfg.preview.resolution, minimum=32, why=" (pixels per side)")


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    preview = cfg.preview
    images, captions, _ = sample_batch(preview.num_images, seed=cfg.seed, resolution=preview.resolution)
    scenes = [to_uint8_image(image) for image in images]
    recorder.save_images(scenes, [f"scene_{i:03d}" for i in range(len(scenes))])
    recorder.save_figure(caption_grid(scenes, captions, preview.grid_columns), "world_grid")

    prompts = load_prompts(cfg.prompts)
    rng = np.random.default_rng(cfg.seed)
    renders = (render(item, rng, resolution=preview.resolution) for item in prompts)
    scores = evaluate(tqdm(renders, total=len(prompts), desc="ShapesEval on ground-truth renders"), prompts)
    for item, passed in zip(prompts, scores["correct"]):
        recorder.log({"index": item["index"], "tag": item["tag"], "prompt": item["prompt"], "passed": passed})

    tag_counts = Counter(item["tag"] for item in prompts)
    table = recorder.log_table(
        "shapes_eval_ground_truth",
        ["category", "prompts", "accuracy"],
        [[tag, tag_counts[tag], accuracy] for tag, accuracy in scores["per_category"].items()]
        + [["overall", len(prompts), scores["overall"]]],
    )
    log.info("ShapesEval on ground-truth renders:\n%s", table)
    return {"per_category": scores["per_category"], "overall": scores["overall"], "num_prompts": len(prompts)}


GRID_MAX_INCHES = (24, 16)  # width, height: 3,600 x 2,400 pixels at the recorder's 150 dpi
PANEL_ASPECT = 1.18  # a panel's height over its width: the image and a three-line caption
CAPTION_CHARS = 3 * 28  # three lines of 28 characters


def caption_grid(
    images: list[np.ndarray], captions: list[str], columns: int, passed: Sequence[bool] | None = None
) -> Figure:
    """Images in a grid, each titled with its caption (at most three lines); with `passed`, marked ShapesEval pass
    (green) or fail (red). Panels shrink so that a large grid stays within GRID_MAX_INCHES."""
    columns = max(1, min(columns, len(images)))  # one or two images: a narrow sheet, not a blank row of 8
    rows = -(-len(images) // columns)
    panel = min(2.2, GRID_MAX_INCHES[0] / columns, GRID_MAX_INCHES[1] / (PANEL_ASPECT * rows))
    fig, axes = plt.subplots(rows, columns, figsize=(panel * columns, panel * PANEL_ASPECT * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    captions = drawable(captions)
    for index, (axis, image, caption) in enumerate(zip(axes.flat, images, captions)):
        axis.imshow(image)
        color = "black"
        if passed is not None:
            verdict, color = ("pass", "tab:green") if passed[index] else ("fail", "tab:red")
            caption = f"{verdict}: {caption}"
        title = textwrap.fill(textwrap.shorten(caption, CAPTION_CHARS, placeholder=" ..."), 28)
        axis.set_title(title, fontsize=max(4, 7 * panel / 2.2), color=color)
    fig.tight_layout()
    return fig


def drawable(captions: list[str]) -> list[str]:
    """The captions with every character the figure font has no glyph for (e.g. CJK in DejaVu Sans) shown as ?,
    said once, instead of matplotlib's warning per character and empty boxes."""
    font = FT2Font(font_manager.findfont(font_manager.FontProperties(family=plt.rcParams["font.family"])))
    missing = sorted({char for caption in captions for char in caption if font.get_char_index(ord(char)) == 0})
    if not missing:
        return captions
    log.warning("the figure font (%s) cannot draw %s in the captions: they show as ? (the images and rows keep the "
                "prompts as given)", font.family_name, "".join(missing[:20]) + ("..." if len(missing) > 20 else ""))
    return ["".join("?" if char in missing else char for char in caption) for caption in captions]
