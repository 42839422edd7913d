"""The one scale loop, on a small random model of the real classes."""

import pytest
import torch

from accel.sampler import Continuations, SamplingConfig, ScalePlan, generate
from models.bsq_vae import sample_bits
from models.bsq_vae import resize_latent
from models.pipeline import TextToImageModel

from helpers import ScaleRecorder, small_config, small_model


@pytest.fixture(scope="module")
def model() -> TextToImageModel:
    return small_model(small_config([1, 2, 3, 4]))


PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


def test_cached_sampler_logits_equal_the_block_causal_full_forward(model):
    recorder = ScaleRecorder()
    generate(model, PROMPTS, SamplingConfig(cfg=1.0, tau=1.0, top_p=0.0), seed=0, observers=[recorder], decode=False)
    bits = [r.codes for r in recorder.records]
    inputs = model.vae.teacher_forcing_inputs(bits, model.schedule)
    with torch.no_grad():
        tokens = model.text_encoder.encode(PROMPTS)
        text = model.transformer.encode_text(tokens.features, tokens.lengths, with_null=False)
        full = model.transformer(inputs, text, model.schedule, model.rope_grid)
    cached = torch.cat([r.logits for r in recorder.records], dim=1)
    assert (cached - full).abs().max() <= 1e-4


def test_same_seed_same_images_and_different_seed_different_images(model):
    sampling = SamplingConfig(cfg=3.0, tau=1.0)
    first = generate(model, PROMPTS, sampling, seed=1)
    again = generate(model, PROMPTS, sampling, seed=1)
    other = generate(model, PROMPTS, sampling, seed=2)
    assert first.images.dtype == torch.uint8 and first.images.shape == (2, *model.image_size, 3)
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.latent, other.latent)


def test_tau_multiplies_the_logits_by_its_inverse_like_the_official_code(model):
    tau = 0.7
    plain, tempered = ScaleRecorder(), ScaleRecorder()
    generate(model, PROMPTS, SamplingConfig(cfg=1.0, tau=1.0), seed=0, observers=[plain], decode=False)
    generate(model, PROMPTS, SamplingConfig(cfg=1.0, tau=tau), seed=0, observers=[tempered], decode=False)
    # The first scale's inputs do not depend on tau (later ones follow the sampled bits).
    logits = plain.records[0].logits
    # This tau tells the two roundings apart: the correctly rounded quotient (computed in float64; a CPU's own
    # division kernel may itself multiply by the reciprocal) differs from the product somewhere.
    assert not torch.equal((logits.double() / tau).float(), logits * (1 / tau))
    assert torch.equal(tempered.records[0].logits, logits * (1 / tau))


def test_codes_accumulate_channels_last_like_the_official_code(model):
    # PyTorch's trilinear resize rounds differently per memory layout; the official sum of codes is channels-last.
    recorder = ScaleRecorder()
    result = generate(model, PROMPTS, SamplingConfig(cfg=1.0, tau=1.0), seed=0, observers=[recorder], decode=False)
    assert all(r.latent.is_contiguous(memory_format=torch.channels_last) for r in recorder.records)
    assert result.latent.is_contiguous(memory_format=torch.channels_last)  # what the VAE decodes
    codes = model.vae.bits_to_codes(recorder.records[1].codes)
    resized = resize_latent(codes, (8, 8))
    assert codes.is_contiguous(memory_format=torch.channels_last) and resized.is_contiguous(memory_format=torch.channels_last)
    # The layout matters: a contiguous copy of the same codes, resized, gives other bits somewhere.
    odd = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    assert not torch.equal(resize_latent(odd, (7, 11)), resize_latent(odd.contiguous(), (7, 11)))


