"""train_tiny: train the embedded default model on the shapes world, from scratch or on from an exported model, on
a CPU or a GPU.

Phase 1 trains the BSQ-VAE (reconstruction through the multi-scale quantiser, straight-through gradients).
Phase 2 freezes it and trains the Infinity transformer and the word-level text encoder with teacher forcing
(bitwise cross-entropy, condition dropout for CFG, bitwise self-correction). Every batch is freshly drawn from
the world with a seed derived from the step, so a resumed run sees exactly the data it would have seen.

Progress survives interruption: `train_state.pt` in the run folder is rewritten atomically every
`train.checkpoint_every` steps, and Ctrl-C or SIGTERM stops the run after the current step with its state
saved; `train.resume=<run folder>` continues from it. A phase's `max_minutes` caps its wall-clock time: its
learning-rate schedule then follows elapsed time or steps, whichever is further along, so a capped phase still
ends with its rate decayed. At the end the weights are exported as safetensors (`train.export_dtype`) with
config.json to `train.export_dir` (checkpoints/tiny by default).

`train.init_from=<model folder>` starts instead from an exported model of the same architecture (fresh optimisers
and step counters, the phases' own warm-up). `train.vae.steps` must then be 0: the VAE stays as it is, as the
transformer trained on it needs.

On CUDA (`device=cuda`) the transformer runs under bf16 autocast, as Infinity trains, and world batches are
drawn by `train.data_workers` processes ahead of the GPU; the same code runs in fp32 on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from accel.sampler import SamplingConfig, generate, to_uint8
from errors import UserError
from evals.shapes_eval import evaluate, load_suite
from evals.shapes_world import BACKGROUND_SATURATION_MAX, VOCABULARY, render_tensor, sample_batch
from experiments.config_checks import config_differences, number, positive_wholes, whole
from experiments.recorder import RunRecorder
from models.checkpoint import save_safetensors
from models.pipeline import (
    REPO_ROOT, TINY_FILES, TextToImageModel, load_tiny, resolve_device, tiny_from_config, tiny_paths,
)

log = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    train = cfg.train
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(train.threads or torch.get_num_threads())
    device = resolve_device(cfg.device)
    if device.type == "cuda":  # TF32 for the parts that stay in fp32 (the VAE)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model_config = arch_config(train)
    # A resumed run's state keeps the folder its weights started from, and that folder's training record.
    state = {"vae": 0, "transformer": 0, "seconds": 0.0, "init_from": None, "previous_training": None}
    if train.init_from is None:
        model = tiny_from_config(model_config, "tiny", device)
        model.transformer.init_weights()
    else:  # check() has compared the folder's architecture with train.arch
        folder = repo_path(train.init_from)
        model = load_tiny("tiny", device, str(folder))
        state["init_from"] = str(folder)
        state["previous_training"] = json.loads((folder / "config.json").read_text()).get("training")
        log.info("starting from the weights of %s", folder)
    optimizers = {
        "vae": torch.optim.AdamW(model.vae.parameters(), lr=train.vae.lr, weight_decay=0.0),
        "transformer": torch.optim.AdamW(
            [*model.transformer.parameters(), *model.text_encoder.parameters()],
            lr=train.transformer.lr, weight_decay=train.transformer.weight_decay, betas=(0.9, 0.95),
        ),
    }
    if train.resume:
        state = load_state(Path(train.resume) / STATE_FILE, model, optimizers)
        carry_over_results(Path(train.resume) / "results.jsonl", recorder, state)
        log.info("resumed from %s at %s", train.resume, state)

    with stop_requests() as stop:
        for phase in PHASES:
            train_phase(phase, cfg, model, optimizers, state, recorder, stop)
            if phase == "vae":
                vae_scores = vae_reconstruction_scores(model, cfg.seed)
                log.info("ShapesEval of VAE reconstructions: %.3f %s", vae_scores["overall"], vae_scores["per_category"])

    export_dir = repo_path(train.export_dir)
    export(model, model_config, export_dir, cfg, state, getattr(torch, train.export_dtype))
    recorder.save_figure(loss_curves(recorder.run_dir / "results.jsonl"), "loss_curves")
    return {
        "export_dir": str(export_dir), "init_from": state.get("init_from"), "steps": {k: state[k] for k in PHASES},
        "train_seconds": state["seconds"],
        "vae_reconstruction_shapes_eval": {k: vae_scores[k] for k in ("overall", "per_category")},
    }


def arch_config(train: DictConfig) -> dict:
    """The architecture part of config.json: train.arch and the world's vocabulary."""
    return {**OmegaConf.to_container(train.arch, resolve=True), "vocabulary": VOCABULARY}


