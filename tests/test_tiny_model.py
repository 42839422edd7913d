"""The committed tiny model loads with no download, and a fixed seed reproduces its stored fingerprint.

Regenerate the fingerprint after retraining: `python tests/test_tiny_model.py --write`.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for the --write entry point

from accel.sampler import SamplingConfig, generate  # noqa: E402
from models.pipeline import TextToImageModel, load_tiny  # noqa: E402

FINGERPRINT = Path(__file__).parent / "fixtures" / "tiny_fingerprint.json"
PROMPTS = ["a photo of a red circle", "a photo of a blue square left of a yellow triangle"]


def fingerprint(model: TextToImageModel) -> dict:
    """Greedy bits (top-k 1: no sampling noise) of the coarse scales, and a 4x4 thumbnail of each image."""
    result = generate(model, PROMPTS, SamplingConfig(cfg=3.0, tau=1.0, top_k=1, top_p=0.0), seed=0)
    coarse_bits = torch.cat([bits.flatten() for bits in result.codes[:4]]).to(torch.uint8).numpy().tobytes()
    thumbnails = F.adaptive_avg_pool2d(result.images.permute(0, 3, 1, 2).float(), 4)
    return {"coarse_bits_sha256": hashlib.sha256(coarse_bits).hexdigest(), "thumbnails": thumbnails.round().tolist()}


def test_the_committed_tiny_model_reproduces_its_fingerprint():
    model = load_tiny("tiny", torch.device("cpu"), "checkpoints/tiny")
    expected, actual = json.loads(FINGERPRINT.read_text()), fingerprint(model)
    assert actual["coarse_bits_sha256"] == expected["coarse_bits_sha256"]
    # Fine scales may differ in a few near-tie bits across CPUs; the thumbnails stay within a few levels.
    difference = torch.tensor(actual["thumbnails"]) - torch.tensor(expected["thumbnails"])
    assert difference.abs().max() <= 12


if __name__ == "__main__" and "--write" in sys.argv:
    model = load_tiny("tiny", torch.device("cpu"), "checkpoints/tiny")
    FINGERPRINT.write_text(json.dumps(fingerprint(model)) + "\n")
    print(f"wrote {FINGERPRINT}")
