"""The offline shapes world: seeded text-image pairs whose prompts follow GenEval's metadata format.

Every prompt is a GenEval metadata dict (the lines of GenEval's evaluation_metadata.jsonl), with the
six GenEval tags and GenEval's caption templates, over a small closed world of coloured shapes:

    {"tag": "position",
     "include": [{"class": "circle", "count": 1},
                 {"class": "square", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a square right of a circle"}

Images are built to pass through the three stages of a next-scale generator, as real images do at
Infinity's scale: which objects, colours, counts and places (semantics) show at the coarse scales; shape
geometry (structure) at the middle ones, since objects are large (20-34 px of 64, 5-8 tokens of the
16x16 latent); and only fine detail is left for the last ones: a faint high-frequency wave (periods of
8-13 px, finer than an 8x8 token grid can hold) over smooth low-saturation backgrounds and smooth object
fills. Objects are strongly saturated and the background is not, so ShapesEval can segment them without
learned weights. A scene shows exactly the
objects its prompt asks for; attributes the prompt leaves open (colour, size, place) are random.

    python -m evals.shapes_world --write-suite    # regenerates evals/data/shapes_eval_metadata.jsonl
    python -m evals.shapes_world --write-suite --path dev.jsonl --seed 7 --per-category 16
                                                  # another suite (e.g. to tune settings off the test suite;
                                                  # use it with prompts.path=dev.jsonl)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from errors import UserError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "yellow", "green", "cyan", "blue", "purple")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# Hues 60 degrees apart, so a generated colour may drift by up to ~25 degrees and still read right.
COLOR_HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "purple": 290.0}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}

ImageLike = np.ndarray | torch.Tensor | Image.Image

SUITE_PATH = Path(__file__).parent / "data" / "shapes_eval_metadata.jsonl"

# Geometry, in pixels of a 64 x 64 image (scaled for other resolutions).
OBJECT_SIZE_RANGE = (20, 34)
MAX_OBJECT_SIZE_BY_COUNT = {1: 34, 2: 30, 3: 24, 4: 22}  # more objects must fit without overlap
OBJECT_GAP = 3  # bounding boxes stay this far apart, so objects never touch even after a blur
BORDER = 2
# Scenes are drawn with a wider position margin than GenEval's 0.1, so every relation is clear-cut.
RENDER_POSITION_THRESHOLD = 0.2
GENEVAL_POSITION_THRESHOLD = 0.1

# Colour: objects are saturated (chroma = S * V >= 0.75 * 0.5), backgrounds are not (chroma <= 0.15).
HUE_JITTER = 6.0
OBJECT_SATURATION = (0.75, 1.0)
OBJECT_VALUE = (0.5, 1.0)
BACKGROUND_SATURATION_MAX = 0.15
BACKGROUND_VALUE = (0.3, 0.9)

NUM_FILL_PATTERNS = 256  # textures for object fills, cut at random offsets so no two objects look alike
FINE_WAVE_SHARE = 0.25  # of a texture's amplitude: faint, so the refinement stage adds detail, not structure
SUPERSAMPLING = 4  # shape masks are antialiased by averaging a finer grid


def plural(shape: str) -> str:
    """GenEval's plural rule: 'cross' -> 'crosses', 'circle' -> 'circles'."""
    return f"{shape}es" if shape.endswith("s") else f"{shape}s"


# ---------------------------------------------------------------- prompts (GenEval's six generators)


def _single_object(shape: str) -> dict:
    return {"tag": "single_object", "include": [{"class": shape, "count": 1}], "prompt": f"a photo of a {shape}"}


def _two_object(shape_a: str, shape_b: str) -> dict:
    return {
        "tag": "two_object",
        "include": [{"class": shape_a, "count": 1}, {"class": shape_b, "count": 1}],
        "prompt": f"a photo of a {shape_a} and a {shape_b}",
    }


def _counting(shape: str, count: int) -> dict:
    return {
        "tag": "counting",
        "include": [{"class": shape, "count": count}],
        "exclude": [{"class": shape, "count": count + 1}],
        "prompt": f"a photo of {COUNT_WORDS[count]} {plural(shape)}",
    }


