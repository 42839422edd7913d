"""prefix_probe: at which scale does the model lose the image? ShapesEval with the first k scales forced.

Each prompt's ground truth is a world render, quantised by the model's own VAE into bits per scale. For every k
from 0 to K (the number of scales) the sampler takes the first k scales' bits from the ground truth and samples
the rest, on the same seeds: k = 0 is plain generation, k = K is the VAE's reconstruction (the ceiling). Where
the curve climbs, the model's own scales were losing what the prompt asks for; where it is flat, the forced
scales carry nothing the model would not have drawn itself.

    python run.py experiment=prefix_probe                      (tiny model, 96 prompts of the suite)
"""

from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig
from tqdm import tqdm

from accel.sampler import SamplingConfig, generate
from errors import UserError
from evals.prompts import load_prompts, spread
from evals.shapes_eval import evaluate
from evals.shapes_world import render_tensor
from experiments.generate import sampling_config
from experiments.config_checks import check_model, check_prompts, whole
from experiments.recorder import RunRecorder
from models.pipeline import TextToImageModel, build_model

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    if cfg.prompts.name != "shapes_eval":
        raise UserError(f"prefix_probe needs shapes-world prompts (prompts=shapes_eval), not prompts={cfg.prompts.name}")
    check_model(cfg)
    check_prompts(cfg)
    whole("prefix_probe.num_prompts", cfg.prefix_probe.num_prompts, minimum=1)


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    prompts = spread(load_prompts(cfg.prompts), cfg.prefix_probe.num_prompts)
    model = build_model(cfg.model, cfg.device)
    images = prefix_images(model, prompts, sampling_config(cfg.model), cfg.seed, cfg.model.batch_size)

    rows = []
    for forced, forced_images in enumerate(images):
        scores = evaluate(forced_images, prompts)
        last = "none" if forced == 0 else "x".join(map(str, model.schedule[forced - 1]))
        rows.append({"forced_scales": forced, "through_grid": last, "overall": scores["overall"], **scores["per_category"]})
        recorder.log(rows[-1])
    columns = list(rows[0])
    table = recorder.log_table("prefix_probe", columns, [[row[c] for c in columns] for row in rows])
    log.info("ShapesEval with the first k scales forced to the ground truth's bits:\n" + table)
    recorder.save_figure(prefix_curve(rows), "prefix_curve")
    return {
        "model": cfg.model.name, "num_prompts": len(prompts),
        "overall_by_forced_scales": [row["overall"] for row in rows],
        "rows": rows,
    }


def prefix_images(
    model: TextToImageModel, prompts: list[dict], sampling: SamplingConfig, seed: int, batch_size: int
) -> list[list[np.ndarray]]:
    """For k = 0 .. K: the prompts' images (H, W, 3) uint8 with the first k scales forced to the ground truth's bits.

    Batch i is sampled with seed + i, as experiment=generate does, so k = 0 is generate's images.
    """
    ground_truth = world_renders(prompts, model, seed)
    images: list[list[np.ndarray]] = [[] for _ in range(len(model.schedule) + 1)]
    for batch_index, start in enumerate(tqdm(range(0, len(prompts), batch_size), desc="prefix probe")):
        texts = [item["prompt"] for item in prompts[start : start + batch_size]]
        true_bits = ground_truth_bits(model, ground_truth[start : start + batch_size])
        for forced, forced_images in enumerate(images):
            result = generate(model, texts, sampling, seed=seed + batch_index, forced_codes=true_bits[:forced])
            forced_images += list(result.images.numpy())
    return images


def ground_truth_bits(model: TextToImageModel, renders: torch.Tensor) -> list[torch.Tensor]:
    """Every scale's bits (B, h, w, bits) of world renders (from world_renders), quantised by the model's VAE."""
    with torch.no_grad():
        _, bits = model.vae.quantize(model.vae.encode(renders), model.schedule)
    return bits


def world_renders(prompts: list[dict], model: TextToImageModel, seed: int) -> torch.Tensor:
    """One ground-truth render per prompt at the model's resolution: (N, 3, H, W) in [-1, 1] on its device."""
    height, width = model.image_size
    if height != width:
        raise UserError(f"prefix_probe renders square images; the model makes {height}x{width}")
    return render_tensor(prompts, seed, resolution=height).to(model.device)


def prefix_curve(rows: list[dict]) -> Figure:
    fig, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([row["forced_scales"] for row in rows], [row["overall"] for row in rows], marker="o")
    axis.set_xticks([row["forced_scales"] for row in rows], [row["through_grid"] for row in rows])
    axis.set(xlabel="ground truth forced through scale", ylabel="ShapesEval", ylim=(0, 1.02),
             title="where the model loses the image")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    return fig
