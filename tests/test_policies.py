"""Acceleration policies in the one sampler, on a small random model of the real classes."""

import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from accel.policies import ModelSpec, build_policy, resize_tokens
from accel.sampler import Generation, SamplingConfig, generate
from accel.stagevar import dither_order, interpolate_from
from analysis.stages import StageBoundaries, StageRule, write_stages
from errors import UserError
from models.pipeline import TextToImageModel
from models.schedules import infinity_schedule

from helpers import ScaleRecorder, small_config, small_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "accel"
SCHEDULE = [1, 2, 4, 6, 8]
SIZES = [side * side for side in SCHEDULE]
PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]
SAMPLING = SamplingConfig(cfg=3.0, tau=1.0)


@pytest.fixture(scope="module")
def model() -> TextToImageModel:
    return small_model(small_config(SCHEDULE, depth=4))


@pytest.fixture(scope="module")
def baseline(model) -> Generation:
    return generate(model, PROMPTS, SAMPLING, seed=0)


def policy(model, name: str, **overrides):
    """The policy of conf/accel/<name>.yaml with some keys overridden, as `accel.<key>=<value>` would."""
    return build_policy(OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), overrides), model)


def run(model, accel_policy, decode: bool = True) -> tuple[Generation, list]:
    recorder = ScaleRecorder()
    result = generate(model, PROMPTS, SAMPLING, seed=0, policy=accel_policy, observers=[recorder], decode=decode)
    return result, recorder.records


def same(first: Generation, second: Generation) -> bool:
    return torch.equal(first.images, second.images) and torch.equal(first.latent, second.latent)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("none", {}),
        ("cfg_drop", {"refinement_start": len(SCHEDULE)}),
        ("stagevar", {"drop_cfg": False, "reduce_tokens": False}),
        ("stagevar", {"refinement_start": len(SCHEDULE)}),
        ("fastvar", {"cache_scale": 1, "prune_scales": [2, 3], "prune_ratios": [0.0, 0.0], "skip_last": 0}),
        ("skipvar", {"skip_last": 0, "cond_only_last": 0}),
    ],
)
def test_every_acceleration_off_is_bit_identical_to_the_baseline(model, baseline, name, overrides):
    assert same(run(model, policy(model, name, **overrides))[0], baseline)


@pytest.mark.parametrize("keep_branch", ["uncond", "cond"])
@pytest.mark.parametrize("stagevar_part_a", [{"reduce_tokens": False}, {"rank_ratio": 1.0}])
def test_stagevar_with_only_the_cfg_drop_equals_cfg_drop(model, keep_branch, stagevar_part_a):
    settings = {"refinement_start": -2, "keep_branch": keep_branch}
    cfg_drop = run(model, policy(model, "cfg_drop", **settings))[0]
    stagevar = run(model, policy(model, "stagevar", **settings, **stagevar_part_a))[0]
    assert same(stagevar, cfg_drop)


def test_cfg_drop_runs_one_row_per_prompt_in_the_refinement_scales(model, baseline):
    result, records = run(model, policy(model, "cfg_drop", refinement_start=-2))
    assert [r.inputs.shape[0] for r in records] == [4, 4, 4, 2, 2]
    assert records[-1].kv_lengths == [sum(SIZES)] * 4
    assert not same(result, baseline)


@pytest.mark.parametrize(
    ("sketch", "indices"),
    [("selection", "uniform_grid"), ("selection", "topk_norm"), ("selection", "leverage"), ("selection", "random"),
     ("gaussian", "uniform_grid"), ("orthonormal", "topk_norm")],
)
def test_stagevar_runs_r_tokens_and_restores_the_rest_from_the_previous_scale(model, sketch, indices):
    accel = policy(model, "stagevar", refinement_start=-2, rank_ratio=0.3, sketch=sketch, indices=indices,
                   restore_mode="bilinear", restore_from="previous")
    records = run(model, accel, decode=False)[1]
    ranks = [math.ceil(0.3 * M) for M in SIZES[-2:]]
    assert records[-1].kv_lengths == [sum(SIZES[:-2]) + sum(ranks)] * 4  # only the r tokens' K/V are cached
    for previous, record, rank in zip(records[-3:], records[-2:], ranks):
        assert record.hidden.shape == (2, record.grid[0] * record.grid[1], 64)  # null-text rows, full grid
        upsampled = resize_tokens(previous.hidden[-2:], previous.grid, record.grid, mode="bilinear")
        from_previous = (record.hidden == upsampled).all(-1).sum(1)
        assert from_previous.tolist() == [record.grid[0] * record.grid[1] - rank] * 2


