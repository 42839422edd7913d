"""A text-to-image next-scale model as the sampler sees it: transformer, VAE, text encoder and schedule.

`build_model(cfg.model, device)` instantiates the `_target_` of a `conf/model/*.yaml`: `load_infinity` for the
official Infinity-2B / 8B files, `load_var` for class-conditional VAR (d16-d36), `load_star` for STAR (text to
image at 256 / 512 / 1024 px), `load_tiny` for the small
default model committed under `checkpoints/tiny`. The transformer and tokenizer of every family offer the pieces
of models/family.py, so the one scale loop runs them all.
Every weight file is checked before anything is built, and a missing one is an error naming the file, the
config key that points at it, and the folder layout expected. `check_model_weights` reads only the files' headers
(tensor names and shapes) against a model built on the meta device, so a truncated, foreign or mis-shaped file is
refused in milliseconds, before a run starts (experiments/config_checks.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import hydra.utils
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from errors import UserError
from models.bsq_vae import BSQVAE, BSQVAEConfig, vae_checkpoint_name
from models.checkpoint import check_matches, load_strict, read_state_dict
from models.class_labels import ImageNetClassLabels
from models.family import MultiScaleTokenizer, NextScaleTransformer, TransformerCosts
from models.infinity import Infinity, InfinityConfig
from models.schedules import Grid, full_template, infinity_schedule, parse_schedule
from models.star import STAR, STARConfig
from models.text_encoder import (
    CLIPTextEncoder,
    RandomCLIPFeatures,
    T5TextEncoder,
    TextTokens,
    WordTextEncoder,
    WordTextEncoderConfig,
)
from models.var import VAR, VARConfig
from models.vqvae import VQVAE, VQVAEConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_SETTINGS = ("name", "sampling", "batch_size")  # model config keys read by experiments, not by builders


class PromptEncoder(Protocol):
    """Prompts -> what the transformer's `condition` reads: text tokens (Infinity, STAR) or class indices (VAR)."""

    def encode(self, prompts: list[str]) -> object: ...


@dataclass
class TextToImageModel:
    """A next-scale model of any family (models/family.py): prompts -> images through the one scale loop."""

    name: str
    transformer: NextScaleTransformer
    vae: MultiScaleTokenizer
    text_encoder: PromptEncoder
    schedule: list[Grid]  # token grids, one per scale
    rope_grid: Grid  # the grid RoPE coordinates are normalised to
    device: torch.device
    autocast_dtype: torch.dtype | None = None  # bf16 on CUDA, as the official inference

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.vae.latent_size(self.schedule[-1])
        return h * self.vae.stride, w * self.vae.stride

    def text_length(self, prompts: list[str]) -> int:
        """The padded text tokens cross-attention reads for these prompts (0 for class-conditional models)."""
        encoded = self.text_encoder.encode(prompts)
        return encoded.features.shape[1] if isinstance(encoded, TextTokens) else 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_model(model_cfg: DictConfig, device: str = "auto") -> TextToImageModel:
    """Instantiate the model described by a `conf/model/*.yaml` node."""
    kwargs = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if k not in RUN_SETTINGS}
    # Called directly rather than through hydra.utils.instantiate, which would wrap our UserErrors.
    builder = hydra.utils.get_method(kwargs.pop("_target_"))
    return builder(name=model_cfg.name, device=resolve_device(device), **kwargs)


