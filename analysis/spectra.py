"""Frequency content of partial images: what each scale changes, band by band, and each image's power spectrum.

Frequencies are measured by their normalised radius: 1.0 is the Nyquist frequency along the shorter image
side (half a cycle per pixel), so the corners of the spectrum reach sqrt(2). Band edges [0.25, 0.5] give
three bands: [0, 0.25), [0.25, 0.5) and [0.5, sqrt(2)]. FFTs are orthonormal, so magnitudes do not grow
with the image size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601


def grayscale(images: Tensor) -> Tensor:
    """uint8 (N, H, W, 3) -> float luma (N, H, W) in [0, 1]."""
    return (images.float() / 255) @ torch.tensor(LUMA_WEIGHTS)


def check_band_edges(band_edges: Sequence[float]) -> None:
    increasing = list(band_edges) == sorted(set(band_edges))
    if not band_edges or not increasing or not 0 < band_edges[0] or not band_edges[-1] < math.sqrt(2):
        raise ValueError(f"band edges {list(band_edges)} must increase strictly, within (0, sqrt(2))")


def band_labels(band_edges: Sequence[float]) -> list[str]:
    """Names of the bands that `band_edges` cut: '0-0.25', '0.25-0.5', '0.5+'."""
    check_band_edges(band_edges)
    lows = [0.0, *band_edges]
    return [f"{low:g}-{high:g}" for low, high in zip(lows, band_edges)] + [f"{band_edges[-1]:g}+"]


def normalised_radius(height: int, width: int) -> Tensor:
    """(H, W) radius of every FFT frequency, 1.0 at the Nyquist frequency of the shorter side."""
    scale = min(height, width) / 2
    fy = torch.fft.fftfreq(height) * height
    fx = torch.fft.fftfreq(width) * width
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / scale


def band_change(previous: Tensor, current: Tensor, band_edges: Sequence[float]) -> Tensor:
    """Mean FFT magnitude of (current - previous) in each band: uint8 (N, H, W, 3) pairs -> (N, num_bands)."""
    check_band_edges(band_edges)
    change = torch.fft.fft2(grayscale(current) - grayscale(previous), norm="ortho").abs()
    band = torch.bucketize(normalised_radius(*change.shape[-2:]), torch.tensor(band_edges), right=True)
    return torch.stack([change[:, band == b].mean(-1) for b in range(len(band_edges) + 1)], dim=-1)


def radial_power_spectrum(images: Tensor) -> Tensor:
    """Radially averaged power |FFT|^2 of each image's luma at radii 0, 1, ... min(H, W) // 2 (in cycles per
    shorter side): uint8 (N, H, W, 3) -> (N, min(H, W) // 2 + 1)."""
    power = torch.fft.fft2(grayscale(images), norm="ortho").abs().square()
    height, width = power.shape[-2:]
    radius_bins = (normalised_radius(height, width) * min(height, width) / 2).round().long().flatten()
    num_bins = min(height, width) // 2 + 1
    inside = radius_bins < num_bins
    totals = torch.zeros(len(power), num_bins).index_add_(1, radius_bins[inside], power.flatten(1)[:, inside])
    counts = torch.bincount(radius_bins[inside], minlength=num_bins)
    return totals / counts
