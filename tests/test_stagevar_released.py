"""accel=stagevar_released: StageVAR as its authors released it, switch by switch, on a small random model."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from accel.policies import ModelSpec, build_policy
from accel.sampler import SamplingConfig, generate
from accel.stagevar_released import ChunkRepresentatives
from errors import UserError
from models.pipeline import TextToImageModel
from models.schedules import infinity_schedule

from helpers import ScaleRecorder, small_config, small_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "accel"
SCHEDULE = [1, 2, 4, 6, 8, 12]
PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]
SAMPLING = SamplingConfig(cfg=3.0, tau=1.0)
OFF = {"skip_last": 0, "cfg_drop_last": 0, "reduce_last": 0}


@pytest.fixture(scope="module")
def model() -> TextToImageModel:
    return small_model(small_config(SCHEDULE, depth=4, block_chunks=2))


def policy(model, name: str = "stagevar_released", **overrides):
    return build_policy(OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), overrides), model)


def run(model, accel_policy, observers=()):
    return generate(model, PROMPTS, SAMPLING, seed=0, policy=accel_policy, observers=observers)


def same(first, second) -> bool:
    return torch.equal(first.images, second.images) and torch.equal(first.latent, second.latent)


def test_every_switch_off_is_the_baseline_bit_for_bit(model):
    assert same(run(model, policy(model, **OFF)), run(model, None))


def test_the_skip_alone_is_skipvar_skipping_two_and_the_cfg_drop_alone_is_cfg_drop(model):
    skip_only = run(model, policy(model, **{**OFF, "skip_last": 2}))
    assert same(skip_only, run(model, policy(model, "skipvar", skip_last=2, cond_only_last=0)))
    drop_only = run(model, policy(model, **{**OFF, "cfg_drop_last": 3}))
    assert same(drop_only, run(model, policy(model, "cfg_drop", refinement_start=-3)))


def test_the_released_default_skips_two_drops_cfg_on_three_and_reduces_the_third_from_the_end(model):
    recorder = ScaleRecorder()
    released = policy(model)
    run(model, released, [recorder])
    records = recorder.records
    assert [r.plan.skip for r in records] == [False] * 4 + [True] * 2
    assert [r.inputs.shape[0] for r in records[:4]] == [4, 4, 4, 2]  # the null-text row only from scale 3 on
    ranks = released.ranks[3]  # 6 x 6 = 36 tokens, two chunks of two blocks
    assert len(ranks) == 2 and all(1 <= r < 36 for r in ranks)
    # K/V appended at the reduced scale: r of its chunk per block, not 36.
    before, after = records[2].kv_lengths, records[3].kv_lengths
    assert [a - b for a, b in zip(after, before)] == [ranks[0], ranks[0], ranks[1], ranks[1]]
    assert records[-1].kv_lengths == after  # the skipped scales add nothing


def test_the_same_seed_gives_the_same_images_and_another_seed_other_draws(model):
    first, again = run(model, policy(model, skip_last=0)), run(model, policy(model, skip_last=0))
    assert same(first, again)
    assert not same(first, run(model, policy(model, skip_last=0, seed=1)))


def test_the_presets_give_the_released_ranks_on_infinity_2b():
    schedule = infinity_schedule(1.0, "1M")
    released = build_policy(OmegaConf.load(CONF / "stagevar_released.yaml"), ModelSpec("infinity2b", schedule, 32, 8))
    assert released.ranks == {10: [27, 219, 337, 401, 410, 317, 252, 306]}  # int(ratio x 1600) + 1 at scale 40
    unskipped = build_policy(OmegaConf.merge(OmegaConf.load(CONF / "stagevar_released.yaml"), {"skip_last": 0}),
                             ModelSpec("infinity2b", schedule, 32, 8))
    assert unskipped.ranks[12][0] == int(0.008212925943716094 * 4096) + 1  # scale 64, chunk 0


def test_every_alpha_has_the_released_ranks_at_all_three_positions():
    schedule = infinity_schedule(1.0, "1M")
    settings = OmegaConf.merge(OmegaConf.load(CONF / "stagevar_released.yaml"), {"skip_last": 0, "alpha": 0.9})
    released = build_policy(settings, ModelSpec("infinity2b", schedule, 32, 8))
    # The release's alpha 0.90 ratios of chunk 0 at scales 40, 48, 64 (1600, 2304, 4096 tokens).
    assert [released.ranks[k][0] for k in (10, 11, 12)] == [int(0.013196767631103015 * 1600) + 1,
                                                           int(0.01123046875 * 2304) + 1, int(0.0126953125 * 4096) + 1]


def chunk(rank: int, **switches) -> ChunkRepresentatives:
    settings = {"sketch": "gaussian_mixture", "index_sampling": "norm_multinomial", "rope_positions": "first_r",
                "restore_mode": "area"} | switches
    generator = torch.Generator().manual_seed(0)
    return ChunkRepresentatives([rank], generator_on=lambda device: generator, **settings)


def test_the_gaussian_sketch_mixes_all_tokens_with_entries_of_variance_one_over_r():
    rank, tokens = 50, 400
    reduced = chunk(rank).reduce(torch.eye(tokens).expand(3, -1, -1), (20, 20), 0)  # X = I: the mixtures are Q^T
    q = reduced.tokens
    assert q.shape == (3, rank, tokens)
    assert abs(q.mean().item()) < 0.005 and q.var().item() == pytest.approx(1 / rank, rel=0.03)
    assert not torch.equal(q[0], q[1])  # a fresh Q per row


def test_the_gaussian_sketch_is_scaled_by_the_inverse_root_of_r_like_the_release():
    rank, tokens = 50, 400
    x = torch.eye(tokens).expand(3, -1, -1)
    q = chunk(rank).reduce(x, (20, 20), 0).tokens.transpose(1, 2)  # X = I: the mixtures are Q^T, exactly
    generator = torch.Generator().manual_seed(0)  # the draws of chunk(): positions first, then Q
    torch.multinomial(x.pow(2).sum(-1), rank, replacement=False, generator=generator)
    gaussian = torch.randn(3, tokens, rank, generator=generator)
    # This r tells the roundings apart: the correctly rounded quotient (in float64; a CPU's division kernel may
    # itself multiply by the reciprocal) differs from the product somewhere.
    assert not torch.equal((gaussian.double() / rank**0.5).float(), gaussian * (1 / rank**0.5))
    assert torch.equal(q, gaussian * (1 / rank**0.5))


def test_index_sampling_is_without_replacement_and_favours_large_norm_tokens():
    x = torch.ones(1, 64, 8)
    x[0, :4] *= 10  # 4 tokens with 100 x the squared norm of the others
    counts = torch.zeros(64)
    sampler = chunk(8)
    for _ in range(200):
        positions = sampler.reduce(x, (8, 8), 0).positions[0]
        assert len(set(positions.tolist())) == 8
        counts[positions] += 1
    assert counts[:4].min() > 190 and counts[4:].mean() < 40


def test_rope_positions_follow_the_switch():
    x = torch.randn(2, 16, 4)
    first = chunk(5).reduce(x, (4, 4), 0)
    assert torch.equal(first.rope_positions, torch.arange(5))
    at_indices = chunk(5, rope_positions="indices").reduce(x, (4, 4), 0)
    assert torch.equal(at_indices.rope_positions, at_indices.positions)


def test_restoration_scatters_the_outputs_over_the_area_resized_previous_chunk_output():
    previous, hidden = torch.randn(2, 16, 3), torch.randn(2, 5, 3)
    subset = chunk(5)
    reduced = subset.reduce(torch.randn(2, 36, 3), (6, 6), 0)
    restored = subset.restore(hidden, reduced, (6, 6), previous, (4, 4))
    expected = F.interpolate(previous.transpose(1, 2).reshape(2, 3, 4, 4), size=(6, 6), mode="area")
    expected = expected.flatten(2).transpose(1, 2).clone()
    for row in range(2):
        expected[row, reduced.positions[row]] = hidden[row]
    assert torch.equal(restored, expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alpha": 0.5}, r"accel.alpha=0.5 has no rank preset; the release has 0.999, 0.99, 0.98"),
        ({"skip_last": 0, "reduce_last": 4}, r"the release's presets hold the last 3 scales only: reduce_last <= 3"),
        ({"ranks": "probe"}, "accel.ranks=probe takes the per-chunk ranks from the stage probe: set accel.stages_file"),
    ],
)
def test_bad_settings_are_clear_errors(model, overrides, message):
    with pytest.raises(UserError, match=message):
        policy(model, **overrides)


def test_a_stages_file_without_chunk_ranks_says_which_probe_makes_them(model, tmp_path: Path):
    stages = {"model": "small", "schedule": [[s, s] for s in SCHEDULE], "semantic_end": 1, "structure_end": 2,
              "refinement_start": 3, "ranks": {"per_scale": [1] * 6}, "rule": {}, "curves": {}, "num_prompts": 1,
              "code_version": "old"}  # a stages.json of a probe from before per-chunk ranks
    path = tmp_path / "stages.json"
    path.write_text(json.dumps(stages))
    with pytest.raises(UserError, match="has no per-chunk ranks; run experiment=stage_probe again"):
        policy(model, ranks="probe", stages_file=str(path))


def test_a_probed_ratio_of_one_keeps_every_token_not_one_more(model, tmp_path: Path):
    ratios = {str(k): [1.0, 0.5] for k in range(len(SCHEDULE))}
    stages = {"model": "small", "schedule": [[s, s] for s in SCHEDULE], "semantic_end": 1, "structure_end": 2,
              "refinement_start": 3, "rule": {}, "curves": {}, "num_prompts": 1, "code_version": "test",
              "ranks": {"per_scale": [1] * 6, "chunk_ranks": {"ratio": {"0.96": ratios}}}}
    path = tmp_path / "stages.json"
    path.write_text(json.dumps(stages))
    released = policy(model, ranks="probe", stages_file=str(path))
    assert released.ranks == {3: [36, 19]}  # 6 x 6 tokens: int(1.0 * 36) + 1 = 37 would be one too many
    run(model, released)  # and it runs


def test_a_schedule_too_short_for_the_released_skip_is_refused():
    with pytest.raises(UserError, match="needs a schedule of at least 4 scales"):
        build_policy(OmegaConf.load(CONF / "stagevar_released.yaml"), ModelSpec("small", [(1, 1), (2, 2), (4, 4)], 2, 1))
