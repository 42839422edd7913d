"""Stage detection on synthetic curves with known answers, and stages.json as the accelerated sampler reads it."""

import json
from dataclasses import asdict, astuple

import numpy as np
import pytest

from accel.policies import CFGDropPolicy, ModelSpec
from analysis.stages import (
    DecidedEvidence, StageBoundaries, StageRule, detect_stages, fed_boundaries, load_stages, settling_scale,
    write_stages,
)
from errors import UserError

RISING_FAST = [0.2, 0.8, 0.95, 0.99, 1.0, 1.0, 1.0]  # span 0.8: within 0.08 of the end from scale 2
FALLING_LATE = [0.9, 0.8, 0.6, 0.4, 0.2, 0.05, 0.0]  # span 0.9: within 0.09 of the end from scale 5
SCHEDULE = [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8], [12, 12], [16, 16]]


@pytest.mark.parametrize(
    ("curve", "tolerance", "expected"),
    [
        (RISING_FAST, 0.1, 2),
        (FALLING_LATE, 0.1, 5),
        (FALLING_LATE, 0.3, 4),  # a wider band settles earlier
        ([0.0, 1.0, 0.5, 0.5, 0.95, 0.5, 0.5], 0.1, 5),  # leaving the band again resets it
        ([0.3] * 7, 0.1, 0),  # a flat curve never moves
        ([0.0] * 6 + [1.0], 0.1, 6),  # only the last scale reaches the final value
        ([5.0], 0.1, 0),
    ],
)
def test_a_curve_settles_where_it_stays_near_its_final_value(curve, tolerance, expected):
    assert settling_scale(curve, tolerance) == expected


def test_the_rule_holds_on_random_curves():
    rng = np.random.default_rng(0)
    for _ in range(200):
        curve = rng.normal(size=rng.integers(2, 14)).cumsum()
        tolerance = rng.uniform(0, 0.5)
        k = settling_scale(curve, tolerance)
        band = tolerance * (curve.max() - curve.min())
        assert all(abs(value - curve[-1]) <= band for value in curve[k:])
        assert k == 0 or abs(curve[k - 1] - curve[-1]) > band


def test_a_stage_ends_when_its_slowest_metric_settles():
    boundaries = detect_stages(
        {"clip": RISING_FAST, "dino": [0.1, 0.5, 0.7, 0.9, 0.98, 1.0, 1.0]},
        {"lpips": FALLING_LATE, "ssim": [0.1, 0.2, 0.3, 0.5, 0.9, 0.97, 1.0]},
        StageRule(semantic_tolerance=0.1, structure_tolerance=0.1),
    )
    assert boundaries == StageBoundaries(semantic_end=4, structure_end=5, refinement_start=6)
    assert boundaries.semantics_settle_first
    assert [boundaries.stage(k) for k in range(7)] == ["semantic"] * 5 + ["structure", "refinement"]


def test_refinement_waits_for_semantics_when_structure_settles_first():
    boundaries = detect_stages({"clip": FALLING_LATE}, {"ssim": RISING_FAST}, StageRule())
    assert (boundaries.semantic_end, boundaries.structure_end, boundaries.refinement_start) == (5, 2, 6)
    assert not boundaries.semantics_settle_first


def test_a_curve_settling_only_at_the_last_scale_leaves_no_refinement_stage():
    boundaries = detect_stages({"clip": RISING_FAST}, {"ssim": [0.0] * 6 + [1.0]}, StageRule())
    assert boundaries.refinement_start == 7
    assert boundaries.empty_stages(7) == ["refinement"]


def test_empty_stages_are_named():
    assert StageBoundaries(2, 5, 6).empty_stages(7) == []
    assert StageBoundaries(5, 2, 6).empty_stages(7) == ["structure"]  # structure settled with semantics
    assert StageBoundaries(6, 6, 7).empty_stages(7) == ["structure", "refinement"]  # one stage: semantic only


@pytest.mark.parametrize("curve", [[], [0.1, float("nan"), 0.3]])
def test_curves_without_a_value_at_every_scale_are_refused(curve):
    with pytest.raises(ValueError, match="one finite value per scale"):
        settling_scale(curve, 0.1)


@pytest.mark.parametrize("key", ["semantic_tolerance", "structure_tolerance"])
def test_a_tolerance_outside_zero_to_one_names_its_key(key):
    with pytest.raises(UserError, match=f"stages.rule.{key}=1.5"):
        StageRule(**{key: 1.5})


