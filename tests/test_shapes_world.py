import json
import re

import numpy as np
import pytest
import torch
from matplotlib.colors import rgb_to_hsv

from errors import UserError
from evals.shapes_world import (
    COLORS,
    RELATIONS,
    SHAPES,
    SUITE_PATH,
    TAGS,
    VOCABULARY,
    make_suite,
    plan_scene,
    plural,
    relations_between,
    render,
    sample_batch,
    sample_prompt,
    to_uint8_image,
)


def test_committed_suite_is_make_suite_output():
    committed = [json.loads(line) for line in SUITE_PATH.read_text().splitlines()]
    assert committed == make_suite()


def test_suite_is_balanced_over_the_six_geneval_tags():
    suite = make_suite()
    assert len(suite) == 336
    assert {tag: sum(m["tag"] == tag for m in suite) for tag in TAGS} == {tag: 56 for tag in TAGS}
    # Large prompt spaces are sampled without repeats.
    position_prompts = [m["prompt"] for m in suite if m["tag"] == "position"]
    assert len(set(position_prompts)) == len(position_prompts)


def test_prompts_follow_geneval_metadata_format():
    rng = np.random.default_rng(0)
    for _ in range(20):
        counting = sample_prompt(rng, "counting")
        (include,), (exclude,) = counting["include"], counting["exclude"]
        assert exclude == {"class": include["class"], "count": include["count"] + 1}
        assert 2 <= include["count"] <= 4
        assert counting["prompt"].endswith(plural(include["class"]))

        position = sample_prompt(rng, "position")
        reference, related = position["include"]
        relation, target = related["position"]
        assert target == 0 and relation in RELATIONS
        assert position["prompt"] == f"a photo of a {related['class']} {relation} a {reference['class']}"

        color_attr = sample_prompt(rng, "color_attr")
        first, second = color_attr["include"]
        assert first["color"] != second["color"] and first["class"] != second["class"]
        assert color_attr["prompt"] == (
            f"a photo of a {first['color']} {first['class']} and a {second['color']} {second['class']}"
        )
    assert sample_prompt(rng, "single_object") in [
        {"tag": "single_object", "include": [{"class": shape, "count": 1}], "prompt": f"a photo of a {shape}"}
        for shape in SHAPES
    ]
    assert list(sample_prompt(rng, "counting")) == ["tag", "include", "exclude", "prompt"]  # GenEval's key order


def test_vocabulary_covers_every_caption_word():
    assert len(set(VOCABULARY)) == len(VOCABULARY)
    assert all(re.fullmatch("[a-z]+", word) for word in VOCABULARY)
    expected = {*SHAPES, *map(plural, SHAPES), *COLORS, "two", "three", "four", "left", "right", "of", "above"}
    assert expected <= set(VOCABULARY)
    _, captions, _ = sample_batch(200, seed=1)
    assert {word for caption in captions for word in caption.split()} <= set(VOCABULARY)


def test_sample_batch_is_deterministic_in_seed():
    images, captions, metadatas = sample_batch(16, seed=3)
    again, captions_again, _ = sample_batch(16, seed=3)
    other, captions_other, _ = sample_batch(16, seed=4)
    assert images.shape == (16, 3, 64, 64) and images.dtype == torch.float32
    assert -1 <= images.min() and images.max() <= 1
    assert torch.equal(images, again) and captions == captions_again
    assert not torch.equal(images, other) and captions != captions_other
    assert captions == [metadata["prompt"] for metadata in metadatas]


def test_training_captions_span_all_categories():
    _, _, metadatas = sample_batch(120, seed=0)
    assert {metadata["tag"] for metadata in metadatas} == set(TAGS)


def test_resolution_is_configurable():
    images, _, _ = sample_batch(2, seed=0, resolution=96)
    assert images.shape == (2, 3, 96, 96)
    assert render(make_suite()[0], np.random.default_rng(0), resolution=128).shape == (128, 128, 3)


@pytest.mark.parametrize("resolution", [64, 128])
def test_scenes_satisfy_their_prompt_unambiguously(resolution):
    rng = np.random.default_rng(7)
    for tag in TAGS:
        for _ in range(30):
            metadata = sample_prompt(rng, tag)
            scene = plan_scene(metadata, rng, resolution)
            for entry in metadata["include"]:
                matching = [obj for obj in scene if obj.shape == entry["class"]]
                assert len(matching) == entry["count"]  # exactly: no extra object of a prompt's class
                assert all(obj.color == entry.get("color", obj.color) for obj in matching)
            boxes = [obj.box for obj in scene]
            assert all(0 <= coordinate <= resolution for box in boxes for coordinate in box)
            for i, a in enumerate(boxes):
                for b in boxes[i + 1 :]:  # no two boxes overlap
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
            if tag == "position":
                relation = metadata["include"][1]["position"][0]
                assert relations_between(scene[1].box, scene[0].box) == {relation}


def test_geneval_relation_semantics():
    left, right = (0, 0, 10, 10), (20, 2, 30, 12)
    assert relations_between(right, left) == {"right of"}
    assert relations_between(left, right) == {"left of"}
    assert relations_between((0, 30, 10, 40), left) == {"below"}
    assert relations_between((3, 2, 13, 12), left) == set()  # too close to call
    assert relations_between((20, 20, 30, 30), left) == {"right of", "below"}  # diagonal: both


def test_objects_are_saturated_on_a_low_saturation_background_with_faint_fine_detail():
    images, _, _ = sample_batch(32, seed=5)
    rgb = (images.permute(0, 2, 3, 1).numpy() + 1) / 2
    saturation = rgb_to_hsv(rgb)[..., 1]
    object_fraction = (saturation > 0.7).mean(axis=(1, 2))
    assert np.all(object_fraction > 0.02)  # every image shows objects
    assert np.all(((saturation > 0.16) & (saturation < 0.7)).mean(axis=(1, 2)) < 0.05)  # only edges in between
    # Not flat colour, but no grain either: neighbouring background pixels differ by a little.
    background_pairs = (saturation[:, :, 1:] < 0.16) & (saturation[:, :, :-1] < 0.16)
    step = np.abs(np.diff(rgb, axis=2)).mean(axis=-1)
    mean_step = (step * background_pairs).sum(axis=(1, 2)) / background_pairs.sum(axis=(1, 2))
    assert np.all(mean_step > 0.0005) and np.all(mean_step < 0.03)


def test_render_rejects_prompts_outside_the_world():
    rng = np.random.default_rng(0)
    dog = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
    with pytest.raises(UserError, match="'dog'"):
        render(dog, rng)
    pink = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "pink"}], "prompt": "x"}
    with pytest.raises(UserError, match="'pink'"):
        render(pink, rng)
    with pytest.raises(UserError, match="'portraits'"):
        sample_prompt(rng, "portraits")


def test_image_forms_convert_to_the_same_uint8_image():
    image = render(make_suite()[100], np.random.default_rng(0))
    as_model_output = torch.from_numpy(image).permute(2, 0, 1).float() / 255 * 2 - 1
    assert np.array_equal(to_uint8_image(as_model_output), image)
    assert np.array_equal(to_uint8_image(image.astype(np.float32) / 255), image)
    with pytest.raises(UserError, match="shape"):
        to_uint8_image(np.zeros((64, 64)))
