"""Scale schedules: which (h, w) token grid each next-scale step predicts.

Infinity has one 13-step template per aspect ratio; the resolutions 0.06M / 0.25M / 0.60M / 1M use the
first 7 / 10 / 12 / 13 steps of it. RoPE positions are always normalised to the last grid of the full (1M)
template, so a 0.06M run still uses the 64x64 coordinates of the 1:1 template.
"""

from __future__ import annotations

import math

from errors import UserError

Grid = tuple[int, int]

# 1M templates for h/w <= 1 (rows = token grids (h, w)); the h/w > 1 templates are their transposes.
_WIDE_TEMPLATES: dict[float, str] = {
    0.333: "1x1 2x2 2x6 3x9 5x15 7x21 9x27 12x36 15x45 18x54 24x72 30x90 37x111",
    0.4: "1x1 2x2 2x5 4x10 6x15 8x20 10x25 12x30 16x40 20x50 26x65 32x80 40x100",
    0.5: "1x1 2x2 2x4 3x6 5x10 8x16 11x22 15x30 19x38 23x46 30x60 37x74 45x90",
    0.571: "1x1 2x2 3x3 4x7 6x11 8x14 12x21 16x28 20x35 24x42 32x56 40x70 48x84",
    0.666: "1x1 2x2 2x3 4x6 6x9 10x15 14x21 18x27 22x33 26x39 32x48 42x63 52x78",
    0.75: "1x1 2x2 3x4 6x8 9x12 12x16 15x20 18x24 21x28 27x36 36x48 45x60 54x72",
    0.8: "1x1 2x2 3x3 4x5 8x10 12x15 16x20 20x25 24x30 28x35 36x45 44x55 56x70",
    1.0: "1x1 2x2 4x4 6x6 8x8 12x12 16x16 20x20 24x24 32x32 40x40 48x48 64x64",
}
_TRANSPOSED = {1.25: 0.8, 1.333: 0.75, 1.5: 0.666, 1.75: 0.571, 2.0: 0.5, 2.5: 0.4, 3.0: 0.333}
# The official list order: 1:1, then each tall template followed by its wide transpose. The nearest template
# is the first one at the least distance in this order, as the official argmin, so an exact tie (h/w 0.45,
# 0.5355, 0.775, 0.9) goes to the ratio nearer 1:1.
_OFFICIAL_ORDER = (1.0, *(ratio for tall, wide in _TRANSPOSED.items() for ratio in (tall, wide)))

NUM_STEPS_BY_PN = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def _parse(template: str) -> list[Grid]:
    return [tuple(int(v) for v in step.split("x")) for step in template.split()]  # type: ignore[misc]


def full_template(h_div_w: float) -> list[Grid]:
    """The 13-step 1M template whose aspect ratio is nearest to `h_div_w` (height / width)."""
    if isinstance(h_div_w, bool) or not isinstance(h_div_w, (int, float)) or not 0 < h_div_w < math.inf:
        raise UserError(f"model.h_div_w={h_div_w!r} must be a positive number (height / width)")
    nearest = min(_OFFICIAL_ORDER, key=lambda r: abs(r - h_div_w))  # min keeps the first of equal distances
    if nearest in _WIDE_TEMPLATES:
        return _parse(_WIDE_TEMPLATES[nearest])
    return [(w, h) for h, w in _parse(_WIDE_TEMPLATES[_TRANSPOSED[nearest]])]


def infinity_schedule(h_div_w: float, pn: str) -> list[Grid]:
    """Infinity's schedule for an aspect ratio and a resolution name (0.06M, 0.25M, 0.60M or 1M)."""
    if pn not in NUM_STEPS_BY_PN:
        raise UserError(f"model.pn={pn!r} is not a known resolution; choose one of {sorted(NUM_STEPS_BY_PN)}")
    return full_template(h_div_w)[: NUM_STEPS_BY_PN[pn]]


def parse_schedule(steps: list[list[int]] | list[int]) -> list[Grid]:
    """An explicit schedule from config: [[h, w], ...] or square sides [1, 2, 4, ...]."""
    grids = [tuple(s) if isinstance(s, (list, tuple)) else (int(s), int(s)) for s in steps]
    if not grids or any(len(g) != 2 or min(g) < 1 for g in grids):
        raise UserError(f"model.schedule must be a non-empty list of positive [h, w] grids, got {steps}")
    return [(int(h), int(w)) for h, w in grids]