def repo_path(path: str) -> Path:
    """A folder setting (export_dir, init_from): relative paths are under the repository, whatever the working
    folder."""
    return Path(path) if os.path.isabs(path) else REPO_ROOT / path


def train_phase(
    phase: str, cfg: DictConfig, model: TextToImageModel, optimizers: dict[str, torch.optim.Optimizer], state: dict,
    recorder: RunRecorder, stop: threading.Event,
) -> None:
    """Run `phase` from step `state[phase]` to its last, logging every `train.log_every` steps and saving the
    state every `train.checkpoint_every` and when a stop is requested (then raising KeyboardInterrupt)."""
    train, phase_cfg, step_fn, optimizer = cfg.train, cfg.train[phase], PHASES[phase], optimizers[phase]
    if not phase_cfg.steps:  # train.vae.steps=0: the VAE of train.init_from stays as it is
        return
    modules = [model.vae] if phase == "vae" else [model.transformer, model.text_encoder]
    for module in modules:
        module.train()
    budget = phase_cfg.max_minutes * 60 if phase_cfg.max_minutes else math.inf
    seconds_key = f"{phase}_seconds"
    state.setdefault(seconds_key, 0.0)
    batches = world_batches(phase, cfg, first_step=state[phase], pin_memory=model.device.type == "cuda")
    bar = tqdm(range(state[phase], phase_cfg.steps), desc=f"train {phase}", initial=state[phase], total=phase_cfg.steps)
    for step, batch in zip(bar, batches):
        started = time.perf_counter()
        progress = max(step / phase_cfg.steps, state[seconds_key] / budget)
        set_learning_rate(optimizer, phase_cfg, step, progress)
        losses = step_fn(model, phase_cfg, to_device(batch, model.device), step, hash_seed(cfg.seed, phase, step))
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], phase_cfg.grad_clip)
        optimizer.step()
        state[phase] = step + 1
        elapsed = time.perf_counter() - started
        state["seconds"] += elapsed
        state[seconds_key] += elapsed
        out_of_time = state[seconds_key] >= budget
        row = {"phase": phase, "step": step + 1, **{k: v.item() for k, v in losses.items()}}
        if "curriculum" in phase_cfg:  # the scales the step trained on: losses of different prefixes differ
            row["scales"] = curriculum_entry(phase_cfg, step).scales or len(model.schedule)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if (step + 1) % train.log_every == 0 or out_of_time:
            recorder.log(row)
        if (step + 1) % train.checkpoint_every == 0 or step + 1 == phase_cfg.steps or stop.is_set() or out_of_time:
            save_state(recorder.run_dir / STATE_FILE, model, optimizers, state)
        if stop.is_set():
            log.info("stopped after %s step %d; continue with train.resume=%s", phase, step + 1, recorder.run_dir)
            raise KeyboardInterrupt
        if out_of_time:
            log.info("%s phase: max_minutes=%s reached after step %d", phase, phase_cfg.max_minutes, step + 1)
            break
    for module in modules:
        module.eval()
    save_samples(model, recorder, phase, cfg.seed)


def world_batches(
    phase: str, cfg: DictConfig, first_step: int, pin_memory: bool
) -> Iterator[tuple[Tensor, list[str]]]:
    """The phase's batches from `first_step` on, in step order: batch `step` is drawn from the world with a seed
    derived from the step (so a resumed run sees the same data), by `train.data_workers` processes ahead of the
    training loop (0: in this process)."""
    steps = range(first_step, cfg.train[phase].steps)
    workers = cfg.train.data_workers
    loader = torch.utils.data.DataLoader(
        WorldBatches(phase, cfg.train[phase], cfg.seed), batch_size=None, sampler=steps, num_workers=workers,
        prefetch_factor=4 if workers else None, pin_memory=pin_memory,
    )
    return iter(loader)