def test_a_seeded_stagevar_policy_draws_the_same_projection_in_every_generation(model):
    accel = policy(model, "stagevar", rank_ratio=0.3, sketch="gaussian", indices="random")
    assert same(run(model, accel)[0], run(model, accel)[0])  # the policy reseeds at scale 0
    other_seed = policy(model, "stagevar", rank_ratio=0.3, sketch="gaussian", indices="random", seed=1)
    assert not same(run(model, accel)[0], run(model, other_seed)[0])


def test_stagevar_restoration_mode_is_used(model):
    area = run(model, policy(model, "stagevar", rank_ratio=0.3, restore_from="previous", restore_mode="area"),
               decode=False)[0]
    bicubic = run(model, policy(model, "stagevar", rank_ratio=0.3, restore_from="previous", restore_mode="bicubic"),
                  decode=False)[0]
    assert not torch.equal(area.latent, bicubic.latent)


def test_restoring_from_the_representatives_differs_from_the_previous_scale(model):
    previous = run(model, policy(model, "stagevar", rank_ratio=0.3, restore_from="previous"), decode=False)
    representatives = run(model, policy(model, "stagevar", rank_ratio=0.3, restore_from="representatives"), decode=False)
    assert not torch.equal(previous[0].latent, representatives[0].latent)
    assert previous[1][-1].kv_lengths == representatives[1][-1].kv_lengths  # the same tokens run


def test_interpolation_from_known_tokens_averages_the_neighbours_and_falls_back_beyond_reach():
    grid = (4, 4)
    known = torch.tensor([0, 2, 8, 10])  # the stride-2 sub-grid: (0, 0), (0, 2), (2, 0), (2, 2)
    x_of_known = (known % 4).float().view(1, 4, 1)
    fallback = torch.full((1, 16, 1), -1.0)
    filled = interpolate_from(x_of_known, known, grid, fallback).view(4, 4)
    assert torch.allclose(filled[:, 1], torch.ones(4))  # halfway between columns 0 and 2, symmetric weights
    assert (filled[:, 3] > 1.9).all() and (filled[:, 3] < 2.0).all()  # column 2, a little of the far column 0

    corner = torch.tensor([0, 1, 16, 17])  # four known tokens in the top-left corner of a 16 x 16 grid
    filled = interpolate_from(torch.ones(1, 4, 1), corner, (16, 16), torch.zeros(1, 256, 1)).view(16, 16)
    assert filled[0, 0] == 1 and filled[15, 15] == 0  # the far corner is beyond reach: fallback


def stages_file(tmp_path: Path, model_name: str, schedule: list, refinement_start: int, ranks: list[int]) -> str:
    path = tmp_path / "stages.json"
    write_stages(
        path, model=model_name, schedule=schedule,
        boundaries=StageBoundaries(refinement_start - 2, refinement_start - 1, refinement_start),
        ranks={"per_scale": ranks, "fraction": [r / M for r, M in zip(ranks, SIZES)], "energy": 0.9,
               "aggregate": "mean"},
        rule=StageRule(), semantic_curves={"clip": [0.0] * len(schedule)},
        structural_curves={"lpips": [0.0] * len(schedule)},
        num_prompts=4, code_version="test",
    )
    return str(path)


def test_stagevar_takes_the_refinement_start_and_ranks_from_the_stages_file(model, tmp_path):
    path = stages_file(tmp_path, "small", [[s, s] for s in SCHEDULE], refinement_start=2, ranks=[1, 2, 5, 9, 20])
    from_file = run(model, policy(model, "stagevar", stages_file=path, refinement_start=-1, rank_ratio=0.5))
    from_keys = run(model, policy(model, "stagevar", refinement_start=2, rank_ratio=0.5))
    assert same(from_file[0], from_keys[0])
    probe_ranks = run(model, policy(model, "stagevar", stages_file=path, ranks="probe"))[1]
    assert probe_ranks[-1].kv_lengths == [1 + 4 + 5 + 9 + 20] * 4


def test_a_stages_file_without_a_refinement_stage_warns_that_stagevar_changes_nothing(model, tmp_path, caplog):
    path = stages_file(tmp_path, "small", [[s, s] for s in SCHEDULE], refinement_start=len(SCHEDULE), ranks=[1] * 5)
    records = run(model, policy(model, "stagevar", stages_file=path))[0]
    assert "NO REFINEMENT STAGE" in caplog.text
    assert same(records, run(model, policy(model, "none"))[0])


def test_fastvar_caches_only_the_kept_tokens_in_the_pruned_blocks(model):
    accel = policy(model, "fastvar", cache_scale=1, prune_scales=[2, 3], prune_ratios=[0.5, 0.25], skip_last=1,
                   pruned_layers=[0.25, 0.75])
    result, records = run(model, accel)
    kept = 1 + 4 + (16 - 8) + (36 - 9)
    assert records[-1].kv_lengths == [1 + 4 + 16 + 36, kept, kept, 1 + 4 + 16 + 36]  # blocks 1 and 2 are pruned
    assert records[-1].plan.skip and result.codes[-1] is None
    assert [r.inputs.shape[0] for r in records[:-1]] == [4] * 4  # CFG untouched


