"""Share of generated images that dissolved into colourful noise, per generate run folder.

A sample counts as noise when its saturated pixels (the world's object test: chroma above the background's
maximum) form more than 5 blobs of 4+ pixels; the world draws at most 4 objects.
    python results/2026-11-22_session3/noise_share.py outputs/generate/<run> [...]
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evals.shapes_world import BACKGROUND_SATURATION_MAX  # noqa: E402


def blob_count(path: Path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")) / 255.0
    labels, _ = ndimage.label(rgb.max(-1) - rgb.min(-1) > BACKGROUND_SATURATION_MAX + 0.05)
    return int((np.bincount(labels.ravel())[1:] >= 4).sum())


for run in sys.argv[1:]:
    counts = np.array([blob_count(path) for path in sorted(Path(run, "images").glob("*.png"))])
    print(f"{run}: {len(counts)} images, noise share {np.mean(counts > 5):.3f}")