def _colors(color: str, shape: str) -> dict:
    return {
        "tag": "colors",
        "include": [{"class": shape, "count": 1, "color": color}],
        "prompt": f"a photo of a {color} {shape}",
    }


def _position(shape_a: str, relation: str, shape_b: str) -> dict:
    # GenEval lists the reference object first; the second entry points at it by index.
    return {
        "tag": "position",
        "include": [{"class": shape_b, "count": 1}, {"class": shape_a, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of a {shape_a} {relation} a {shape_b}",
    }


def _color_attr(color_a: str, shape_a: str, color_b: str, shape_b: str) -> dict:
    return {
        "tag": "color_attr",
        "include": [
            {"class": shape_a, "count": 1, "color": color_a},
            {"class": shape_b, "count": 1, "color": color_b},
        ],
        "prompt": f"a photo of a {color_a} {shape_a} and a {color_b} {shape_b}",
    }


def _shape_pairs() -> list[tuple[str, str]]:
    return list(itertools.permutations(SHAPES, 2))


# For each tag: the prompt builder and every argument tuple it accepts (the whole prompt space).
PROMPT_SPACE: dict[str, tuple[Callable[..., dict], list[tuple]]] = {
    "single_object": (_single_object, [(shape,) for shape in SHAPES]),
    "two_object": (_two_object, _shape_pairs()),
    "counting": (_counting, list(itertools.product(SHAPES, COUNT_WORDS))),
    "colors": (_colors, list(itertools.product(COLORS, SHAPES))),
    "position": (_position, [(a, relation, b) for a, b in _shape_pairs() for relation in RELATIONS]),
    "color_attr": (
        _color_attr,
        [(ca, a, cb, b) for a, b in _shape_pairs() for ca, cb in itertools.permutations(COLORS, 2)],
    ),
}

VOCABULARY: list[str] = sorted(
    {
        word
        for build, arguments in PROMPT_SPACE.values()
        for args in arguments
        for word in build(*args)["prompt"].split()
    }
)


def sample_prompt(rng: np.random.Generator, tag: str | None = None) -> dict:
    """One GenEval metadata dict; `tag=None` draws the tag uniformly (the training caption distribution)."""
    if tag is None:
        tag = TAGS[rng.integers(len(TAGS))]
    if tag not in PROMPT_SPACE:
        raise UserError(f"unknown prompt tag {tag!r}; choose one of {', '.join(TAGS)}")
    build, arguments = PROMPT_SPACE[tag]
    return build(*arguments[rng.integers(len(arguments))])


def make_suite(num_per_category: int = 56, seed: int = 2026) -> list[dict]:
    """The fixed evaluation suite: `num_per_category` prompts per tag, in TAGS order.

    Each tag's prompt space is shuffled once and cycled, so small spaces (five single-object prompts)
    repeat evenly and large ones (600 colour-attribution prompts) are sampled without repeats.
    """
    rng = np.random.default_rng(seed)
    suite = []
    for tag in TAGS:
        build, arguments = PROMPT_SPACE[tag]
        order = rng.permutation(len(arguments))
        suite += [build(*arguments[order[i % len(order)]]) for i in range(num_per_category)]
    return suite


def write_suite(suite: list[dict], path: Path = SUITE_PATH) -> None:
    """Write a suite as GenEval's evaluation_metadata.jsonl: one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(metadata) + "\n" for metadata in suite))


# ---------------------------------------------------------------- geometry


def relations_between(box_a: tuple, box_b: tuple, threshold: float = GENEVAL_POSITION_THRESHOLD) -> set[str]:
    """Where box A lies relative to box B, by GenEval's rule; boxes are (x0, y0, x1, y1), y down.

    The centre offset is shrunk by `threshold` times the summed box sizes; a relation holds when the
    shrunk offset still points along its axis by more than half the offset's length.
    """
    offset, shrunk = [], []
    for axis in (0, 1):
        centre_a, centre_b = (box_a[axis] + box_a[axis + 2]) / 2, (box_b[axis] + box_b[axis + 2]) / 2
        summed_size = (box_a[axis + 2] - box_a[axis]) + (box_b[axis + 2] - box_b[axis])
        offset.append(centre_a - centre_b)
        shrunk.append(math.copysign(max(abs(offset[-1]) - threshold * summed_size, 0.0), offset[-1]))
    if max(abs(shrunk[0]), abs(shrunk[1])) < 1e-3:
        return set()
    length = math.hypot(*offset)
    dx, dy = shrunk[0] / length, shrunk[1] / length
    named = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {relation for relation, holds in named.items() if holds}


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) in [-1, 1]^2 (v down) lie inside the shape filling that square."""
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return np.ones_like(u, dtype=bool)
    if shape == "triangle":  # apex up
        return np.abs(u) <= (v + 1) / 2
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "cross":
        arm = 0.34
        return (np.abs(u) <= arm) | (np.abs(v) <= arm)
    raise UserError(f"unknown shape {shape!r}; the shapes world has {', '.join(SHAPES)}")


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Antialiased coverage (size, size) float32 in [0, 1] of a shape filling a size x size box."""
    fine = size * SUPERSAMPLING
    coords = (np.arange(fine) + 0.5) / fine * 2 - 1
    u, v = np.meshgrid(coords, coords)
    covered = _inside(shape, u, v).astype(np.float32)
    return covered.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean(axis=(1, 3))


def _pixels(length_at_64: float, resolution: int) -> int:
    return max(1, round(length_at_64 * resolution / 64))


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    left: int
    top: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.left + self.size, self.top + self.size


def _apart(box: tuple, others: list[tuple], gap: int) -> bool:
    return all(
        box[0] >= other[2] + gap or other[0] >= box[2] + gap or box[1] >= other[3] + gap or other[1] >= box[3] + gap
        for other in others
    )


def _clearly_related(box: tuple, reference: tuple, relation: str) -> bool:
    """The relation holds with a wide margin, and no other relation holds even with no margin at all."""
    return relation in relations_between(box, reference, RENDER_POSITION_THRESHOLD) and relations_between(
        box, reference, threshold=0.0
    ) == {relation}


def check_metadata(metadata: dict) -> None:
    """Raise a UserError unless `metadata` is a GenEval metadata dict about shapes-world objects."""
    if not isinstance(metadata, dict) or "include" not in metadata or "tag" not in metadata:
        raise UserError(f"prompt metadata {metadata!r} needs 'tag' and 'include' keys (GenEval's format)")
    for entry in metadata["include"] + metadata.get("exclude", []):
        if entry.get("class") not in SHAPES:
            raise UserError(
                f"class {entry.get('class')!r} in prompt {metadata.get('prompt')!r} is not a shape of the shapes "
                f"world ({', '.join(SHAPES)}); only shapes-world prompts can be rendered or scored"
            )
        if entry.get("color", COLORS[0]) not in COLORS:
            raise UserError(f"color {entry['color']!r} in prompt {metadata.get('prompt')!r}: use one of {COLORS}")
        if entry.get("position", RELATIONS)[0] not in RELATIONS:
            relation = entry["position"][0]
            raise UserError(f"relation {relation!r} in prompt {metadata.get('prompt')!r}: use one of {RELATIONS}")


def plan_scene(metadata: dict, rng: np.random.Generator, resolution: int = 64) -> list[SceneObject]:
    """Objects that satisfy the prompt unambiguously: exact counts, no overlap, clear relations."""
    check_metadata(metadata)
    wanted = [(entry["class"], entry.get("color")) for entry in metadata["include"] for _ in range(entry["count"])]
    if not 1 <= len(wanted) <= max(MAX_OBJECT_SIZE_BY_COUNT):
        raise UserError(f"prompt {metadata['prompt']!r} asks for {len(wanted)} objects; the world draws 1 to 4")
    # The world's position prompts hold a reference object (first) and one object related to it.
    relation = next((entry["position"][0] for entry in metadata["include"] if "position" in entry), None)
    smallest = _pixels(OBJECT_SIZE_RANGE[0], resolution)
    largest = _pixels(MAX_OBJECT_SIZE_BY_COUNT[len(wanted)], resolution)
    gap, border = _pixels(OBJECT_GAP, resolution), _pixels(BORDER, resolution)
    for _ in range(100):
        boxes: list[tuple] = []
        for size in rng.integers(smallest, largest + 1, len(wanted)).tolist():
            room = resolution - 2 * border - size + 1
            for u, v in rng.random((50, 2)).tolist():  # candidate corners, drawn at once for speed
                left, top = border + int(u * room), border + int(v * room)
                box = (left, top, left + size, top + size)
                related = relation is None or not boxes or _clearly_related(box, boxes[0], relation)
                if related and _apart(box, boxes, gap):
                    boxes.append(box)
                    break
            else:
                break  # this object found no room: start the layout again
        if len(boxes) == len(wanted):
            return [
                SceneObject(shape, color or COLORS[rng.integers(len(COLORS))], box[0], box[1], box[2] - box[0])
                for (shape, color), box in zip(wanted, boxes)
            ]
    raise RuntimeError(f"could not lay out {metadata['prompt']!r} at resolution {resolution}")


# ---------------------------------------------------------------- painting


def texture_fields(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) float32 patterns in [-1, 1]: a smooth random mix of a gradient and a slow wave, plus a
    faint fine wave (5-8 cycles across a 64 px image), the detail only the last scales can draw."""
    coords = np.linspace(-1, 1, size, dtype=np.float32)
    x, y = coords[None, None, :], coords[None, :, None]
    cycles_scale = size / 64  # wave frequencies are per 64 pixels, so patterns look alike at any resolution

    def per_pattern(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, (n, 1, 1)).astype(np.float32)

    def plane_wave(cycles_low: float, cycles_high: float) -> np.ndarray:
        """sin along a random direction; sin(a + b) = sin a cos b + cos a sin b keeps the sines 1-D (fast)."""
        frequency = np.pi * cycles_scale * per_pattern(cycles_low, cycles_high)  # coords span 2: pi per cycle
        angle = per_pattern(0, 2 * np.pi)
        along_x = frequency * np.cos(angle) * x + per_pattern(0, 2 * np.pi)
        along_y = frequency * np.sin(angle) * y
        return np.sin(along_x) * np.cos(along_y) + np.cos(along_x) * np.sin(along_y)

    angle = per_pattern(0, 2 * np.pi)
    gradient = np.cos(angle) * x + np.sin(angle) * y
    gradient_weight, wave_weight = per_pattern(0, 1), per_pattern(0, 1)
    smooth = (gradient_weight * gradient + wave_weight * plane_wave(0.3, 1.0)) / (gradient_weight + wave_weight)
    mixed = (1 - FINE_WAVE_SHARE) * smooth + FINE_WAVE_SHARE * plane_wave(5.0, 8.0)
    return np.clip(mixed, -1, 1)


@functools.lru_cache(maxsize=None)
def _fill_patterns(resolution: int) -> np.ndarray:
    # A fixed bank (its own seed), so object textures cost a crop instead of fresh trigonometry.
    return texture_fields(NUM_FILL_PATTERNS, _pixels(OBJECT_SIZE_RANGE[1], resolution), np.random.default_rng(0))


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """HSV -> RGB for hue in degrees; arrays broadcast, RGB is the new last axis.

    Written out because matplotlib's hsv_to_rgb is ~15x slower and training draws images by the million.
    """
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32) + hue[..., None] / 60.0) % 6  # R, G, B
    whiteness = np.clip(np.minimum(k, 4 - k), 0, 1)  # 1 - the fully saturated colour of this hue
    return value[..., None] * (1 - saturation[..., None] * whiteness)


