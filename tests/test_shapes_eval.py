import io

import numpy as np
import pytest
import torch
from scipy import ndimage

from errors import UserError
from evals.shapes_eval import composition_passes, detect_objects, evaluate, judge_image, load_suite, score_image
from evals.shapes_world import COLORS, SHAPES, make_suite, render, texture_fields

SUITE = load_suite()


@pytest.fixture(scope="module")
def suite_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [render(metadata, rng) for metadata in SUITE]


def _contradiction(metadata: dict) -> dict:
    """A prompt of the same category that an image of `metadata` cannot satisfy."""

    def next_of(options: tuple, current: str, avoid: tuple = ()) -> str:
        return next(option for option in options[options.index(current) + 1 :] + options if option not in avoid)

    tag, include = metadata["tag"], [dict(entry) for entry in metadata["include"]]
    if tag in ("single_object", "two_object"):
        used = tuple(entry["class"] for entry in include)
        include[-1]["class"] = next_of(SHAPES, include[-1]["class"], avoid=used)
    elif tag == "counting":
        include[0]["count"] = include[0]["count"] % 3 + 2  # 2 -> 3 -> 4 -> 2
    elif tag in ("colors", "color_attr"):
        used = tuple(entry["color"] for entry in include)
        include[0]["color"] = next_of(COLORS, include[0]["color"], avoid=used)
    elif tag == "position":
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        include[1]["position"] = [opposite[include[1]["position"][0]], 0]
    contradiction = {"tag": tag, "include": include, "prompt": "contradiction"}
    if tag == "counting":
        contradiction["exclude"] = [{"class": include[0]["class"], "count": include[0]["count"] + 1}]
    return contradiction


def test_default_suite_is_the_world_suite():
    assert SUITE == make_suite()


def test_ground_truth_renders_pass(suite_images):
    result = evaluate(suite_images, SUITE)
    assert result["num_images"] == 336
    assert result["overall"] >= 0.98
    assert min(result["per_category"].values()) >= 0.95
    assert list(result["per_category"]) == [
        "single_object", "two_object", "counting", "colors", "position", "color_attr"
    ]


def test_images_of_a_different_prompt_fail(suite_images):
    rng = np.random.default_rng(1)
    wrong_images = [render(_contradiction(metadata), rng) for metadata in SUITE]
    result = evaluate(wrong_images, SUITE)
    assert all(score <= 0.2 for score in result["per_category"].values()), result["per_category"]


def test_the_composition_reading_leaves_shapes_open_and_judges_counts_and_colours(suite_images):
    subset = range(0, 336, 4)
    assert all(composition_passes(suite_images[i], SUITE[i]) for i in subset)
    rng = np.random.default_rng(1)
    # Contradictions change a shape (single, two objects), a count, a colour, or a relation between two objects
    # that only their shapes tell apart, so only counts and colours can fail with shapes open.
    judged = {"counting", "colors", "color_attr"}
    for i in subset:
        contradiction = _contradiction(SUITE[i])
        image = render(contradiction, rng)
        assert composition_passes(image, SUITE[i]) == (SUITE[i]["tag"] not in judged), (SUITE[i], contradiction)


def test_the_composition_reading_counts_regions_that_look_like_no_shape():
    blob = np.full((64, 64, 3), 128, np.uint8)
    blob[20:44, 10:18] = blob[20:44, 40:48] = (220, 30, 30)  # two red bars: no shape's signature
    assert detect_objects(blob) == []
    assert composition_passes(blob, {"tag": "counting", "include": [{"class": "circle", "count": 2}],
                                     "exclude": [{"class": "circle", "count": 3}], "prompt": "two circles"})
    assert not composition_passes(blob, {"tag": "counting", "include": [{"class": "circle", "count": 3}],
                                         "exclude": [{"class": "circle", "count": 4}], "prompt": "three circles"})


def test_scores_are_identical_across_runs(suite_images):
    subset = slice(0, 336, 7)
    assert evaluate(suite_images[subset], SUITE[subset]) == evaluate(suite_images[subset], SUITE[subset])


def test_robust_to_blur_noise_and_colour_drift(suite_images):
    rng = np.random.default_rng(2)
    subset = slice(0, 336, 3)
    degraded = []
    for image in suite_images[subset]:
        blurred = ndimage.gaussian_filter(image.astype(np.float32), (0.7, 0.7, 0))
        drifted = blurred * np.array([0.95, 1.0, 1.08])  # a colour cast
        noisy = drifted + rng.normal(0, 8, image.shape)
        degraded.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    assert evaluate(degraded, SUITE[subset])["overall"] >= 0.9


# Hand-drawn images, independent of the world's renderer: flat shapes on a noisy grey background.

RGB = {"red": (220, 30, 30), "blue": (30, 40, 230), "green": (30, 200, 40)}


def _canvas() -> np.ndarray:
    return np.clip(np.random.default_rng(3).normal(128, 6, (64, 64, 3)), 0, 255).astype(np.uint8)


def _draw(image: np.ndarray, shape: str, color: str, centre: tuple[int, int], radius: int = 8) -> np.ndarray:
    y, x = np.mgrid[:64, :64]
    dx, dy = x - centre[0], y - centre[1]
    inside = {"circle": dx**2 + dy**2 <= radius**2, "square": (abs(dx) <= radius) & (abs(dy) <= radius)}[shape]
    image[inside] = RGB[color]
    return image


def _prompt(tag: str, *include: dict, exclude: list | None = None) -> dict:
    metadata = {"tag": tag, "include": list(include), "prompt": "hand-made"}
    return metadata | ({"exclude": exclude} if exclude else {})


