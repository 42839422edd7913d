"""A run's images in batches: shared by its processes, kept by a run that continues the folder.

The prompt samples (evals.prompts.prompt_samples) are cut into batches in order and batch b is generated with
seed + b, whatever the number of processes: batches, seeds and so the images are those of a one-process run (a
batch's numerics depend on its composition, so a batch is never split). Rank r of N makes batches r, r + N, ...
(experiments/distributed.py). Every image is saved whole or not at all and then gets its row, so a batch whose
images and rows are all in the folder (left by an interrupted attempt, continued with resume=<run folder>) is
not made again; a batch with anything missing is made again whole, giving the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from accel.sampler import Policy, SamplingConfig, generate
from evals.prompts import prompt_samples
from experiments.recorder import RunRecorder
from models.pipeline import TextToImageModel


@dataclass(frozen=True)
class Batch:
    number: int  # generated with seed + number
    samples: list[dict]


@dataclass(frozen=True)
class ImageSet:
    """The images of a run: its prompt samples in order, in batches of `batch_size`, batch b seeded with seed + b."""

    samples: list[dict]  # evals.prompts.prompt_samples
    samples_per_prompt: int
    batch_size: int
    seed: int

    @classmethod
    def of(cls, cfg: DictConfig, prompts: list[dict]) -> ImageSet:
        per_prompt = cfg.prompts.samples_per_prompt
        return cls(prompt_samples(prompts, per_prompt), per_prompt, cfg.model.batch_size, cfg.seed)

    def batches(self) -> list[Batch]:
        return [Batch(number, self.samples[start : start + self.batch_size])
                for number, start in enumerate(range(0, len(self.samples), self.batch_size))]

    def seeds(self) -> list[int]:
        """The seed each sample is generated with: seed + its batch number."""
        return [self.seed + position // self.batch_size for position in range(len(self.samples))]

    def name(self, sample: dict) -> str:
        """<prompt index>.png with one sample per prompt, <prompt index>_<sample>.png with several."""
        return f"{sample['index']:05d}" + ("" if self.samples_per_prompt == 1 else f"_{sample['sample']}")

    def load(self, folder: Path) -> list[np.ndarray]:
        """The images as make_images saved them in `folder` (PNG: the bytes as generated)."""
        return [np.asarray(Image.open(folder / f"{self.name(sample)}.png").convert("RGB")) for sample in self.samples]


def make_images(
    recorder: RunRecorder, model: TextToImageModel, images: ImageSet, sampling: SamplingConfig, folder: str,
    row_fields: dict, policy: Policy | None = None,
) -> None:
    """This process's share of the images, saved as <folder>/<name>.png, each followed by its row ({**row_fields,
    index, sample, prompt, seed}) in this process's rows; batches an earlier attempt finished are kept."""
    processes = recorder.processes
    kept = {(row["index"], row["sample"]) for row in recorder.earlier_rows
            if "sample" in row and all(row.get(key) == value for key, value in row_fields.items())}

    def finished(batch: Batch) -> bool:
        return all((sample["index"], sample["sample"]) in kept
                   and (recorder.run_dir / folder / f"{images.name(sample)}.png").is_file() for sample in batch.samples)

    every = images.batches()
    todo = [every[number] for number in processes.share(len(every)) if not finished(every[number])]
    label = row_fields.get("method", "images")
    per_batch = min(images.batch_size, len(images.samples))  # one image is one image, whatever the batch size
    for batch in tqdm(todo, desc=f"{label} ({per_batch} per batch)", disable=not processes.is_main):
        seed = images.seed + batch.number
        result = generate(model, [sample["prompt"] for sample in batch.samples], sampling, seed=seed, policy=policy,
                          progress=processes.is_main)
        recorder.save_partial_images([image.numpy() for image in result.images],
                                     [images.name(sample) for sample in batch.samples], subdir=folder)
        for sample in batch.samples:
            recorder.log_partial({**row_fields, "index": sample["index"], "sample": sample["sample"],
                                  "prompt": sample["prompt"], "seed": seed})