def _paint_backgrounds(n: int, rng: np.random.Generator, resolution: int) -> np.ndarray:
    pattern = texture_fields(n, resolution, rng)
    hue = rng.uniform(0, 360, (n, 1, 1)).astype(np.float32)
    saturation = rng.uniform(0, BACKGROUND_SATURATION_MAX, (n, 1, 1)).astype(np.float32)
    contrast = rng.uniform(0.1, 0.35, (n, 1, 1)).astype(np.float32)
    value = rng.uniform(*BACKGROUND_VALUE, (n, 1, 1)).astype(np.float32) * (1 + contrast * pattern)
    return _hsv_to_rgb(hue, saturation, np.clip(value, 0, 1))


def _paint_object(canvas: np.ndarray, obj: SceneObject, rng: np.random.Generator) -> None:
    bank = _fill_patterns(canvas.shape[0])
    index, row, column = rng.integers(len(bank)), *rng.integers(0, bank.shape[1] - obj.size + 1, 2)
    pattern = bank[index, row : row + obj.size, column : column + obj.size]
    hue = np.float32(COLOR_HUES[obj.color] + rng.uniform(-HUE_JITTER, HUE_JITTER))
    saturation = np.float32(rng.uniform(*OBJECT_SATURATION))
    brightness, contrast = rng.uniform(0.7, 1.0), rng.uniform(0.1, 0.35)
    fill = _hsv_to_rgb(hue, saturation, np.clip(brightness + contrast * pattern, *OBJECT_VALUE))
    coverage = shape_mask(obj.shape, obj.size)[..., None]
    region = canvas[obj.top : obj.top + obj.size, obj.left : obj.left + obj.size]
    region += coverage * (fill - region)