class WorldBatches(torch.utils.data.Dataset):
    """Step -> (images in [-1, 1], captions): the step's batch size, drawn with the step's seed."""

    def __init__(self, phase: str, phase_cfg: DictConfig, seed: int):
        self.phase, self.phase_cfg, self.seed = phase, phase_cfg, seed

    def __len__(self) -> int:
        return self.phase_cfg.steps

    def __getitem__(self, step: int) -> tuple[Tensor, list[str]]:
        size, seed = batch_size(self.phase_cfg, step), hash_seed(self.seed, self.phase, step)
        images, captions, _ = sample_batch(size, seed=seed)
        return images, captions


def batch_size(phase_cfg: DictConfig, step: int) -> int:
    return curriculum_entry(phase_cfg, step).batch_size if "curriculum" in phase_cfg else phase_cfg.batch_size


def curriculum_entry(phase_cfg: DictConfig, step: int) -> DictConfig:
    return phase_cfg.curriculum[step % len(phase_cfg.curriculum)]


def to_device(batch: tuple[Tensor, list[str]], device: torch.device) -> tuple[Tensor, list[str]]:
    images, captions = batch
    return images.to(device, non_blocking=True), captions


AUTOCAST_MODES = ("auto", "bf16", "fp32")


def autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for `mode` bf16, or auto on CUDA (Infinity trains in bf16); fp32 otherwise (on this CPU bf16
    autocast is ~150x slower than fp32)."""
    enabled = mode == "bf16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """Ctrl-C or SIGTERM (a scheduler's stop) sets the event instead of killing the loop mid-step: the loop
    finishes the step, saves its state and stops, so a resumed run loses nothing. A second one stops at once."""
    requested = threading.Event()

    def request(*_) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def hash_seed(seed: int, phase: str, step: int) -> int:
    return seed * 1_000_003 + (0 if phase == "vae" else 500_000_000) + step


def set_learning_rate(optimizer: torch.optim.Optimizer, phase_cfg: DictConfig, step: int, progress: float) -> None:
    """Linear warm-up over the first `warmup` steps, then cosine decay to `min_lr_ratio` of the peak as the
    phase's `progress` (0..1) goes on."""
    if step < phase_cfg.warmup:
        factor = (step + 1) / phase_cfg.warmup
    else:
        warmup_share = phase_cfg.warmup / max(1, phase_cfg.steps)
        after_warmup = min(1.0, max(0.0, (progress - warmup_share) / max(1e-9, 1 - warmup_share)))
        factor = phase_cfg.min_lr_ratio + (1 - phase_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * after_warmup))
    for group in optimizer.param_groups:
        group["lr"] = phase_cfg.lr * factor


# ----------------------------------------------------------------------------------------------------------
# Losses


def vae_step(
    model: TextToImageModel, phase_cfg: DictConfig, batch: tuple[Tensor, list[str]], step: int, seed: int
) -> dict:
    """Reconstruction through the multi-scale quantiser with straight-through gradients, plus commitment.

    The pixel loss weighs object pixels (and a 2-pixel band around them) `object_weight` times more than the
    background: a blurred corner turns a diamond into a circle for ShapesEval, a blurred background texture
    costs nothing, and a small decoder cannot afford to spend its capacity evenly.
    """
    images, _ = batch
    vae = model.vae
    latent = vae.encode(images)
    quantized, _ = vae.quantize(latent, model.schedule)
    straight_through = latent + (quantized - latent).detach()
    reconstruction = vae.decoder(straight_through)
    weights = 1 + (phase_cfg.object_weight - 1) * object_mask(images)
    error = reconstruction - images
    mse = (weights * error.square()).mean() / weights.mean()
    l1 = (weights * error.abs()).mean() / weights.mean()
    commitment = F.mse_loss(latent, quantized.detach())
    return {"loss": mse + l1 + phase_cfg.commitment * commitment, "mse": mse, "l1": l1, "commitment": commitment}


def object_mask(images: Tensor) -> Tensor:
    """(B, 1, H, W) 1 on and within 2 pixels of the world's objects: they are the saturated pixels (chroma
    above the background's maximum, see evals/shapes_world.py), images in [-1, 1]."""
    rgb = (images + 1) / 2
    chroma = rgb.amax(dim=1, keepdim=True) - rgb.amin(dim=1, keepdim=True)
    objects = (chroma > BACKGROUND_SATURATION_MAX + 0.05).float()
    return F.max_pool2d(objects, kernel_size=5, stride=1, padding=2)


