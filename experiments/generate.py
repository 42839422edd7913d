"""generate: images for the run's prompts with the configured model, and their scores where they exist.

Writes images/<index>.png (<index>_<sample>.png with prompts.samples_per_prompt > 1), a captioned contact sheet,
one results row per image, and:
- on the ShapesEval suite (prompts=shapes_eval), the GenEval-style table (per category and overall) and,
  with generate.fid, FID against ground-truth renders of the same prompts (one seeded world render each);
- on GenEval prompts (prompts=geneval), the images in GenEval's folder layout under geneval/, and on DPG-Bench
  prompts (prompts=dpg) in DPG-Bench's under dpg/, ready for the official scorers on a machine that has their
  models (experiments/import_scores.py brings their scores back).

Under torchrun every process makes its share of the batches; rank 0 merges, scores and writes the rest
(experiments/distributed.py). resume=<run folder> continues an interrupted run (experiments/image_batches.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from accel.sampler import SamplingConfig
from analysis.fid import (
    InceptionFeatures,
    MetricUnavailable,
    frechet_distance,
    frechet_distance_to,
    load_reference_statistics,
    reference_features,
)
from errors import UserError
from evals.prompt_files import BENCHMARK_LAYOUTS, export_benchmark_layout
from evals.prompts import load_prompts, spread
from evals.shapes_eval import evaluate
from evals.shapes_world import render
from experiments.config_checks import check_model, check_prompts, flag, positive_wholes, writable_folder
from experiments.image_batches import ImageSet, make_images
from experiments.recorder import RunRecorder
from experiments.world_preview import caption_grid
from models.pipeline import build_model

log = logging.getLogger(__name__)

SHARDED = True  # every process of a torchrun run makes its share of the batches
RESUMABLE = True  # resume=<run folder> keeps the images an interrupted run finished
BASELINE = "baseline"  # generate's images are the model's own: the baseline row of a benchmark table


def sampling_config(model_cfg: DictConfig) -> SamplingConfig:
    return SamplingConfig(**OmegaConf.to_container(model_cfg.sampling, resolve=True))


def check(cfg: DictConfig) -> None:
    check_model(cfg)
    check_prompts(cfg)
    check_benchmark_layout(cfg)
    positive_wholes(cfg.generate, "generate", ["contact_sheet_size", "grid_columns"])
    check_fid_reference(cfg)
    if flag("generate.fid", cfg.generate.fid) and cfg.prompts.name == "shapes_eval":
        writable_folder("paths.cache_dir", cfg.paths.cache_dir, "keep FID's reference features",
                        example="outputs/cache")


def check_fid_reference(cfg: DictConfig) -> None:
    """metrics.fid_reference: null, an .npz of Inception statistics or a folder of reference images."""
    reference = cfg.metrics.fid_reference
    if reference is None:
        return
    path = Path(str(reference))
    if not (path.is_dir() or (path.is_file() and path.suffix == ".npz")):
        raise UserError(f"metrics.fid_reference={reference!r} is neither an .npz of Inception statistics (mu, sigma) nor "
                        "a folder of reference images")
    if path.is_dir():
        writable_folder("paths.cache_dir", cfg.paths.cache_dir, "keep the reference images' Inception features",
                        example="outputs/cache")


def check_benchmark_layout(cfg: DictConfig) -> None:
    """DPG-Bench's grid holds at most 4 samples per prompt."""
    if cfg.prompts.name == "dpg" and cfg.prompts.samples_per_prompt > 4:
        raise UserError(f"prompts.samples_per_prompt={cfg.prompts.samples_per_prompt}: DPG-Bench scores a 2x2 grid, "
                        "at most 4 samples per prompt (its protocol: 4)")


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    prompts = load_prompts(cfg.prompts)
    image_set = ImageSet.of(cfg, prompts)
    samples, per_prompt = image_set.samples, image_set.samples_per_prompt
    model = build_model(cfg.model, cfg.device)
    sampling = sampling_config(cfg.model)
    log.info("%s: %d prompts x %d samples, %s px, sampling %s", cfg.model.name, len(prompts), per_prompt,
             model.image_size, sampling)
    recorder.processes.warn_if_idle(len(image_set.batches()))
    make_images(recorder, model, image_set, sampling, "images", row_fields={})
    if not recorder.processes.finish_share():
        return {}

    recorder.write_rows([{"index": sample["index"], "sample": sample["sample"], "prompt": sample["prompt"],
                          "seed": seed} for sample, seed in zip(samples, image_set.seeds())])
    images = image_set.load(recorder.run_dir / "images")
    summary: dict = {"model": cfg.model.name, "num_images": len(images), "samples_per_prompt": per_prompt,
                     "image_size": list(model.image_size)}
    shown = contact_sheet_positions(len(samples), cfg.generate.contact_sheet_size)
    passed = None
    if cfg.prompts.name == "shapes_eval":
        summary["shapes_eval"] = shapes_eval_table(images, samples, recorder)
        passed = [summary["shapes_eval"]["correct"][i] for i in shown]
        if cfg.generate.fid:
            try:
                summary["fid_vs_world"] = fid_against_world(images, samples, cfg.seed, torch.device(cfg.device),
                                                            Path(cfg.paths.cache_dir))
                log.info(f"FID against {len(samples)} ground-truth renders: {summary['fid_vs_world']:.2f}")
            except MetricUnavailable as reason:
                log.warning("METRIC LEFT OUT: fid (%s)", reason)
                summary["unavailable_metrics"] = {"fid": str(reason)}
    if cfg.metrics.fid_reference is not None:
        reference = load_reference_statistics(cfg.metrics.fid_reference, inception := InceptionFeatures(
            torch.device(cfg.device)), Path(cfg.paths.cache_dir))
        summary["fid_reference"] = frechet_distance_to(inception(images), reference)
        log.info(f"FID against {reference.source}: {summary['fid_reference']:.2f} ({len(images)} images)")
    captions = [samples[i]["prompt"] for i in shown]
    recorder.save_figure(caption_grid([images[i] for i in shown], captions, cfg.generate.grid_columns, passed),
                         "contact_sheet")
    if cfg.prompts.name in BENCHMARK_LAYOUTS:
        folder = recorder.run_dir / cfg.prompts.name
        export_benchmark_layout(cfg.prompts.name, folder, prompts, images, per_prompt)
        summary["exports"] = {cfg.prompts.name: {BASELINE: str(folder)}}
        log.info("%s layout written to %s: score it with the official scorer, then bring the scores back with "
                 "experiment=import_scores", cfg.prompts.name, folder)
    return summary


def contact_sheet_positions(count: int, size: int) -> list[int]:
    """Which of `count` images the contact sheet shows: `size` of them spread over the run (suites are sorted by
    category), not the first ones, so every category shows."""
    return spread(list(range(count)), size)


def shapes_eval_table(images: list, prompts: list[dict], recorder: RunRecorder) -> dict:
    """Score images against their prompts with ShapesEval; print and log the per-category table."""
    scores = evaluate(images, prompts)
    rows = [[tag, accuracy] for tag, accuracy in scores["per_category"].items()] + [["overall", scores["overall"]]]
    table = recorder.log_table("shapes_eval", ["category", "accuracy"], rows)
    log.info("ShapesEval (GenEval protocol):\n" + table)
    return scores


def fid_against_world(
    images: list[np.ndarray], prompts: list[dict], seed: int, device: torch.device, cache_dir: Path
) -> float:
    """FID of the images against one ground-truth render of each of their prompts (the world drawn with `seed`);
    the renders' features come from cache_dir after the first run on the same prompts and seed."""
    rng = np.random.default_rng(seed)
    renders = [render(prompt, rng) for prompt in prompts]
    inception = InceptionFeatures(device)
    return frechet_distance(inception(images), reference_features(inception, renders, cache_dir))
