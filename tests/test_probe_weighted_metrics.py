"""The metrics that need weights, built with random weights: they test the plumbing (weight loading,
preprocessing, batching, per-image values) only. Their numbers are NOT CLIP, DINO or LPIPS values. The
weight-file checks are in tests/test_metrics.py."""

import hydra.utils
import pytest
import torch
import torchvision

from analysis.metrics import LPIPS, CLIPTextScore


def random_images(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("target", "settings"),
    [
        ("analysis.metrics.CLIPImageSimilarity", {"model": "ViT-S-32", "checkpoint": "unused"}),
        ("analysis.metrics.DINOSimilarity", {"model": "vit_small_patch16_224.dino", "checkpoint": "unused"}),
        ("analysis.metrics.LPIPS", {"net": "alex"}),
    ],
)
def test_random_weight_plumbing_gives_one_value_per_image_and_the_identity_value(target, settings):
    untrained = hydra.utils.get_class(target)(random_weights=True, **settings)
    assert untrained.required_files() == {}
    images = random_images(2)
    identical, different = untrained(images, images), untrained(images, images.flip(0))
    best = 1.0 if untrained.higher_is_better else 0.0
    assert identical.shape == (2,) and identical.numpy() == pytest.approx([best, best], abs=1e-4)
    assert not torch.allclose(different, identical, atol=1e-4)


def test_random_weight_plumbing_of_the_clip_text_score():
    untrained = CLIPTextScore(model="ViT-S-32", checkpoint="unused", random_weights=True)
    values = untrained(random_images(2), [{"prompt": "a red circle"}, {"prompt": "two blue squares"}])
    assert values.shape == (2,) and values.abs().max() <= 1.0


def test_lpips_loads_its_backbone_from_the_configured_torch_hub_folder(tmp_path):
    untrained_backbone = torchvision.models.squeezenet1_1(weights=None).state_dict()
    (tmp_path / "checkpoints").mkdir()
    torch.save(untrained_backbone, tmp_path / "checkpoints" / "squeezenet1_1-b8a52dc0.pth")  # the name torchvision expects
    metric = LPIPS(net="squeeze", hub_dir=str(tmp_path))
    assert list(metric.required_files()) == [tmp_path / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"]
    images = random_images(2)
    assert metric(images, images).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert torch.hub.get_dir() != str(tmp_path)  # torch hub points where it did before