def transformer_step(
    model: TextToImageModel, phase_cfg: DictConfig, batch: tuple[Tensor, list[str]], step: int, seed: int
) -> dict:
    """Teacher-forced bitwise cross-entropy over every token of the first `scales` scales of the curriculum
    entry for this step (all scales when `scales` is null), with bitwise self-correction; tokens on and around
    objects weigh `object_weight` times more.

    The per-token weights average over tokens, not scales: the last scales hold most tokens, and that is where
    a shape's edges are drawn. Most of the world's pixels are background, so without the object weight the loss
    is spent on the faint background wave rather than on the geometry that decides what a shape is.
    """
    images, captions = batch
    transformer, vae = model.transformer, model.vae
    schedule = model.schedule[: curriculum_entry(phase_cfg, step).scales or len(model.schedule)]
    num_tokens = sum(h * w for h, w in schedule)
    with torch.no_grad():  # the VAE stays in fp32: bf16 would move the signs that become the labels
        generator = torch.Generator().manual_seed(seed)
        flips = self_correction_flips(len(captions), model.schedule, vae.bits_per_token, phase_cfg.self_correction, generator)
        flips = [flip.to(images.device) for flip in flips]
        _, bits = vae.quantize(vae.encode(images), model.schedule, flips)
        corrupted = [scale_bits ^ flip.long() for scale_bits, flip in zip(bits, flips)]
        # A prefix of the scales is a complete block-causal sample: its inputs are a prefix of the full ones.
        scale_inputs = vae.teacher_forcing_inputs(corrupted, model.schedule)[:, : num_tokens - 1]
    with autocast(images.device, phase_cfg.autocast):
        tokens = model.text_encoder.encode(captions)
        features, lengths = tokens.features, tokens.lengths
        dropped = torch.rand(len(captions), device=images.device) < phase_cfg.cond_drop  # learn the null text for CFG
        features = torch.where(dropped[:, None, None], transformer.null_text(lengths, features.shape[1]), features)
        text = transformer.encode_text(features, lengths, with_null=False)
        logits = transformer(scale_inputs, text, schedule, model.rope_grid)  # head logits are fp32
    labels = torch.cat([b.flatten(1, 2) for b in bits[: len(schedule)]], dim=1)  # (B, L, bits)
    per_bit = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none").view(labels.shape)
    weights = object_token_weights(images, schedule, phase_cfg.object_weight)  # (B, L)
    loss = (per_bit.mean(dim=2) * weights).sum() / weights.sum()
    with torch.no_grad():
        accuracy = (logits.reshape(*labels.shape, 2).argmax(-1) == labels).float().mean()
    return {"loss": loss, "bit_accuracy": accuracy}


PHASES = {"vae": vae_step, "transformer": transformer_step}  # trained in this order


def object_token_weights(images: Tensor, schedule: list[tuple[int, int]], object_weight: float) -> Tensor:
    """(B, L) loss weight per token: `object_weight` where the token's cell touches an object or its 2-pixel band
    (see object_mask), 1 elsewhere."""
    mask = object_mask(images)
    cells = [F.adaptive_max_pool2d(mask, grid).flatten(1) for grid in schedule]
    return 1 + (object_weight - 1) * torch.cat(cells, dim=1)


def self_correction_flips(
    batch_size: int, schedule: list[tuple[int, int]], bits_per_token: int, max_probability: float,
    generator: torch.Generator,
) -> list[Tensor]:
    """Bits to flip for Infinity's bitwise self-correction: each sample draws a flip probability from
    {0, 0.01, ..., max_probability}, then every bit of every scale flips with it (bool (B, h, w, bits) per scale).

    At sampling time the transformer's inputs are its own imperfect bits, not the VAE's; trained only on the
    VAE's, a small model that gets a fifth of its bits wrong drifts into noise instead of repairing them.
    """
    steps = round(100 * max_probability)
    probability = torch.randint(0, steps + 1, (batch_size, 1, 1, 1), generator=generator) / 100
    return [torch.rand(batch_size, h, w, bits_per_token, generator=generator) < probability for h, w in schedule]