def write_example(path, model="tiny", schedule=SCHEDULE, **evidence):
    ranks = {"source": "inputs", "energy": 0.95, "per_scale": [1, 4, 8, 10, 12, 14, 16],
             "fraction": [1.0, 1.0, 0.5, 0.28, 0.19, 0.1, 0.06], "aggregate": "p90"}
    return write_stages(
        path, model=model, schedule=schedule, boundaries=StageBoundaries(2, 5, 6), ranks=ranks, rule=StageRule(),
        semantic_curves={"clip_image": RISING_FAST}, structural_curves={"lpips": FALLING_LATE}, num_prompts=64,
        code_version="abc123", **evidence,
    )


def test_stages_file_round_trip_has_the_documented_keys(tmp_path):
    written = write_example(tmp_path / "stages.json")
    loaded = load_stages(tmp_path / "stages.json", "tiny", [tuple(grid) for grid in SCHEDULE])
    assert loaded == written
    assert (loaded["semantic_end"], loaded["structure_end"], loaded["refinement_start"]) == (2, 5, 6)
    assert loaded["rule"]["semantic_metrics"] == ["clip_image"] and loaded["rule"]["structure_tolerance"] == 0.1
    assert loaded["curves"] == {"clip_image": RISING_FAST, "lpips": FALLING_LATE}
    assert loaded["source"] == "model" and loaded["rule"]["fidelity_metrics"] == []
    assert loaded["ranks"]["per_scale"][-1] == 16
    assert loaded["evidence"] == "visible" and loaded["visible"] == asdict(StageBoundaries(2, 5, 6))
    assert loaded["decided"] is None


VISIBLE, DECIDED = StageBoundaries(2, 5, 6), StageBoundaries(4, 3, 5)


@pytest.mark.parametrize(
    ("evidence", "fed"),
    [("visible", VISIBLE), ("decided", DECIDED), ("both", StageBoundaries(4, 5, 6))],  # both: the later of each
)
def test_the_evidence_names_the_boundaries_the_sampler_reads(tmp_path, evidence, fed):
    decided = DecidedEvidence(
        DECIDED, continuations=2, curves={"clip_image": RISING_FAST, "lpips": FALLING_LATE},
        stderr={"clip_image": [0.1] * 6 + [float("nan")], "lpips": [0.0] * 7}, spread={}, spread_stderr={},
    )
    write_example(tmp_path / "stages.json", decided=decided, evidence=evidence)
    stages = load_stages(tmp_path / "stages.json", "tiny", SCHEDULE)
    assert stages["evidence"] == evidence
    assert (stages["semantic_end"], stages["structure_end"], stages["refinement_start"]) == astuple(fed)
    assert stages["visible"] == asdict(VISIBLE)  # both sets are kept, whichever is fed
    assert {key: stages["decided"][key] for key in stages["visible"]} == asdict(DECIDED)
    assert stages["decided"]["stderr"]["clip_image"][-1] is None  # a NaN (one prompt) is not JSON
    policy = CFGDropPolicy(ModelSpec("tiny", SCHEDULE, 2, 1), stages_file=str(tmp_path / "stages.json"))
    assert policy.refinement_start == fed.refinement_start


def test_decided_boundaries_are_needed_to_feed_them():
    with pytest.raises(ValueError, match="needs the decided boundaries"):
        fed_boundaries("both", VISIBLE, None)


@pytest.mark.parametrize(
    ("model", "schedule", "message"),
    [("infinity2b", SCHEDULE, "made for model 'tiny'"), ("tiny", SCHEDULE[:-1], "made for model 'tiny'")],
)
def test_stages_made_for_another_model_or_schedule_are_refused(tmp_path, model, schedule, message):
    write_example(tmp_path / "stages.json")
    with pytest.raises(UserError, match=message) as error:
        load_stages(tmp_path / "stages.json", model, schedule)
    assert f"experiment=stage_probe model={model}" in str(error.value)


def test_missing_or_broken_stages_files_say_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match="does not exist.*experiment=stage_probe model=tiny"):
        load_stages(tmp_path / "nowhere.json", "tiny", SCHEDULE)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_stages(tmp_path / "broken.json", "tiny", SCHEDULE)
    (tmp_path / "partial.json").write_text(json.dumps({"model": "tiny", "schedule": SCHEDULE}))
    with pytest.raises(UserError, match="lacks semantic_end"):
        load_stages(tmp_path / "partial.json", "tiny", SCHEDULE)