def test_cfg_runs_both_branches_and_mixes_their_logits(model):
    recorder = ScaleRecorder()
    generate(model, PROMPTS, SamplingConfig(cfg=4.0, tau=1.0), seed=0, observers=[recorder], decode=False)
    first = recorder.records[0]
    assert first.inputs.shape[0] == 4  # conditional rows then null-text rows
    assert first.logits.shape[0] == 2
    assert recorder.records[-1].kv_lengths == [1 + 4 + 9 + 16] * 2


def test_dropping_a_branch_slices_the_cache_and_keeps_one_row_per_prompt(model):
    class DropAtScale2:
        def plan(self, k, grid, schedule):
            return ScalePlan(branches="uncond" if k >= 2 else "both")

    recorder = ScaleRecorder()
    generate(model, PROMPTS, SamplingConfig(cfg=3.0, tau=1.0), seed=0, policy=DropAtScale2(), observers=[recorder])
    assert [r.inputs.shape[0] for r in recorder.records] == [4, 4, 2, 2]
    assert recorder.records[-1].kv_lengths == [30, 30]


def test_an_empty_prompt_is_the_null_text_and_works(model):
    result = generate(model, ["", "ünïcødé prompt ✓"], SamplingConfig(cfg=3.0), seed=0)
    assert result.images.shape[0] == 2


def test_top_p_removes_the_unlikely_value_of_each_bit():
    logits = torch.tensor([[[5.0, -5.0, 0.0, 0.1]]])  # bit 0: p(1) ~ 4.5e-5; bit 1: near 50/50
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([sample_bits(logits, 0, 0.97, generator) for _ in range(200)])
    assert samples[..., 0].eq(0).all()
    assert samples[..., 1].float().mean().item() == pytest.approx(0.5, abs=0.15)


def test_forced_codes_replace_the_sampled_ones_of_the_first_scales(model):
    sampling = SamplingConfig(cfg=3.0, tau=1.0)
    truth = generate(model, PROMPTS, sampling, seed=1).codes
    forced = generate(model, PROMPTS, sampling, seed=2, forced_codes=truth[:2]).codes
    assert all(torch.equal(f, t) for f, t in zip(forced[:2], truth[:2]))
    assert not torch.equal(forced[-1], truth[-1])  # the free scales are sampled from seed 2
    everything = generate(model, PROMPTS, sampling, seed=2, forced_codes=truth)
    assert all(torch.equal(f, t) for f, t in zip(everything.codes, truth))


def test_a_continuation_with_the_runs_own_draws_reproduces_its_images_bit_for_bit(model):
    sampling = SamplingConfig(cfg=3.0, tau=1.0)
    forks = Continuations(after=range(len(model.schedule)), seeds=[None, 7])
    run = generate(model, PROMPTS, sampling, seed=1, continuations=forks)
    assert torch.equal(run.images, generate(model, PROMPTS, sampling, seed=1).images)  # forking leaves the run alone
    assert sorted(run.continuations) == list(range(len(model.schedule)))
    for k, (own, other) in run.continuations.items():
        assert torch.equal(own, run.images), k
    assert not torch.equal(run.continuations[0][1], run.images)  # other draws after the first scale


def test_a_continuation_equals_the_run_recomputed_with_its_prefix_forced(model):
    """The copied KV cache and latent are exactly what recomputing the prefix gives: a continuation seeded s after
    scale k is the run with the first k + 1 scales' bits forced and the rest drawn from seed s."""
    sampling = SamplingConfig(cfg=3.0, tau=1.0)
    run = generate(model, PROMPTS, sampling, seed=1, continuations=Continuations(after=[0, 2], seeds=[5, 6]))
    for k, images in run.continuations.items():
        for seed, continuation in zip([5, 6], images):
            recomputed = generate(model, PROMPTS, sampling, seed=seed, forced_codes=run.codes[: k + 1])
            assert torch.equal(continuation, recomputed.images), (k, seed)


def test_continuations_refuse_a_policy(model):
    with pytest.raises(ValueError, match="baseline policy"):
        generate(model, PROMPTS, SamplingConfig(), seed=0, policy=object(), continuations=Continuations([0], [1]))
