import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from errors import UserError
from models.checkpoint import CheckpointError, load_strict, read_state_dict
from models.vqvae import VQVAE, AttnBlock, Downsample, VQVAEConfig, phi_index

from listings import listing_section

LISTING = Path(__file__).parent / "fixtures" / "var_state_dict_keys.txt"
TINY = VQVAEConfig(codebook_size=64, codebook_dim=8, base_ch=16, ch_mult=(1, 2), norm_groups=8, patch_nums=(1, 2, 4, 8))
VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_SCHEDULE = [(pn, pn) for pn in VAR_PATCH_NUMS]


def tiny_vae(config: VQVAEConfig = TINY) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(config).eval()


def smooth_latent(batch: int, size: int, channels: int = TINY.codebook_dim) -> torch.Tensor:
    """A latent at the codebook's scale with most of its energy at low frequencies, as a trained encoder's: the
    coarse scales have something to capture."""
    generator = torch.Generator().manual_seed(1)
    coarse = torch.randn(batch, channels, 2, 2, generator=generator) * 1.5
    noise = torch.randn(batch, channels, size, size, generator=generator) * 0.3
    return F.interpolate(coarse, size=(size, size), mode="bicubic") + noise


# ----------------------------------------------------------------------------------------------------------
# The official layout


def test_official_names_shapes_dtypes_and_count():
    expected, expected_params = listing_section(LISTING, "VAR VQVAE (vae_ch160v4096z32.pth)")
    assert len(expected) == 324
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig.vae_ch160v4096z32())
    built = {
        name: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in vae.state_dict(keep_vars=True).items()
    }
    assert built == expected
    assert sum(p.numel() for p in vae.parameters()) == expected_params == 108_948_355


def test_official_geometry():
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig.vae_ch160v4096z32())
    assert (vae.stride, vae.patch, vae.codebook_size, vae.token_channels) == (16, 1, 4096, 32)
    assert vae.latent_size((13, 16)) == (13, 16)
    assert callable(vae.quantize)  # the method, not the checkpoint's submodule of the same name


def test_norm_groups_must_divide_channels():
    with pytest.raises(UserError, match="norm_groups=32 does not divide 48"):
        VQVAEConfig(base_ch=48, ch_mult=(1, 2))


# ----------------------------------------------------------------------------------------------------------
# phi