def _resolve(weights_dir: str, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else Path(weights_dir) / path


def check_files(files: dict[str, Path], layout: str) -> None:
    """Raise one error listing every missing file, with its config key and the expected layout."""
    missing = [f"  model.files.{key}: {path}" for key, path in files.items() if not path.exists()]
    if missing:
        raise UserError(
            "missing model weights:\n" + "\n".join(missing) + "\nPut them under paths.weights_dir "
            "(or set STAGEVAR_WEIGHTS_DIR) like this:\n" + layout + "\nor point model.files.<key> at them."
        )


def missing_model_files(model_cfg: DictConfig) -> list[str]:
    """One line per weight file a `conf/model/*.yaml` node needs and lacks ('config key: path'), building nothing."""
    if hydra.utils.get_method(model_cfg._target_) is load_tiny:
        paths = tiny_paths(model_cfg.checkpoint_dir, model_cfg.files)
        return [f"model.files.{key}: {path}" for key, path in paths.items() if not path.exists()]
    if model_cfg.random_init:  # random weights; a missing text encoder only means random text features
        return []
    paths = {key: _resolve(model_cfg.weights_dir, value) for key, value in model_cfg.files.items()}
    return [f"model.files.{key}: {path}" for key, path in paths.items() if not path.exists()]


@dataclass(frozen=True)
class WeightFile:
    """One checkpoint file (model.files.<part>) and how its tensor names map onto the model part it fills."""

    part: str  # the TextToImageModel attribute: transformer, vae or text_encoder
    path: Path
    key: str | None = None  # where the weights sit inside a nested checkpoint
    rename: Callable[[str], str] | None = None
    ignore: tuple[str, ...] = ()

    @property
    def config_key(self) -> str:
        return f"model.files.{self.part}"

    @property
    def source(self) -> str:  # what errors name: the file and the key that points at it
        return f"{self.path} ({self.config_key})"

    def load_into(self, module: nn.Module) -> None:
        weights = read_state_dict(self.path, key=self.key, config_key=self.config_key)
        load_strict(module, weights, source=self.source, rename=self.rename, ignore=self.ignore)

    def check_against(self, module: nn.Module) -> None:
        """The file's tensor names and shapes against `module`'s (built on the meta device), its data unread."""
        header = read_state_dict(self.path, key=self.key, config_key=self.config_key, header_only=True)
        check_matches(module, header, source=self.source, rename=self.rename, ignore=self.ignore)


def load_or_initialise(
    transformer: nn.Module, vae: nn.Module, weight_files: list[WeightFile], random_init: bool
) -> None:
    """The official files loaded strictly into the transformer and the VAE, or (`random_init`, for timing without
    weights) the transformer's own random initialisation."""
    if random_init:
        transformer.init_weights()
        return
    parts = {"transformer": transformer, "vae": vae}
    for weight_file in weight_files:
        weight_file.load_into(parts[weight_file.part])


def text_encoder_or_random(
    folder: Path, make_encoder: Callable[..., PromptEncoder], device: torch.device,
    make_random: Callable[[], PromptEncoder],
) -> PromptEncoder:
    """The text encoder from its local folder; without the folder (a random-weight run), seeded random features,
    said loudly."""
    if folder.exists():
        return make_encoder(folder, device=device)
    log.warning("RANDOM TEXT FEATURES: %s not found; prompts are NOT encoded (timing only)", folder)
    return make_random()


def check_model_weights(model_cfg: DictConfig) -> None:
    """Every weight file of a `conf/model/*.yaml` node against the model's tensor names and shapes, from the files'
    headers (no tensor data is read, the model is built on the meta device). The files must exist
    (missing_model_files says)."""
    meta = torch.device("meta")
    if hydra.utils.get_method(model_cfg._target_) is load_tiny:
        paths = tiny_paths(model_cfg.checkpoint_dir, model_cfg.files)
        with meta:
            model = tiny_from_config(json.loads(paths["config"].read_text()), model_cfg.name, meta)
        weight_files = tiny_weight_files(paths)
        parts = {weight_file.part: getattr(model, weight_file.part) for weight_file in weight_files}
    elif model_cfg.random_init:
        return
    elif hydra.utils.get_method(model_cfg._target_) in (load_var, load_star):
        _, config = schedule_and_transformer(model_cfg)
        with meta:
            transformer = VAR(config) if isinstance(config, VARConfig) else STAR(config)
            parts = {"transformer": transformer, "vae": VQVAE(VQVAEConfig.vae_ch160v4096z32())}
        paths = {key: _resolve(model_cfg.weights_dir, name) for key, name in model_cfg.files.items()}
        weight_files = var_weight_files(paths) if isinstance(config, VARConfig) else star_weight_files(paths)
    else:
        make_transformer_config, make_vae_config = _ARCHS[model_cfg.arch]
        with meta:
            parts = {"transformer": Infinity(make_transformer_config()), "vae": BSQVAE(make_vae_config())}
        weight_files = infinity_weight_files({key: _resolve(model_cfg.weights_dir, name)
                                              for key, name in model_cfg.files.items()})
    for weight_file in weight_files:
        weight_file.check_against(parts[weight_file.part])


def schedule_and_transformer(model_cfg: DictConfig) -> tuple[list[Grid], TransformerCosts]:
    """The scale schedule and transformer config a `conf/model/*.yaml` node describes, building nothing
    (for checks before any compute). The tiny model's files must exist (missing_model_files says)."""
    builder = hydra.utils.get_method(model_cfg._target_)
    if builder is load_tiny:
        config = json.loads(tiny_paths(model_cfg.checkpoint_dir, model_cfg.files)["config"].read_text())
        return parse_schedule(config["schedule"]), _dataclass_from(InfinityConfig, config["transformer"])
    if builder is load_var:
        config = var_config(model_cfg.depth)
        return config.schedule, config
    if builder is load_star:
        config = star_config(model_cfg.resolution, model_cfg.depth)
        return config.schedule, config
    if model_cfg.arch not in _ARCHS:
        raise UserError(f"model.arch={model_cfg.arch!r} is unknown; choose one of {sorted(_ARCHS)}")
    make_transformer_config, _ = _ARCHS[model_cfg.arch]
    return infinity_schedule(model_cfg.h_div_w, model_cfg.pn), make_transformer_config()


# ----------------------------------------------------------------------------------------------------------
# Official Infinity


_ARCHS = {
    "2b": (InfinityConfig.infinity_2b, BSQVAEConfig.d32),
    "8b": (InfinityConfig.infinity_8b, BSQVAEConfig.d14_patchify),
}


def load_infinity(
    name: str,
    device: torch.device,
    arch: str,
    weights_dir: str,
    files: dict[str, str],
    pn: str = "1M",
    h_div_w: float = 1.0,
    random_init: bool = False,
    precision: str = "bf16",
) -> TextToImageModel:
    """Infinity-2B / 8B from the official files, or the same architecture with random weights.

    `files` names the transformer checkpoint (a .pth / .safetensors file or a sharded folder), the VAE
    checkpoint (weights under its 'vae' key) and the flan-t5-xl folder, relative to `weights_dir`.
    With `random_init` the transformer and VAE are random (for timing); the text encoder still loads from
    its folder when present, otherwise random text features stand in (logged loudly).
    """
    if arch not in _ARCHS:
        raise UserError(f"model.arch={arch!r} is unknown; choose one of {sorted(_ARCHS)}")
    if precision not in ("bf16", "fp32"):
        raise UserError(f"model.precision={precision!r} must be 'bf16' or 'fp32'")
    paths = {key: _resolve(weights_dir, value) for key, value in files.items()}
    layout = f"  {weights_dir}/\n" + "".join(f"    {p.relative_to(weights_dir) if p.is_relative_to(weights_dir) else p}\n" for p in paths.values())
    schedule = infinity_schedule(h_div_w, pn)
    make_transformer_config, make_vae_config = _ARCHS[arch]
    needed = {"text_encoder": paths["text_encoder"]} if random_init else paths
    if not random_init or paths["text_encoder"].exists():
        check_files(needed, layout)

    with device:  # built where it runs: a 2B model is not first made (and randomly initialised) on the CPU
        transformer, vae = Infinity(make_transformer_config()), BSQVAE(make_vae_config())
    load_or_initialise(transformer, vae, infinity_weight_files(paths), random_init)

    text_encoder = text_encoder_or_random(paths["text_encoder"], T5TextEncoder, device,
                                          lambda: RandomTextFeatures(transformer.config.text_channels))

    use_bf16 = precision == "bf16" and device.type == "cuda"
    transformer.to(device).eval()
    if use_bf16:
        transformer.blocks_to(torch.bfloat16)
    return TextToImageModel(
        name, transformer, vae.to(device).eval(), text_encoder, schedule,
        rope_grid=full_template(h_div_w)[-1], device=device, autocast_dtype=torch.bfloat16 if use_bf16 else None,
    )


def infinity_weight_files(paths: Mapping[str, Path]) -> list[WeightFile]:
    """The official transformer and VAE files (the T5 folder is transformers' to read)."""
    return [
        WeightFile("transformer", paths["transformer"], ignore=("*.zero_k_bias",)),
        WeightFile("vae", paths["vae"], key="vae", rename=vae_checkpoint_name),
    ]


class RandomTextFeatures:
    """Stand-in text encoder for timing without T5 weights: seeded random features, one token per word + eos."""

    max_length = 512

    def __init__(self, channels: int):
        self.channels = channels

    def encode(self, prompts: list[str]) -> TextTokens:
        lengths = torch.tensor([min(len(p.split()) + 1, self.max_length) for p in prompts])
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(len(prompts), int(lengths.max()), self.channels, generator=generator)
        mask = torch.arange(features.shape[1])[None, :] < lengths[:, None]
        return TextTokens(features * mask[..., None], lengths)


# ----------------------------------------------------------------------------------------------------------
# Class-conditional VAR


def var_config(depth: int) -> VARConfig:
    try:
        return VARConfig.of_depth(depth)
    except ValueError as error:
        raise UserError(f"model.depth={depth!r}: {error}") from None


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def codebook_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """VAR's and STAR's `model.precision`: the autocast dtype of their official scripts on CUDA (fp16); the CPU
    runs fp32."""
    if precision not in AUTOCAST_DTYPES:
        raise UserError(f"model.precision={precision!r} must be one of {list(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[precision] if device.type == "cuda" else None


def load_var(
    name: str,
    device: torch.device,
    depth: int,
    weights_dir: str,
    files: dict[str, str],
    random_init: bool = False,
    precision: str = "fp16",
) -> TextToImageModel:
    """VAR-d16 ... d36 from the official files (`var_d{depth}.pth`, `vae_ch160v4096z32.pth`, flat state dicts),
    or the same architecture with random weights (for timing). Prompts are ImageNet class indices or names."""
    autocast = codebook_autocast(precision, device)
    config = var_config(depth)
    paths = {key: _resolve(weights_dir, value) for key, value in files.items()}
    if not random_init:
        layout = f"  {weights_dir}/\n" + "".join(f"    {path.name}\n" for path in paths.values())
        check_files(paths, layout)
    with device:
        transformer, vae = VAR(config), VQVAE(VQVAEConfig.vae_ch160v4096z32())
    load_or_initialise(transformer, vae, var_weight_files(paths), random_init)
    return TextToImageModel(
        name, transformer.to(device).eval(), vae.to(device).eval(), ImageNetClassLabels(config.num_classes),
        config.schedule, rope_grid=config.schedule[-1], device=device, autocast_dtype=autocast,
    )


def var_weight_files(paths: Mapping[str, Path]) -> list[WeightFile]:
    return [WeightFile("transformer", paths["transformer"]), WeightFile("vae", paths["vae"])]


# ----------------------------------------------------------------------------------------------------------
# STAR


def star_config(resolution: int, depth: int) -> STARConfig:
    try:
        return STARConfig.release(resolution, depth)
    except ValueError as error:
        raise UserError(f"model.resolution={resolution!r}, model.depth={depth!r}: {error}") from None


def load_star(
    name: str,
    device: torch.device,
    resolution: int,
    depth: int,
    weights_dir: str,
    files: dict[str, str],
    random_init: bool = False,
    precision: str = "fp16",
) -> TextToImageModel:
    """STAR (Davinci-XLab/STAR-T2I) at 256 / 512 / 1024 px from the official files, or the same architecture with
    random weights (for timing).

    `files`, relative to `weights_dir`: the transformer (a training snapshot, its weights under
    `['trainer']['var_wo_ddp']`), VAR's `vae_ch160v4096z32.pth` and the CLIP folder (`tokenizer/`, `text_encoder/`).
    With `random_init` the transformer and VAE are random; the text encoder still loads from its folder when
    present, otherwise random text features stand in (logged loudly).
    """
    autocast = codebook_autocast(precision, device)
    config = star_config(resolution, depth)
    paths = {key: _resolve(weights_dir, value) for key, value in files.items()}
    layout = f"  {weights_dir}/\n" + "".join(f"    {path.name}{'/' if key == 'text_encoder' else ''}\n"
                                             for key, path in paths.items())
    needed = {"text_encoder": paths["text_encoder"]} if random_init else paths
    if not random_init or paths["text_encoder"].exists():
        check_files(needed, layout)
    with device:
        # The VAE keeps its 10-scale training config at every resolution (the file's ema_vocab_hit_SV has 10 rows);
        # the schedule (14 scales at 1024 px) reaches the tokenizer as an argument.
        transformer, vae = STAR(config), VQVAE(VQVAEConfig.vae_ch160v4096z32())
    load_or_initialise(transformer, vae, star_weight_files(paths), random_init)
    text_encoder = text_encoder_or_random(paths["text_encoder"], CLIPTextEncoder, device,
                                          lambda: RandomCLIPFeatures(config.text_channels))
    return TextToImageModel(
        name, transformer.to(device).eval(), vae.to(device).eval(), text_encoder, config.schedule,
        rope_grid=config.schedule[-1], device=device, autocast_dtype=autocast,
    )


def star_weight_files(paths: Mapping[str, Path]) -> list[WeightFile]:
    """The transformer inside the release's training snapshot and VAR's VAE (the CLIP folder is transformers')."""
    return [WeightFile("transformer", paths["transformer"], key="trainer.var_wo_ddp"), WeightFile("vae", paths["vae"])]


# ----------------------------------------------------------------------------------------------------------
# The tiny default model


# The files of a tiny checkpoint (model.files.<key>), relative to model.checkpoint_dir unless absolute.
TINY_FILES = {
    "config": "config.json",
    "transformer": "transformer.safetensors",
    "vae": "vae.safetensors",
    "text_encoder": "text_encoder.safetensors",
}


def load_tiny(
    name: str, device: torch.device, checkpoint_dir: str, files: dict[str, str] = TINY_FILES
) -> TextToImageModel:
    """The small Infinity trained on the shapes world (see checkpoints/tiny/README.md)."""
    paths = tiny_paths(checkpoint_dir, files)
    missing = [f"  model.files.{key}: {path}" for key, path in paths.items() if not path.exists()]
    if missing:
        raise UserError(
            "the tiny model's files are missing:\n" + "\n".join(missing) + "\nTrain it with "
            "`python run.py experiment=train_tiny`, restore checkpoints/tiny from git, or point model.checkpoint_dir "
            "(or model.files.<key>) at your files."
        )
    model = tiny_from_config(json.loads(paths["config"].read_text()), name, device)
    for weight_file in tiny_weight_files(paths):
        weight_file.load_into(getattr(model, weight_file.part))
    return model


def tiny_weight_files(paths: Mapping[str, Path]) -> list[WeightFile]:
    return [WeightFile(part, paths[part]) for part in ("transformer", "vae", "text_encoder")]


def tiny_paths(checkpoint_dir: str, files: Mapping[str, str]) -> dict[str, Path]:
    """Each tiny-model file's path: absolute as given, else under checkpoint_dir (itself relative to the repo)."""
    if unknown := set(files) - set(TINY_FILES):
        raise UserError(f"model.files has unknown keys {sorted(unknown)}; the tiny model's are {list(TINY_FILES)}")
    folder = Path(checkpoint_dir)
    folder = folder if folder.is_absolute() else REPO_ROOT / folder
    return {key: folder / files.get(key, default) for key, default in TINY_FILES.items()}


def tiny_from_config(config: dict, name: str, device: torch.device) -> TextToImageModel:
    """A freshly initialised tiny model from its config.json dict (used by training and loading)."""
    transformer = Infinity(_dataclass_from(InfinityConfig, config["transformer"]))
    vae = BSQVAE(_dataclass_from(BSQVAEConfig, config["vae"]))
    text_encoder = WordTextEncoder(config["vocabulary"], _dataclass_from(WordTextEncoderConfig, config["text_encoder"]))
    schedule = parse_schedule(config["schedule"])
    return TextToImageModel(
        name, transformer.to(device).eval(), vae.to(device).eval(), text_encoder.to(device).eval(),
        schedule, rope_grid=schedule[-1], device=device,
    )


def _dataclass_from(cls: type, values: dict) -> object:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UserError(f"unknown {cls.__name__} keys in config.json: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