def check(cfg: DictConfig) -> None:
    """Fail before any training on settings that would otherwise fail mid-run."""
    train = cfg.train
    num_scales = len(train.arch.schedule)
    for key in ("threads", "data_workers"):
        whole(f"train.{key}", train[key], minimum=0)
    positive_wholes(train, "train", ["log_every", "checkpoint_every"])
    whole("train.vae.steps", train.vae.steps, minimum=0, why=" (0: keep the VAE of train.init_from)")
    positive_wholes(train.vae, "train.vae", ["batch_size"])
    positive_wholes(train.transformer, "train.transformer", ["steps"])
    for phase in PHASES:
        whole(f"train.{phase}.warmup", train[phase].warmup, minimum=0)
        number(f"train.{phase}.lr", train[phase].lr, 0, 1, low_open=True)
        if train[phase].max_minutes is not None:
            number(f"train.{phase}.max_minutes", train[phase].max_minutes, 0, float("inf"), low_open=True,
                   why=" or null (no cap)")
    if train.resume is not None and not (Path(train.resume) / STATE_FILE).is_file():
        raise UserError(f"train.resume={train.resume!r} has no {STATE_FILE}; pass the run folder of an earlier "
                        "train_tiny run")
    if train.transformer.autocast not in AUTOCAST_MODES:
        raise UserError(
            f"train.transformer.autocast={train.transformer.autocast!r}: use auto (bf16 on CUDA, fp32 on the CPU), "
            "bf16 or fp32"
        )
    if train.export_dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"train.export_dtype={train.export_dtype!r}: use float32, bfloat16 or float16")
    for entry in train.transformer.curriculum:
        if entry.batch_size < 1 or not (entry.scales is None or 1 <= entry.scales <= num_scales):
            raise UserError(
                f"train.transformer.curriculum entry {dict(entry)}: batch_size must be >= 1 and scales null "
                f"(all) or 1..{num_scales} (the schedule's length)"
            )
    if train.init_from is not None:
        if train.resume is not None:
            raise UserError("train.init_from and train.resume together: train.resume restores the interrupted run's "
                            "weights, and the folder they started from; drop train.init_from")
        check_init_from(train)
    check_vae_steps(train)


def check_init_from(train: DictConfig) -> None:
    """train.init_from is an exported model of train.arch's architecture (load_strict would refuse another, but
    only once the run had started)."""
    paths = tiny_paths(train.init_from, TINY_FILES)  # relative to the repository, as repo_path
    if missing := [str(path) for path in paths.values() if not path.is_file()]:
        raise UserError(f"train.init_from={train.init_from!r} is not an exported tiny model: it lacks "
                        f"{', '.join(missing)}; pass a folder train_tiny exported, e.g. checkpoints/tiny")
    wanted = arch_config(train)
    saved = json.loads(paths["config"].read_text())
    if differences := config_differences({key: saved.get(key) for key in wanted}, wanted):
        key, there, here = differences[0]
        source, advice = (
            ("the shapes world's vocabulary", "the world's words changed since its export: train a model anew")
            if key == "vocabulary" else
            (f"train.arch.{key}", "set train.arch to the folder's config (its schedule, transformer, vae and "
                                  "text_encoder) to continue it")
        )
        raise UserError(f"train.init_from={train.init_from!r} has another architecture than this run: {key} is "
                        f"{there!r} in {paths['config']} but {here!r} in {source}; {advice}")


def check_vae_steps(train: DictConfig) -> None:
    """The VAE trains on a fresh model only: a transformer is trained to predict its VAE's bits, so a VAE trained
    again under a trained transformer would leave it predicting bits of another code."""
    if train.resume is None:
        origin = train.init_from
    else:  # the folder the resumed run started from, if any
        state = torch.load(Path(train.resume) / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)["state"]
        origin = state.get("init_from")
    if origin is None and train.vae.steps == 0:
        raise UserError("train.vae.steps=0 keeps the VAE of train.init_from=<model folder>, but this run starts from "
                        "a fresh model, whose VAE must train: set train.vae.steps >= 1, or train.init_from")
    if origin is not None and train.vae.steps > 0:
        raise UserError(
            f"train.vae.steps={train.vae.steps}, but the weights start from the trained model {origin}: training its "
            "VAE again would change the bits its transformer predicts, and so invalidate the transformer; pass "
            "train.vae.steps=0"
        )


# ----------------------------------------------------------------------------------------------------------
# State, samples, export


