"""ShapesEval: GenEval's protocol on shapes-world images, with a weight-free detector.

GenEval detects objects with Mask2Former, names their colours with CLIP and then checks each prompt's
"include" and "exclude" clauses. Here the detector is plain image analysis, which the shapes world
makes reliable: objects are saturated and backgrounds are not.

- Detection: a pixel belongs to an object when it is saturated; it takes the palette colour nearest
  its hue; each connected region of one colour is an object, unless it is a speck. Its shape is the
  one whose signature (size-free features: box fill, hull fill, four-fold anisotropy, skewness,
  radial kurtosis, thickness) is nearest; a region near no signature is no object.
- Clause checks, as GenEval's: an include clause needs `count` objects of its class, of which the
  most confident `count` must have the colour and stand in the relation to the clause it points at;
  an exclude clause fails when at least `count` objects of its class are present (so a counting
  prompt passes only with exactly n).
- Scores: a category's score is the fraction of its images that pass; overall is the mean over the
  categories present.
- The composition reading (`composition_passes`): the same clauses with every object's shape left open,
  so only how many objects, which colours and where are judged. An image passes when some assignment of the
  prompt's classes to its objects (every saturated region that is no speck, a known shape or not) passes.
  It reads what a blurred partial image already shows before its geometry is sharp: the semantic stage of
  this world (README: "The shapes world's stages").

Made for the world's default 64 x 64 images (and larger); at 32 x 32 the smallest shapes are too
few pixels to tell apart reliably.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np
from matplotlib.colors import rgb_to_hsv
from scipy import ndimage
from scipy.spatial import ConvexHull

from evals.prompt_files import read_geneval_metadata
from evals.shapes_world import (
    COLOR_HUES,
    COLORS,
    GENEVAL_POSITION_THRESHOLD,
    OBJECT_SIZE_RANGE,
    SHAPES,
    SUITE_PATH,
    TAGS,
    ImageLike,
    check_metadata,
    relations_between,
    shape_mask,
    to_uint8_image,
)


@dataclass(frozen=True)
class ShapesEvalConfig:
    # Between the world's backgrounds (saturation <= 0.15) and objects (>= 0.75), a little below
    # half-way so that faded generated colours still count.
    saturation_threshold: float = 0.4
    # Objects have chroma (saturation x value) >= 0.375, backgrounds <= 0.15.
    chroma_threshold: float = 0.15
    # Smaller regions are specks, not objects (the smallest object covers ~1.7% of the image).
    min_area_fraction: float = 0.006
    # A region farther than this from every shape signature (see SIGNATURE_TOLERANCE) is no shape.
    max_signature_distance: float = 4.0
    position_threshold: float = GENEVAL_POSITION_THRESHOLD


@dataclass(frozen=True)
class Detection:
    shape: str | None  # None: a region near no shape's signature (kept only by open_shapes detection)
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels
    confidence: float  # 0 = equally like two shapes, 1 = exactly a signature


@dataclass(frozen=True)
class Judgement:
    correct: bool
    reasons: list[str]  # why it failed, in GenEval's wording
    detections: list[Detection]


# ---------------------------------------------------------------- detection


def _nearest_palette_color(hue: np.ndarray) -> np.ndarray:
    """Index into COLORS of the palette hue nearest each hue (degrees), going round the colour wheel."""
    palette = np.array([COLOR_HUES[color] for color in COLORS])
    distance = np.abs((hue[..., None] - palette + 180) % 360 - 180)
    return distance.argmin(axis=-1)


def _signature(region: np.ndarray) -> np.ndarray:
    """Shape features of a filled region cropped to its box, none of which depend on its size.

    box fill; hull fill (low for a cross); four-fold anisotropy (peakedness along the diagonals vs
    the axes: + for a square, - for a diamond or cross); skewness (a triangle's mass is lopsided);
    radial kurtosis (how far the mass spreads from the centre); thickness (the widest inscribed
    circle's radius over sqrt(area): thin for a cross, even when blur has filled its inner corners).
    """
    height, width = region.shape
    rows, columns = np.nonzero(region)
    # The hull of the pixels' corners, so a full box has hull area = pixel area.
    outline_rows, outline_columns = np.nonzero(region & ~ndimage.binary_erosion(region))
    corners = np.concatenate(
        [np.stack([outline_rows + dr, outline_columns + dc], axis=1) for dr in (0, 1) for dc in (0, 1)]
    )
    y, x = rows - rows.mean(), columns - columns.mean()

    def kurtosis(p: np.ndarray) -> float:
        return (p**4).mean() / (p**2).mean() ** 2

    def skewness(p: np.ndarray) -> float:
        return abs((p**3).mean()) / (p**2).mean() ** 1.5

    diagonal, anti_diagonal = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
    squared_radius = x**2 + y**2
    return np.array(
        [
            len(rows) / (height * width),
            len(rows) / ConvexHull(corners).volume,
            np.log((kurtosis(diagonal) + kurtosis(anti_diagonal)) / (kurtosis(x) + kurtosis(y))),
            max(skewness(x), skewness(y)),
            (squared_radius**2).mean() / squared_radius.mean() ** 2,
            ndimage.distance_transform_edt(np.pad(region, 1)).max() / np.sqrt(len(rows)),
        ]
    )


# How far each feature of a generated shape may stray from its signature per unit of distance:
# box fill, hull fill, four-fold anisotropy, skewness, radial kurtosis, thickness.
SIGNATURE_TOLERANCE = np.array([0.1, 0.05, 0.1, 0.15, 0.05, 0.04])


@functools.lru_cache(maxsize=1)
def shape_signatures() -> np.ndarray:
    """(len(SHAPES), number of features) mean signature of each shape.

    Measured on the world's own masks at every object size, sharp and blurred and cut at several
    levels, so that generated shapes with soft edges sit near their own signature.
    """
    means = []
    for shape in SHAPES:
        signatures = []
        for size in range(OBJECT_SIZE_RANGE[0], OBJECT_SIZE_RANGE[1] + 1):
            coverage = np.pad(shape_mask(shape, size), 3)
            for blur in (0.0, 0.7, 1.2):
                for level in (0.35, 0.5, 0.65):
                    region = ndimage.gaussian_filter(coverage, blur) > level
                    signatures.append(_signature(region[ndimage.find_objects(region.astype(int))[0]]))
        means.append(np.mean(signatures, axis=0))
    return np.array(means)


def _classify_shape(region: np.ndarray, config: ShapesEvalConfig) -> tuple[str, float] | None:
    if min(region.shape) < 2:  # a one-pixel line is no shape (and has no spread across it to measure)
        return None
    distances = np.linalg.norm((_signature(region) - shape_signatures()) / SIGNATURE_TOLERANCE, axis=1)
    nearest, runner_up = np.argsort(distances)[:2]
    if distances[nearest] > config.max_signature_distance:
        return None
    return SHAPES[nearest], float(1 - distances[nearest] / distances[runner_up])


def detect_objects(
    image: ImageLike, config: ShapesEvalConfig = ShapesEvalConfig(), open_shapes: bool = False
) -> list[Detection]:
    """The shapes in an image, most confident first; with `open_shapes` also the regions that look like no
    shape (shape None, confidence 0, last)."""
    hue, saturation, value = np.moveaxis(rgb_to_hsv(to_uint8_image(image).astype(np.float32) / 255), -1, 0)
    # Saturation ignores the fill texture's brightness, so its half-way level marks an object's true edge;
    # the chroma floor keeps noise in dark backgrounds (where saturation is unstable) out.
    foreground = (saturation > config.saturation_threshold) & (saturation * value > config.chroma_threshold)
    color_index = _nearest_palette_color(hue * 360)
    min_area = config.min_area_fraction * hue.size
    detections = []
    # Regions are split by colour first, so touching objects of different colours stay apart.
    for index, color in enumerate(COLORS):
        labels, _ = ndimage.label(foreground & (color_index == index), np.ones((3, 3)))
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            region = ndimage.binary_fill_holes(labels[box] == label)
            if region.sum() < min_area:
                continue
            shape, confidence = _classify_shape(region, config) or (None, 0.0)
            if shape is not None or open_shapes:
                rows, columns = box
                pixel_box = (columns.start, rows.start, columns.stop, rows.stop)
                detections.append(Detection(shape, color, pixel_box, confidence))
    return sorted(detections, key=lambda detection: -detection.confidence)


# ---------------------------------------------------------------- GenEval's clause checks


def _position_failure(
    found: list[Detection], targets: list[Detection] | None, relation: str, threshold: float
) -> str | None:
    """Every found object must stand in the relation to every target (GenEval's rule)."""
    if targets is None:
        return f"no target to be {relation}"
    for detection in found:
        for target in targets:
            actual = relations_between(detection.box, target.box, threshold)
            if relation not in actual:
                return f"expected {relation} target, found {' and '.join(sorted(actual)) or 'no clear relation'}"
    return None


def check_prompt(
    detections: list[Detection], metadata: dict, position_threshold: float = GENEVAL_POSITION_THRESHOLD
) -> list[str]:
    """GenEval's verdict on detections (most confident first): the reasons the prompt fails, [] if it passes."""
    check_metadata(metadata)
    by_class: dict[str, list[Detection]] = {}
    for detection in detections:
        by_class.setdefault(detection.shape, []).append(detection)
    reasons = []
    matched_groups: list[list[Detection] | None] = []
    for clause in metadata["include"]:
        shape, count = clause["class"], clause["count"]
        found = by_class.get(shape, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {shape}>={count}, found {len(found)}")
        elif "color" in clause:
            colors = [detection.color for detection in found]
            if colors.count(clause["color"]) < count:
                matched = False
                reasons.append(f"expected {clause['color']} {shape}>={count}, found {', '.join(colors)}")
        if matched and "position" in clause:
            relation, target_index = clause["position"]
            failure = _position_failure(found, matched_groups[target_index], relation, position_threshold)
            if failure:
                matched = False
                reasons.append(f"{shape}: {failure}")
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        present = len(by_class.get(clause["class"], []))
        if present >= clause["count"]:
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {present}")
    return reasons


def judge_image(image: ImageLike, metadata: dict, config: ShapesEvalConfig = ShapesEvalConfig()) -> Judgement:
    """Whether an image passes its prompt, why not, and what was detected."""
    detections = detect_objects(image, config)
    reasons = check_prompt(detections, metadata, config.position_threshold)
    return Judgement(correct=not reasons, reasons=reasons, detections=detections)


def score_image(image: ImageLike, metadata: dict, config: ShapesEvalConfig = ShapesEvalConfig()) -> bool:
    return judge_image(image, metadata, config).correct


# More objects than this on a two-class prompt is noise: 2^n assignments would be too many to try.
MAX_OPEN_SHAPE_OBJECTS = 12


def composition_passes(image: ImageLike, metadata: dict, config: ShapesEvalConfig = ShapesEvalConfig()) -> bool:
    """GenEval's clauses with the objects' shapes left open: does some assignment of the prompt's classes to the
    detected objects pass? Counts, colours and positions are judged; which shape each object is, is not."""
    objects = detect_objects(image, config, open_shapes=True)
    classes = sorted({clause["class"] for clause in metadata["include"]})
    if len(classes) > 1 and len(objects) > MAX_OPEN_SHAPE_OBJECTS:
        return False
    return any(
        not check_prompt([replace(o, shape=shape) for o, shape in zip(objects, shapes)], metadata,
                         config.position_threshold)
        for shapes in itertools.product(classes, repeat=len(objects))
    )


def evaluate(
    images: Iterable[ImageLike], metadatas: list[dict], config: ShapesEvalConfig = ShapesEvalConfig()
) -> dict:
    """Score images[i] against metadatas[i] (repeat a prompt's metadata for several images of it).

    Returns {"per_category": {tag: accuracy}, "overall": mean of the category accuracies,
    "num_images": n, "correct": [bool per image]}.
    """
    correct = [score_image(image, metadata, config) for image, metadata in zip(images, metadatas, strict=True)]
    by_tag: dict[str, list[bool]] = {}
    for metadata, passed in zip(metadatas, correct):
        by_tag.setdefault(metadata["tag"], []).append(passed)
    ordered_tags = [tag for tag in TAGS if tag in by_tag] + sorted(set(by_tag) - set(TAGS))
    per_category = {tag: float(np.mean(by_tag[tag])) for tag in ordered_tags}
    return {
        "per_category": per_category,
        "overall": float(np.mean(list(per_category.values()))) if per_category else float("nan"),
        "num_images": len(correct),
        "correct": correct,
    }


def load_suite(path: str | Path | None = None) -> list[dict]:
    """The evaluation prompts (GenEval metadata dicts); by default the committed shapes suite."""
    return read_geneval_metadata(SUITE_PATH if path is None else path)
