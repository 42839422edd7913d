"""The analytic MAC counter against a brute-force count of a real generation, and on Infinity-2B."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from accel.macs import count_macs
from accel.policies import ModelSpec, build_policy
from accel.sampler import SamplingConfig, generate
from models.infinity import InfinityConfig
from models.pipeline import TextToImageModel
from models.schedules import infinity_schedule

from helpers import FlopCount, small_config, small_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "accel"
# Odd sizes on purpose: 3 heads, an FFN narrower than 4x, a non-square grid, prompts of different lengths.
SMALL = small_config(
    [[1, 1], [2, 2], [3, 4], [5, 6], [6, 8]], depth=4, embed_dim=48, num_heads=3, mlp_ratio=2.0, block_chunks=2,
)
PROMPTS = ["a photo of a red circle", "two blue squares", "a green triangle left of a yellow star"]


@pytest.fixture(scope="module")
def model() -> TextToImageModel:
    return small_model(SMALL, confident=False)


def counted_flops(model: TextToImageModel, policy, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[list[int]]]:
    """FLOPs of the transformer blocks and the head in a real generation, and the KV lengths after each scale."""
    flops = FlopCount(model.transformer, monkeypatch)

    class KVLengths:
        capture_blocks = ()

        def __init__(self):
            self.lengths = []

        def on_scale(self, record):
            self.lengths.append(record.kv_lengths)

    observer = KVLengths()
    with sdpa_kernel(SDPBackend.MATH):  # the math kernel's matmuls are what the counter sees on a CPU
        sampling = SamplingConfig(cfg=3.0, tau=1.0)
        generate(model, PROMPTS, sampling, seed=0, policy=policy, observers=[observer], decode=False)
    return flops.total, observer.lengths


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("none", {}),
        ("cfg_drop", {"refinement_start": -2}),
        ("stagevar", {"rank_ratio": 0.3}),
        ("stagevar", {"rank_ratio": 0.2, "sketch": "gaussian", "indices": "topk_norm", "keep_branch": "cond"}),
        ("fastvar", {"cache_scale": 1, "prune_scales": [2, 3], "prune_ratios": [0.4, 0.5], "skip_last": 1}),
        ("skipvar", {"skip_last": 1, "cond_only_last": 3}),
        ("stagevar_released", {}),
        ("stagevar_released", {"skip_last": 0, "rope_positions": "indices", "sketch": "selection"}),
    ],
)
def test_analytic_macs_equal_a_brute_force_count(model, monkeypatch, name, overrides):
    accel_cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), overrides)
    flops, kv_lengths = counted_flops(model, build_policy(accel_cfg, model), monkeypatch)
    text_length = model.text_encoder.encode(PROMPTS).features.shape[1]
    macs = count_macs(model.transformer.config, model.schedule, build_policy(accel_cfg, model),
                      batch_size=len(PROMPTS), text_length=text_length)
    assert 2 * macs.total == flops
    assert [scale.kv_lengths for scale in macs.scales] == kv_lengths


def test_macs_without_guidance_are_half_the_baseline_with_it():
    config, schedule = InfinityConfig.infinity_2b(), infinity_schedule(1.0, "1M")
    with_cfg = count_macs(config, schedule, batch_size=1, text_length=32)
    without_cfg = count_macs(config, schedule, batch_size=1, text_length=32, guidance=False)
    assert with_cfg.total == 2 * without_cfg.total
    assert [scale.rows for scale in with_cfg.scales] == [2] * 13


def test_stagevar_on_infinity_2b_saves_most_of_the_refinement_stage():
    config, schedule = InfinityConfig.infinity_2b(), infinity_schedule(1.0, "1M")
    spec = ModelSpec("infinity2b", schedule, config.depth, config.block_chunks)
    stagevar = build_policy(OmegaConf.merge(OmegaConf.load(CONF / "stagevar.yaml"), {"rank_ratio": 0.25}), spec)
    baseline = count_macs(config, schedule, batch_size=1, text_length=32)
    accelerated = count_macs(config, schedule, stagevar, batch_size=1, text_length=32)
    assert [s.macs for s in accelerated.scales[:10]] == [s.macs for s in baseline.scales[:10]]  # stages 1-2 locked
    assert [s.tokens for s in accelerated.scales[10:]] == [400, 576, 1024]
    assert [s.rows for s in accelerated.scales[10:]] == [1, 1, 1]
    assert 3.0 < baseline.total / accelerated.total < 8.0


def test_most_of_the_released_speedup_on_infinity_2b_comes_from_the_skip():
    # The digest's estimate (shared/research/fastervar_code.md section 1): the skip alone ~3.2x, with the CFG drop
    # ~4.0x, with the per-chunk reduction at alpha 0.96 ~5.2x fewer transformer MACs.
    config, schedule = InfinityConfig.infinity_2b(), infinity_schedule(1.0, "1M")
    spec = ModelSpec("infinity2b", schedule, config.depth, config.block_chunks)
    released = OmegaConf.load(CONF / "stagevar_released.yaml")
    baseline = count_macs(config, schedule, batch_size=1, text_length=32).total

    def speedup(**overrides) -> float:
        policy = build_policy(OmegaConf.merge(released, overrides), spec)
        return baseline / count_macs(config, schedule, policy, batch_size=1, text_length=32).total

    skip, skip_and_drop, full = speedup(cfg_drop_last=0, reduce_last=0), speedup(reduce_last=0), speedup()
    assert 3.0 < skip < 3.4 and 3.8 < skip_and_drop < 4.2 and 4.9 < full < 5.5