def _render_float(metadatas: list[dict], rng: np.random.Generator, resolution: int) -> np.ndarray:
    """(n, H, W, 3) float32 in [0, 1]; backgrounds are painted for the whole batch at once."""
    scenes = [plan_scene(metadata, rng, resolution) for metadata in metadatas]
    canvases = _paint_backgrounds(len(metadatas), rng, resolution)
    for canvas, scene in zip(canvases, scenes):
        for obj in scene:
            _paint_object(canvas, obj, rng)
    return canvases


def render(metadata: dict, rng: np.random.Generator, resolution: int = 64) -> np.ndarray:
    """An image (H, W, 3) uint8 that shows the prompt."""
    return to_uint8_image(_render_float([metadata], rng, resolution)[0])


def render_tensor(metadatas: list[dict], seed: int, resolution: int = 64) -> torch.Tensor:
    """One render per prompt, drawn in order from one seeded generator: (n, 3, H, W) float32 in [-1, 1], from the
    uint8 images that `render` returns (so it is the ground truth a scorer sees)."""
    rng = np.random.default_rng(seed)
    pixels = np.stack([render(metadata, rng, resolution) for metadata in metadatas])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def sample_batch(n: int, seed: int, resolution: int = 64) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Training pairs: images (n, 3, H, W) float32 in [-1, 1], their captions and metadata; same seed, same batch."""
    rng = np.random.default_rng(seed)
    metadatas = [sample_prompt(rng) for _ in range(n)]
    images = _render_float(metadatas, rng, resolution) * 2 - 1
    channels_first = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return channels_first, [metadata["prompt"] for metadata in metadatas], metadatas


def to_uint8_image(image: ImageLike) -> np.ndarray:
    """(H, W, 3) uint8 from any image form used here.

    Accepted: a PIL image; uint8 (H, W, 3); float (H, W, 3) in [0, 1] (the world's canvases);
    float (3, H, W) in [-1, 1] (model outputs, as numpy or torch).
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = (array.transpose(1, 2, 0) + 1) / 2
    if array.ndim != 3 or array.shape[-1] != 3:
        raise UserError(
            f"expected an RGB image as (H, W, 3) uint8/float or (3, H, W) float in [-1, 1], got shape {array.shape}"
        )
    if array.dtype == np.uint8:
        return array
    return np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-suite", action="store_true", help="write an evaluation suite")
    parser.add_argument("--path", type=Path, default=SUITE_PATH, help="where to (default: the committed suite)")
    parser.add_argument("--seed", type=int, default=2026, help="the committed suite's is 2026")
    parser.add_argument("--per-category", type=int, default=56, help="prompts per category")
    arguments = parser.parse_args()
    if arguments.write_suite:
        suite = make_suite(arguments.per_category, arguments.seed)
        write_suite(suite, arguments.path)
        print(f"wrote {len(suite)} prompts to {arguments.path}")
    else:
        parser.print_help()