def save_state(path: Path, model: TextToImageModel, optimizers: dict, state: dict) -> None:
    payload = {
        "state": state,
        "modules": {part: getattr(model, part).state_dict() for part in ("transformer", "vae", "text_encoder")},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_state(path: Path, model: TextToImageModel, optimizers: dict) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    for part, weights in payload["modules"].items():
        getattr(model, part).load_state_dict(weights)
    for name, opt in optimizers.items():
        opt.load_state_dict(payload["optimizers"][name])
    return payload["state"]


def carry_over_results(path: Path, recorder: RunRecorder, state: dict) -> None:
    """Copy the interrupted run's rows up to its checkpoint (later steps are redone), so the resumed run's
    results.jsonl and loss curves cover the whole training."""
    if path.exists():
        for row in map(json.loads, path.read_text().splitlines()):
            if row["step"] <= state[row["phase"]]:
                recorder.log(row)


def vae_reconstruction_scores(model: TextToImageModel, seed: int) -> dict:
    """ShapesEval of the VAE's multi-scale reconstructions of the suite's ground-truth renders: the ceiling
    any transformer on this VAE can reach."""
    suite = load_suite()
    renders = render_tensor(suite, seed)
    with torch.no_grad():
        quantized, _ = model.vae.quantize(model.vae.encode(renders.to(model.device)), model.schedule)
        reconstructions = to_uint8(model.vae.decode(quantized)).cpu()
    return evaluate(list(reconstructions.numpy()), suite)


def save_samples(model: TextToImageModel, recorder: RunRecorder, phase: str, seed: int) -> None:
    """A look at the phase's result: VAE reconstructions, or generations for fixed prompts."""
    images, captions, _ = sample_batch(8, seed=seed + 12345)
    images = images.to(model.device)
    with torch.no_grad():
        if phase == "vae":
            quantized, _ = model.vae.quantize(model.vae.encode(images), model.schedule)
            pictures = torch.cat((images, model.vae.decode(quantized)))
        else:
            generated = generate(model, captions, SamplingConfig(cfg=3.0, tau=1.0, top_p=0.0), seed=seed)
            pictures = torch.cat((images, generated.images.permute(0, 3, 1, 2).float() / 127.5 - 1))
    fig, axes = plt.subplots(2, 8, figsize=(16, 4.4))
    for axis, picture in zip(axes.flat, pictures):
        axis.imshow(((picture.permute(1, 2, 0) + 1) / 2).clamp(0, 1).cpu().numpy())
        axis.axis("off")
    for axis, caption in zip(axes[0], captions):
        axis.set_title(caption.removeprefix("a photo of "), fontsize=7)
    fig.suptitle("top: world; bottom: " + ("VAE reconstruction" if phase == "vae" else "generated, cfg 3"))
    recorder.save_figure(fig, f"samples_{phase}")


def export(
    model: TextToImageModel, model_config: dict, folder: Path, cfg: DictConfig, state: dict, dtype: torch.dtype
) -> None:
    """The weights as safetensors in `dtype` (loading casts them back to fp32) and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"steps": json.dumps({k: state[k] for k in ("vae", "transformer")})}
    for part in ("transformer", "vae", "text_encoder"):
        weights = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                   for name, tensor in getattr(model, part).state_dict().items()}
        save_safetensors(weights, folder / f"{part}.safetensors", metadata)
    config = {
        **model_config,
        "training": {"command": launch_command(), "init_from": state.get("init_from"),
                     "previous": state.get("previous_training"),  # the training record of init_from's model
                     "device": str(model.device), "steps": {k: state[k] for k in ("vae", "transformer")},
                     "train_seconds": round(state["seconds"]), "settings": OmegaConf.to_container(cfg.train, resolve=True)},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    log.info("exported the tiny model to %s", folder)


def launch_command() -> str:
    try:
        return " ".join(["python run.py", *HydraConfig.get().overrides.task])
    except ValueError:  # called outside a Hydra run (tests compose the config themselves)
        return "python run.py experiment=train_tiny"


def loss_curves(results_path: Path):
    """Each phase's logged loss against the step; the transformer's one line per curriculum prefix."""
    rows = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, phase in zip(axes, ("vae", "transformer")):
        by_prefix: dict[int | None, list[tuple[int, float]]] = {}
        for row in rows:
            if row.get("phase") == phase:
                by_prefix.setdefault(row.get("scales"), []).append((row["step"], row["loss"]))
        for scales, points in sorted(by_prefix.items(), key=lambda item: item[0] or 0):
            axis.plot(*zip(*points), label=None if scales is None else f"first {scales} scales")
        if len(by_prefix) > 1:
            axis.legend(fontsize=7)
        axis.set(title=f"{phase} loss", xlabel="step", yscale="log")
    fig.tight_layout()
    return fig