def test_phi_indices_of_var_ten_scales():
    assert [phi_index(k, 10) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # k = 2: 2/9 is exactly midway between the ticks 1/12 and 13/36 on paper; float64 puts it nearer 13/36.
    assert phi_index(2, 10) == 1


def test_phi_index_agrees_with_numpy_float64_ticks():
    for num_phi in (1, 2, 3, 4, 6):
        margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
        ticks = np.linspace(margin, 1 - margin, num_phi)
        for num_scales in range(2, 40):
            for k in range(num_scales):
                assert phi_index(k, num_scales, num_phi) == int(np.argmin(np.abs(ticks - k / (num_scales - 1))))


def test_one_scale_uses_the_finest_phi_and_bad_indices_are_refused():
    assert phi_index(0, 1) == 3  # the single scale is the full-resolution one
    with pytest.raises(ValueError):
        phi_index(10, 10)
    vae = tiny_vae()
    latent = smooth_latent(1, 4)
    f_hat, codes = vae.quantize(latent, [(4, 4)])
    expected = vae.quantizer.quant_resi.qresi_ls[3](vae.quantizer.embedding(codes[0]).permute(0, 3, 1, 2))
    torch.testing.assert_close(f_hat, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Multi-scale quantisation


@torch.no_grad()
def test_quantize_sums_add_scale_and_the_residual_shrinks():
    vae = tiny_vae()
    latent = smooth_latent(2, 8)
    schedule = [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8)]
    f_hat, codes = vae.quantize(latent, schedule)
    assert f_hat.shape == latent.shape
    assert [c.shape for c in codes] == [(2, h, w) for h, w in schedule]
    assert all(c.dtype == torch.int64 and 0 <= c.min() and c.max() < TINY.codebook_size for c in codes)
    accumulated = vae.zero_latent(2, (8, 8), latent.device)
    residual_norms = [latent.norm()]
    for k, scale_codes in enumerate(codes):
        accumulated = vae.add_scale(accumulated, scale_codes, k, schedule)
        residual_norms.append((latent - accumulated).norm())
    assert torch.equal(accumulated, f_hat)
    assert all(later < earlier for earlier, later in zip(residual_norms, residual_norms[1:]))


@torch.no_grad()
def test_first_scale_code_is_the_nearest_to_the_mean_latent():
    vae = tiny_vae()
    latent = smooth_latent(3, 8)
    _, codes = vae.quantize(latent, [(1, 1), (8, 8)])
    nearest = torch.cdist(latent.mean((2, 3)), vae.quantizer.embedding.weight).argmin(dim=1)
    assert torch.equal(codes[0][:, 0, 0], nearest)


@torch.no_grad()
def test_add_scale_upsamples_bicubically_applies_that_scales_phi_and_keeps_its_input():
    vae = tiny_vae()
    codebook, phis = vae.quantizer.embedding.weight, vae.quantizer.quant_resi.qresi_ls
    latent = torch.randn(2, 8, 16, 16)
    before = latent.clone()
    for k, phi in ((2, phis[1]), (9, phis[3])):  # scale 2 of 10: the near tie; scale 9: the last, no upsampling
        pn = VAR_PATCH_NUMS[k]
        codes = torch.randint(0, 64, (2, pn, pn), generator=torch.Generator().manual_seed(k))
        h = codebook[codes].permute(0, 3, 1, 2)
        h = h if k == 9 else F.interpolate(h, size=(16, 16), mode="bicubic")
        expected = latent + 0.5 * h + 0.5 * F.conv2d(h, phi.weight, phi.bias, padding=1)
        torch.testing.assert_close(vae.add_scale(latent, codes, k, VAR_SCHEDULE), expected, atol=1e-5, rtol=0)
    assert torch.equal(latent, before)


@torch.no_grad()
def test_teacher_forcing_inputs_are_the_samplers_next_scale_inputs():
    vae = tiny_vae()
    schedule = [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8)]
    _, codes = vae.quantize(smooth_latent(2, 8), schedule)
    inputs = vae.teacher_forcing_inputs(codes, schedule)
    assert inputs.shape == (2, sum(h * w for h, w in schedule) - 1, TINY.codebook_dim)
    latent, expected = vae.zero_latent(2, (8, 8), torch.device("cpu")), []
    for k, grid in enumerate(schedule[1:]):  # the scale loop: add this scale's codes, make the next input
        latent = vae.add_scale(latent, codes[k], k, schedule)
        expected.append(F.interpolate(latent, size=grid, mode="area").flatten(2).transpose(1, 2))
    assert torch.equal(inputs, torch.cat(expected, dim=1))
    assert torch.equal(inputs[:, :4], vae.scale_input(vae.add_scale(vae.zero_latent(2, (8, 8), "cpu"), codes[0], 0,
                                                                     schedule), (2, 2)))
    assert vae.teacher_forcing_inputs(codes[-1:], schedule[-1:]).shape == (2, 0, TINY.codebook_dim)


def test_add_scale_refuses_codes_of_another_grid():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="codes of scale 1"):
        vae.add_scale(torch.zeros(1, 8, 8, 8), torch.zeros(1, 3, 3, dtype=torch.long), 1, [(1, 1), (2, 2), (8, 8)])


# ----------------------------------------------------------------------------------------------------------
# Sampling


def draws(vae: VQVAE, logits: list[float], top_k: int, top_p: float, n: int = 2000, seed: int = 0) -> set[int]:
    """The indices drawn from n tokens that all have `logits`."""
    batch = torch.tensor(logits).expand(1, n, -1)
    codes = vae.sample(batch, (n, 1), top_k, top_p, torch.Generator().manual_seed(seed))
    return set(codes.unique().tolist())


def test_top_k_one_is_the_argmax():
    vae = tiny_vae()
    logits = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))
    codes = vae.sample(logits, (3, 4), top_k=1, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 3, 4) and codes.dtype == torch.int64
    assert torch.equal(codes, logits.argmax(-1).view(2, 3, 4))