def test_hand_drawn_scene_is_detected():
    image = _draw(_draw(_canvas(), "circle", "red", (16, 30)), "square", "blue", (46, 34))
    found = {(d.shape, d.color) for d in detect_objects(image)}
    assert found == {("circle", "red"), ("square", "blue")}


def test_swapped_relation_fails():
    image = _draw(_draw(_canvas(), "circle", "red", (16, 30)), "square", "blue", (46, 34))
    circle, square = {"class": "circle", "count": 1}, {"class": "square", "count": 1}
    assert score_image(image, _prompt("position", circle, square | {"position": ["right of", 0]}))
    assert not score_image(image, _prompt("position", circle, square | {"position": ["left of", 0]}))
    assert not score_image(image, _prompt("position", circle, square | {"position": ["above", 0]}))


def test_wrong_colour_fails():
    image = _draw(_canvas(), "circle", "green", (32, 32), radius=10)
    assert score_image(image, _prompt("colors", {"class": "circle", "count": 1, "color": "green"}))
    judgement = judge_image(image, _prompt("colors", {"class": "circle", "count": 1, "color": "red"}))
    assert not judgement.correct and "red" in judgement.reasons[0]


@pytest.mark.parametrize("drawn, passes", [(2, False), (3, True), (4, False)])
def test_counting_needs_exactly_n(drawn, passes):
    image = _canvas()
    for centre in [(14, 14), (48, 14), (14, 48), (48, 48)][:drawn]:
        _draw(image, "circle", "red", centre)
    three_circles = _prompt(
        "counting", {"class": "circle", "count": 3}, exclude=[{"class": "circle", "count": 4}]
    )
    assert score_image(image, three_circles) == passes


def test_empty_background_fails():
    texture = texture_fields(1, 64, np.random.default_rng(4))[0, ..., None]
    beige_texture = np.round(150 + 60 * texture * np.array([1.0, 0.93, 0.85])).astype(np.uint8)
    for background in (_canvas(), beige_texture):
        assert detect_objects(background) == []
        assert not score_image(background, SUITE[0])


def test_model_output_tensor_scores_like_uint8(suite_images):
    image = suite_images[200]
    as_model_output = torch.from_numpy(image).permute(2, 0, 1).float() / 255 * 2 - 1
    assert detect_objects(as_model_output) == detect_objects(image)


def test_several_images_per_prompt():
    image = _draw(_canvas(), "square", "blue", (32, 32))
    square = _prompt("single_object", {"class": "square", "count": 1})
    result = evaluate([image, _canvas()], [square, square])
    assert result["per_category"] == {"single_object": 0.5}
    assert result["correct"] == [True, False] and result["num_images"] == 2


def test_prompts_outside_the_world_are_refused():
    dog = _prompt("single_object", {"class": "dog", "count": 1})
    with pytest.raises(UserError, match="'dog'"):
        score_image(_canvas(), dog)


def test_a_one_pixel_line_is_no_shape(recwarn):
    image = _canvas()
    image[30, 10:50] = (255, 0, 0)  # 40 red pixels in a row: above the speck size, but no shape
    assert detect_objects(image) == []
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_contact_sheet_marks_each_image_pass_or_fail():
    from experiments.world_preview import caption_grid

    images = [np.zeros((8, 8, 3), dtype=np.uint8)] * 3
    fig = caption_grid(images, ["a photo of a circle"] * 3, columns=3, passed=[True, False, True])
    titles = [axis.title for axis in fig.axes]
    assert [t.get_text().split(":")[0] for t in titles] == ["pass", "fail", "pass"]
    assert titles[0].get_color() != titles[1].get_color()
    unmarked = caption_grid(images, ["a photo of a circle"] * 3, columns=3)
    assert unmarked.axes[0].title.get_text() == "a photo of a circle"


def test_a_large_grid_with_long_captions_stays_readable():
    from experiments.world_preview import GRID_MAX_INCHES, caption_grid

    images = [np.zeros((8, 8, 3), dtype=np.uint8)] * 96
    fig = caption_grid(images, ["a photo of a red circle and a blue square " * 8] * 96, columns=8)
    width, height = fig.get_size_inches()
    assert width <= GRID_MAX_INCHES[0] + 1e-6 and height <= GRID_MAX_INCHES[1] + 1e-6
    assert all(len(axis.title.get_text().splitlines()) <= 3 for axis in fig.axes)
    assert fig.axes[0].title.get_text().endswith("...")


def test_a_sheet_of_one_image_is_one_panel_wide_not_a_blank_row():
    from experiments.world_preview import caption_grid

    one = caption_grid([np.zeros((8, 8, 3), dtype=np.uint8)], ["a photo of a circle"], columns=8)
    full = caption_grid([np.zeros((8, 8, 3), dtype=np.uint8)] * 8, ["a photo of a circle"] * 8, columns=8)
    assert len(one.axes) == 1 and one.get_size_inches()[0] * 8 == pytest.approx(full.get_size_inches()[0])


def test_captions_the_font_cannot_draw_are_said_once_not_warned_per_glyph(caplog, recwarn):
    from experiments.world_preview import caption_grid

    fig = caption_grid([np.zeros((8, 8, 3), dtype=np.uint8)] * 2, ["一只猫", "a red circle"], columns=2)
    fig.savefig(io.BytesIO())  # drawing is where matplotlib warns about missing glyphs
    assert [axis.title.get_text() for axis in fig.axes] == ["???", "a red circle"]
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    assert [r.getMessage() for r in caplog.records if "cannot draw 一只猫" in r.getMessage()]
