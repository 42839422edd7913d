"""generate: images for the run's prompts with the configured model, and their scores where they exist.

Writes images/<index>.png, a captioned contact sheet, one results row per image, and:
- on the ShapesEval suite (prompts=shapes_eval), the GenEval-style table (per category and overall) and,
  with generate.fid, FID against ground-truth renders of the same prompts (one seeded world render each);
- on GenEval prompts (prompts=geneval), the images in GenEval's folder layout under geneval/, ready for the
  official scorer on a machine that has its detector.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from accel.sampler import SamplingConfig, generate
from evals.prompt_files import export_geneval_layout
from evals.prompts import load_prompts
from analysis.fid import InceptionFeatures, MetricUnavailable, frechet_distance
from evals.shapes_eval import evaluate
from evals.shapes_world import render
from experiments.config_checks import check_model, check_prompts, flag, positive_wholes
from experiments.recorder import RunRecorder
from experiments.world_preview import caption_grid
from models.pipeline import build_model

log = logging.getLogger(__name__)


def sampling_config(model_cfg: DictConfig) -> SamplingConfig:
    return SamplingConfig(**OmegaConf.to_container(model_cfg.sampling, resolve=True))


def check(cfg: DictConfig) -> None:
    check_model(cfg)
    check_prompts(cfg)
    positive_wholes(cfg.generate, "generate", ["contact_sheet_size", "grid_columns"])
    flag("generate.fid", cfg.generate.fid)


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    prompts = load_prompts(cfg.prompts)
    model = build_model(cfg.model, cfg.device)
    sampling = sampling_config(cfg.model)
    batch_size = cfg.model.batch_size
    log.info("%s: %d prompts, %s px, sampling %s", cfg.model.name, len(prompts), model.image_size, sampling)

    images = []
    batches = range(0, len(prompts), batch_size)
    for batch_index, start in enumerate(tqdm(batches, desc=f"generate ({batch_size} per batch)")):
        batch = prompts[start : start + batch_size]
        result = generate(model, [p["prompt"] for p in batch], sampling, seed=cfg.seed + batch_index, progress=True)
        for item, image in zip(batch, result.images):
            images.append(image.numpy())
            recorder.save_images([image.numpy()], [f"{item['index']:05d}"])
            recorder.log({"index": item["index"], "prompt": item["prompt"], "seed": cfg.seed + batch_index})

    summary: dict = {"model": cfg.model.name, "num_images": len(images), "image_size": list(model.image_size)}
    shown, passed = cfg.generate.contact_sheet_size, None
    if cfg.prompts.name == "shapes_eval":
        summary["shapes_eval"] = shapes_eval_table(images, prompts, recorder)
        passed = summary["shapes_eval"]["correct"][:shown]
        if cfg.generate.fid:
            try:
                summary["fid_vs_world"] = fid_against_world(images, prompts, cfg.seed, torch.device(cfg.device))
                log.info(f"FID against {len(prompts)} ground-truth renders: {summary['fid_vs_world']:.2f}")
            except MetricUnavailable as reason:
                log.warning("METRIC LEFT OUT: fid (%s)", reason)
                summary["unavailable_metrics"] = {"fid": str(reason)}
    captions = [p["prompt"] for p in prompts[:shown]]
    recorder.save_figure(caption_grid(images[:shown], captions, cfg.generate.grid_columns, passed), "contact_sheet")
    if cfg.prompts.name == "geneval":
        folder = recorder.run_dir / "geneval"
        export_geneval_layout(folder, prompts, [[image] for image in images])
        summary["geneval_export"] = str(folder)
        log.info("GenEval layout written to %s; score it with the official GenEval evaluator", folder)
    return summary


def shapes_eval_table(images: list, prompts: list[dict], recorder: RunRecorder) -> dict:
    """Score images against their prompts with ShapesEval; print and log the per-category table."""
    scores = evaluate(images, prompts)
    rows = [[tag, accuracy] for tag, accuracy in scores["per_category"].items()] + [["overall", scores["overall"]]]
    table = recorder.log_table("shapes_eval", ["category", "accuracy"], rows)
    log.info("ShapesEval (GenEval protocol):\n" + table)
    return scores


def fid_against_world(images: list[np.ndarray], prompts: list[dict], seed: int, device: torch.device) -> float:
    """FID of the images against one ground-truth render of each of their prompts (the world drawn with `seed`)."""
    rng = np.random.default_rng(seed)
    renders = [render(prompt, rng) for prompt in prompts]
    inception = InceptionFeatures(device)
    return frechet_distance(inception(images), inception(renders))
