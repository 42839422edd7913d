"""Image metrics on their own: direction, per-image values, input checks, the registry and its weight files."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from analysis.metrics import (
    GMSD, MSSSIM, SSIM, STLPIPS, ShapesCompositionPass, ShapesEvalPass, build_metrics, missing_files,
)
from errors import UserError
from evals.shapes_eval import load_suite
from evals.shapes_world import render

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def metrics_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", ["experiment=stage_probe", *overrides]).metrics


def smooth_images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Blurry random RGB images, uint8 (N, size, size, 3)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 8, size // 8, generator=generator)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (fine.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)


def with_noise(images: torch.Tensor, strength: float, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * 255 * strength
    return (images.float() + noise).clamp(0, 255).to(torch.uint8)


OFFLINE_METRICS = {"ssim": SSIM(), "ms_ssim": MSSSIM(), "gmsd": GMSD(), "st_lpips": STLPIPS()}


@pytest.mark.parametrize("name", OFFLINE_METRICS)
def test_identical_images_score_best_and_more_noise_scores_worse(name):
    metric = OFFLINE_METRICS[name]
    images = smooth_images(2)
    identical = metric(images, images)
    slightly, badly = metric(with_noise(images, 0.03), images), metric(with_noise(images, 0.3), images)
    assert identical.shape == (2,)
    best = 1.0 if metric.higher_is_better else 0.0
    assert identical.numpy() == pytest.approx([best, best], abs=1e-5)
    sign = 1 if metric.higher_is_better else -1
    assert (sign * (identical - slightly) > 0).all() and (sign * (slightly - badly) > 0).all()


def test_each_image_is_scored_against_its_own_reference():
    images = smooth_images(3)
    changed = images.clone()
    changed[1] = with_noise(images[1:2], 0.2)[0]
    values = SSIM()(changed, images)
    assert values[[0, 2]].numpy() == pytest.approx([1.0, 1.0], abs=1e-5) and values[1] < 0.9


def test_ms_ssim_uses_the_levels_the_image_size_allows():
    metric = MSSSIM(kernel_size=11)
    assert [metric.levels(size) for size in (11, 64, 161, 1024)] == [1, 3, 5, 5]
    with pytest.raises(ValueError, match="smaller than MS-SSIM's 11-pixel window"):
        metric(smooth_images(1, size=8), smooth_images(1, size=8))


def test_arrays_and_lists_of_images_are_accepted_and_wrong_inputs_refused():
    images = smooth_images(2)
    as_tensor = SSIM()(images, with_noise(images, 0.1))
    as_arrays = SSIM()(list(images.numpy()), with_noise(images, 0.1).numpy())
    assert torch.equal(as_tensor, as_arrays)
    with pytest.raises(ValueError, match=r"uint8 RGB images \(N, H, W, 3\)"):
        SSIM()(images.float(), images)
    with pytest.raises(ValueError, match="differ in shape"):
        SSIM()(images, smooth_images(2, size=32))


@pytest.mark.parametrize("metric", [ShapesEvalPass(), ShapesCompositionPass()], ids=["shapes_eval", "shapes_composition"])
def test_shapes_metrics_pass_ground_truth_renders_and_skip_other_prompts(metric):
    suite = load_suite()[:: len(load_suite()) // 4][:4]
    rng = np.random.default_rng(0)
    renders = np.stack([render(item, rng) for item in suite])
    assert metric(renders, suite).tolist() == [1.0] * 4
    assert metric(renders[:1], [{"prompt": "a photo of a bench", "tag": "single_object", "include": [{"class": "bench", "count": 1}]}]).isnan().all()
    assert metric.applies_to(suite[0]) and not metric.applies_to({"prompt": "a red cube"})


def test_the_composition_metric_passes_a_scene_whose_shapes_are_wrong():
    square = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "prompt": "a photo of a red square"}
    circle = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a photo of a red circle"}
    red_circle = render(circle, np.random.default_rng(0))[None]
    assert ShapesCompositionPass()(red_circle, [square]).tolist() == [1.0]
    assert ShapesEvalPass()(red_circle, [square]).tolist() == [0.0]


def test_the_offline_suite_is_the_default_and_builds_without_weights():
    metrics = build_metrics(metrics_config())
    assert list(metrics) == ["shapes_composition", "shapes_eval", "ms_ssim", "st_lpips", "ssim", "gmsd"]
    assert missing_files(metrics) == []
    kinds = {name: metric.kind for name, metric in metrics.items()}
    assert kinds == {"shapes_composition": "semantic", "shapes_eval": "structural", "ms_ssim": "structural",
                     "st_lpips": "structural", "ssim": "fidelity", "gmsd": "fidelity"}


def test_an_unknown_metric_name_lists_the_valid_ones():
    with pytest.raises(UserError, match="unknown metric.*'sharpness'") as error:
        build_metrics(metrics_config("metrics.names=[ssim,sharpness]"))
    for valid in ("clip_image", "clip_text", "dino", "lpips", "dists", "ssim", "ms_ssim", "gmsd", "st_lpips", "shapes_eval",
                  "shapes_composition"):
        assert valid in str(error.value)


def test_the_full_suite_names_every_weight_file_and_where_it_goes(tmp_path):
    metrics = build_metrics(metrics_config("metrics=full", f"paths.weights_dir={tmp_path}", f"metrics.torch_hub_dir={tmp_path}/hub"))
    lines = missing_files(metrics)
    checkpoints = tmp_path / "hub" / "checkpoints"
    expected = {
        "clip_image": tmp_path / "metrics/vit_large_patch14_clip_224.openai/open_clip_model.safetensors",
        "clip_text": tmp_path / "metrics/vit_large_patch14_clip_224.openai/open_clip_model.safetensors",
        "dino": tmp_path / "metrics/vit_base_patch14_dinov2.lvd142m/model.safetensors",
        "lpips": checkpoints / "alexnet-owt-7be5be79.pth",
        "dists": checkpoints / "dists_weights.pt",
    }
    for name, path in expected.items():
        assert any(line.startswith(f"metrics.catalog.{name}: {path}") for line in lines), (name, lines)
    assert any(str(checkpoints / "vgg16-397923af.pth") in line for line in lines)
    assert len(lines) == 6

    with pytest.raises(UserError, match="alexnet-owt-7be5be79.pth"):
        metrics["lpips"](smooth_images(1), smooth_images(1))  # used on its own, it still checks its files first


def test_a_weight_file_in_place_is_no_longer_missing(tmp_path):
    metrics = build_metrics(metrics_config("metrics=full", f"metrics.torch_hub_dir={tmp_path}"), names=["lpips"])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth").touch()
    assert missing_files(metrics) == []