def test_fastvar_defaults_are_the_published_setting_on_the_infinity_schedule():
    schedule = infinity_schedule(1.0, "1M")  # ..., 24, 32, 40, 48, 64
    accel = build_policy(OmegaConf.load(CONF / "fastvar.yaml"), ModelSpec("infinity2b", schedule, depth=32))
    plans = [accel.plan(k, grid, schedule) for k, grid in enumerate(schedule)]
    assert [k for k, plan in enumerate(plans) if plan.skip] == [11, 12]
    assert [k for k, plan in enumerate(plans) if plan.router is not None] == [8, 9, 10]
    assert [plans[9].router.tokens_run("sa", layer, 1024) for layer in (2, 3, 27, 28)] == [1024, 615, 615, 1024]
    assert plans[10].router.tokens_run("ffn", 3, 1600) == 800


def test_skipvar_skips_the_last_scales_and_runs_the_conditional_branch_before(model):
    result, records = run(model, policy(model, "skipvar", skip_last=1, cond_only_last=2))
    assert [r.plan.skip for r in records] == [False] * 4 + [True]
    assert [r.inputs.shape[0] for r in records[:-1]] == [4, 4, 4, 2]
    assert records[-1].kv_lengths == [sum(SIZES[:-1])] * 4


def test_dither_order_prefixes_are_evenly_spread():
    order = dither_order((4, 4))
    assert sorted(order.tolist()) == list(range(16))
    assert sorted(order[:4].tolist()) == [0, 2, 8, 10]  # a quarter of the tokens: the stride-2 sub-grid
    assert sorted(dither_order((6, 6))[:9].tolist()) == [0, 2, 4, 12, 14, 16, 24, 26, 28]


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("stagevar", {"rank_ratio": 0.0}, "accel.rank_ratio=0.0 must be in (0, 1]"),
        ("stagevar", {"rank_ratio": 1.5}, "accel.rank_ratio=1.5 must be in (0, 1]"),
        ("stagevar", {"refinement_start": 6}, "accel.refinement_start=6 is outside the 5-scale schedule"),
        ("cfg_drop", {"refinement_start": -6}, "accel.refinement_start=-6 is outside the 5-scale schedule"),
        ("stagevar", {"ranks": "probe"}, "accel.ranks=probe takes the ranks from the stage probe"),
        ("stagevar", {"sketch": "sparse"}, "accel.sketch='sparse' is not one of"),
        ("stagevar", {"indices": "topk"}, "accel.indices='topk' is not one of"),
        ("stagevar", {"restore_from": "next"}, "accel.restore_from='next' is not one of"),
        ("cfg_drop", {"keep_branch": "null"}, "accel.keep_branch='null' is not one of"),
        ("stagevar", {"stages_file": "no/such/stages.json"}, "stages file no/such/stages.json does not exist"),
        ("fastvar", {"prune_ratios": [0.4, 1.0]}, "accel.prune_ratios has 1.0"),
        ("fastvar", {"prune_scales": [-4]}, "must pair up"),
        ("fastvar", {"cache_scale": -3}, "must come after accel.cache_scale=-3"),
        ("skipvar", {"skip_last": 5}, "accel.skip_last=5 must be an integer in [0, 4]"),
    ],
)
def test_bad_values_are_user_errors_naming_the_key(model, name, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        policy(model, name, **overrides)


@pytest.mark.parametrize(("model_name", "schedule"), [("tiny", SCHEDULE), ("small", [1, 2, 4, 6, 10])])
def test_a_stages_file_for_another_model_or_schedule_is_refused(model, tmp_path, model_name, schedule):
    path = stages_file(tmp_path, model_name, [[s, s] for s in schedule], refinement_start=3, ranks=[1] * 5)
    with pytest.raises(UserError, match="was made for model"):
        policy(model, "stagevar", stages_file=path)


HOST_SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("none", {}), ("cfg_drop", {}), ("stagevar", {}), ("stagevar", {"restore_from": "previous"}),
     ("stagevar", {"indices": "topk_norm"}), ("fastvar", {}), ("skipvar", {"cond_only_last": 2}),
     ("stagevar_released", {"skip_last": 0})],
)
def test_the_scale_loop_never_waits_for_the_device(model, monkeypatch, name, overrides):
    # On a GPU each of these reads a tensor's value on the host, so the host waits for every queued kernel.
    calls = []
    for method in HOST_SYNCS:
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _m=method, _o=original, **k: calls.append(_m) or _o(self, *a, **k))
    run(model, policy(model, name, **overrides), decode=False)
    assert calls == []