def test_top_k_and_top_p_keep_only_their_sets():
    vae = tiny_vae()
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert draws(vae, logits, top_k=0, top_p=0.0) == {0, 1, 2, 3}
    assert draws(vae, [1.0, 5.0, 3.0, 4.0], top_k=2, top_p=0.0) == {1, 3}
    # Ascending cumulative sums 0.05, 0.2, 0.5, 1: top_p 0.7 drops those <= 0.3, i.e. the two smallest.
    assert draws(vae, logits, top_k=0, top_p=0.7) == {0, 1}
    assert draws(vae, logits, top_k=0, top_p=0.9) == {0, 1, 2}
    # 1 - 1e-9 rounds to 1.0 in float32: every cumulative sum is <= it, and only the largest is kept.
    assert draws(vae, logits, top_k=0, top_p=1e-9) == {0}
    assert draws(vae, logits, top_k=3, top_p=0.9) == {0, 1, 2}


def test_sampling_is_reproducible_and_leaves_the_logits_alone():
    vae = tiny_vae()
    logits = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    first, again, other = (
        vae.sample(logits, (4, 4), top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    )
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="16 tokens"):
        vae.sample(logits, (3, 3), top_k=0, top_p=0.0, generator=torch.Generator())


# ----------------------------------------------------------------------------------------------------------
# Encode / decode


@torch.no_grad()
def test_encode_decode_shapes_and_clamp():
    vae = tiny_vae()
    latent = vae.encode(torch.rand(2, 3, 16, 12) * 2 - 1)
    assert latent.shape == (2, 8, 8, 6)
    vae.decoder.conv_out.weight.mul_(1e3)  # push raw outputs far outside [-1, 1]
    decoded = vae.decode(latent)
    assert decoded.shape == (2, 3, 16, 12)
    assert decoded.min() == -1 and decoded.max() == 1


@pytest.mark.parametrize("shape", [(1, 3, 15, 16), (1, 4, 16, 16), (3, 16, 16)])
def test_encode_rejects_bad_image_shapes(shape):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) with H, W divisible by 2"):
        tiny_vae().encode(torch.zeros(shape))


def test_quantize_rejects_a_schedule_that_does_not_end_at_the_latent_grid():
    with pytest.raises(ValueError, match="latent grid"):
        tiny_vae().quantize(torch.zeros(1, 8, 8, 8), [(1, 1), (4, 4)])


@torch.no_grad()
def test_attention_is_single_head_softmax_attention_with_a_residual():
    torch.manual_seed(0)
    block = AttnBlock(16, groups=8)
    x = torch.randn(2, 16, 3, 5)
    q, k, v = block.qkv(block.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C) each
    attended = F.scaled_dot_product_attention(q, k, v)  # one head of width C: softmax scale C^-0.5
    expected = x + block.proj_out(attended.transpose(1, 2).reshape(2, 16, 3, 5))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_downsample_pads_only_right_and_bottom():
    down = Downsample(1)
    down.conv.weight.fill_(1)
    down.conv.bias.zero_()
    out = down(torch.ones(1, 1, 8, 8))
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0] == 9 and out[0, 0, -1, -1] == 4  # full window top-left, zero padding bottom-right


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def test_load_strict_fills_every_tensor_and_names_a_missing_one(tmp_path):
    source = tiny_vae()
    torch.manual_seed(1)
    target = VQVAE(TINY)
    state = {name: t.clone() for name, t in source.state_dict().items()}
    state["quantize.ema_vocab_hit_SV"] = torch.rand_like(state["quantize.ema_vocab_hit_SV"])
    torch.save(state, tmp_path / "vae.pth")
    load_strict(target, read_state_dict(tmp_path / "vae.pth"), source="vae.pth")
    assert all(torch.equal(t, state[name]) for name, t in target.state_dict().items())

    removed = "encoder.down.1.attn.0.qkv.weight"
    del state[removed]
    torch.save(state, tmp_path / "truncated.pth")
    with pytest.raises(CheckpointError, match=re.escape(removed)):
        load_strict(VQVAE(TINY), read_state_dict(tmp_path / "truncated.pth"), source="truncated.pth")
