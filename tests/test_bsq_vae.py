import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from errors import UserError
from models.bsq_vae import BSQ, BSQVAE, BSQVAEConfig, Decoder, Downsample, resize_latent, swish, vae_checkpoint_name

from listings import listing_section

LISTING = Path(__file__).parent / "fixtures" / "bsq_vae_state_dict_keys.txt"
TINY = BSQVAEConfig(codebook_dim=16, base_ch=32, ch_mult=(1, 2, 2), norm_groups=8)
TINY_PATCHIFY = BSQVAEConfig(codebook_dim=6, base_ch=16, ch_mult=(1, 2, 2), norm_groups=8, spatial_patchify=True)


def official_listing(section: str) -> tuple[dict[str, tuple[tuple[int, ...], str]], int]:
    return listing_section(LISTING, section)


@pytest.mark.parametrize(
    ("section", "config"),
    [("BSQ-VAE d32", BSQVAEConfig.d32()), ("BSQ-VAE d14 patchify", BSQVAEConfig.d14_patchify())],
)
def test_official_names_shapes_and_counts(section, config):
    expected, expected_params = official_listing(section)
    with torch.device("meta"):
        vae = BSQVAE(config)
    built = {
        name: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in vae.state_dict(keep_vars=True).items()
    }
    assert built == expected
    assert sum(p.numel() for p in vae.parameters()) == expected_params


def test_official_geometry():
    with torch.device("meta"):
        d32, d14 = BSQVAE(BSQVAEConfig.d32()), BSQVAE(BSQVAEConfig.d14_patchify())
    assert (d32.stride, d32.patch, d32.bits_per_token) == (16, 1, 32)
    assert (d14.stride, d14.patch, d14.bits_per_token) == (8, 2, 56)


def test_plain_and_wrapped_checkpoint_names_map_to_module_names():
    expected, _ = official_listing("BSQ-VAE d32")
    for key in expected:
        plain = re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", key)
        assert vae_checkpoint_name(plain) == key
        assert vae_checkpoint_name(key) == key


def test_norm_groups_must_divide_channels():
    with pytest.raises(UserError, match="norm_groups=32 does not divide 48"):
        BSQVAEConfig(base_ch=48, ch_mult=(1, 2))


def tiny_vae(config: BSQVAEConfig) -> BSQVAE:
    torch.manual_seed(0)
    return BSQVAE(config).eval()


@torch.no_grad()
def test_tiny_encode_decode_shapes_and_clamp():
    vae = tiny_vae(TINY)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latent = vae.encode(images)
    assert latent.shape == (2, 16, 16, 16)
    vae.decoder.conv_out.conv.weight.mul_(1e3)  # push raw outputs far outside [-1, 1]
    decoded = vae.decode(latent)
    assert decoded.shape == (2, 3, 64, 64)
    assert decoded.min() == -1 and decoded.max() == 1


def test_encode_rejects_sizes_not_divisible_by_stride():
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_vae(TINY).encode(torch.zeros(1, 3, 62, 64))


@pytest.mark.parametrize(
    ("config", "schedule"),
    [
        (TINY, [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8), (11, 11), (16, 16)]),
        (TINY_PATCHIFY, [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8)]),
    ],
)
@torch.no_grad()
def test_quantized_latent_is_the_sum_of_its_bits(config, schedule):
    vae = tiny_vae(config)
    latent = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    quantized, bits = vae.quantize(latent, schedule)
    assert quantized.shape == latent.shape
    assert [b.shape for b in bits] == [(2, h, w, vae.bits_per_token) for h, w in schedule]
    assert all(b.dtype == torch.int64 and set(b.unique().tolist()) <= {0, 1} for b in bits)
    resummed = sum(resize_latent(vae.bits_to_codes(b), latent.shape[-2:]) for b in bits)
    torch.testing.assert_close(resummed, quantized, atol=1e-5, rtol=0)


@torch.no_grad()
def test_first_scale_bits_are_signs_of_the_mean_latent():
    vae = tiny_vae(TINY)
    latent = vae.encode(torch.rand(3, 3, 64, 64) * 2 - 1)
    _, bits = vae.quantize(latent, [(1, 1), (16, 16)])
    assert torch.equal(bits[0][:, 0, 0], (latent.mean((2, 3)) > 0).long())


@pytest.mark.parametrize("config", [TINY, TINY_PATCHIFY])
@torch.no_grad()
def test_self_correction_labels_point_back_at_the_uncorrupted_latent(config):
    # Two scales on the full grid: if every bit of the first is flipped, the running sum is minus the true
    # code, so the second scale's labels (the residual's signs) must repeat the first scale's true bits.
    vae = tiny_vae(config)
    latent = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    grid = (latent.shape[-2] // vae.patch, latent.shape[-1] // vae.patch)
    _, clean = vae.quantize(latent, [grid, grid])
    flips = [torch.ones_like(clean[0], dtype=torch.bool), torch.zeros_like(clean[1], dtype=torch.bool)]
    quantized, labels = vae.quantize(latent, [grid, grid], flips)
    assert torch.equal(labels[0], clean[0])
    assert torch.equal(labels[1], clean[0]) and not torch.equal(clean[1], clean[0])
    corrupted = [bits ^ flip.long() for bits, flip in zip(labels, flips)]
    torch.testing.assert_close(quantized, sum(vae.bits_to_codes(bits) for bits in corrupted), atol=1e-6, rtol=0)


@torch.no_grad()
def test_self_correction_without_flips_is_plain_quantisation():
    vae = tiny_vae(TINY)
    latent = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    schedule = [(1, 1), (4, 4), (16, 16)]
    quantized, bits = vae.quantize(latent, schedule)
    no_flips = [torch.zeros(2, h, w, vae.bits_per_token, dtype=torch.bool) for h, w in schedule]
    quantized_again, bits_again = vae.quantize(latent, schedule, no_flips)
    assert torch.equal(quantized, quantized_again) and all(map(torch.equal, bits, bits_again))


def test_quantize_rejects_a_schedule_that_does_not_end_at_the_latent_grid():
    with pytest.raises(ValueError, match="latent grid"):
        tiny_vae(TINY_PATCHIFY).quantize(torch.zeros(1, 6, 16, 16), [(1, 1), (16, 16)])


def test_patchify_bit_layout_and_round_trip():
    vae = tiny_vae(TINY_PATCHIFY)
    bits = torch.randint(0, 2, (2, 3, 5, vae.bits_per_token))
    codes = vae.bits_to_codes(bits)
    assert codes.shape == (2, 6, 6, 10)
    torch.testing.assert_close(vae.codes_to_tokens(codes), (bits.flatten(1, 2).float() * 2 - 1) / 6**0.5)
    # Token bit k <-> latent channel k // 4 at sub-position ((k % 4) // 2, k % 2).
    for k in range(vae.bits_per_token):
        one_bit = torch.zeros(1, 1, 1, vae.bits_per_token, dtype=torch.long)
        one_bit[..., k] = 1
        positive = (vae.bits_to_codes(one_bit)[0] > 0).nonzero().tolist()
        assert positive == [[k // 4, (k % 4) // 2, k % 2]]


@pytest.mark.parametrize("config", [TINY, TINY_PATCHIFY])
def test_codes_are_channels_last_whatever_the_layout_of_their_bits(config):
    # Resizing rounds differently per memory layout: the codes of quantize()'s bits (a permuted view) must sum
    # exactly as the codes of the sampler's contiguous bits do.
    vae = tiny_vae(config)
    grid = 16 // vae.patch
    _, bits = vae.quantize(torch.randn(2, config.codebook_dim, 16, 16), [(1, 1), (grid // 2, grid // 2), (grid, grid)])
    for scale_bits in bits:
        codes, codes_of_copy = vae.bits_to_codes(scale_bits), vae.bits_to_codes(scale_bits.contiguous())
        assert codes.is_contiguous(memory_format=torch.channels_last)
        assert codes.stride() == codes_of_copy.stride() and torch.equal(codes, codes_of_copy)


def test_resize_latent_matches_bilinear_both_ways():
    x = torch.randn(2, 4, 16, 16)
    for size in [(5, 7), (16, 16), (32, 24)]:
        expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(resize_latent(x, size), expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_downsample_pads_only_right_and_bottom():
    down = Downsample(1)
    down.conv.conv.weight.fill_(1)
    down.conv.conv.bias.zero_()
    out = down(torch.ones(1, 1, 8, 8))
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0] == 9 and out[0, 0, -1, -1] == 4  # full window top-left, zero padding bottom-right


def test_swish_is_x_times_sigmoid_bitwise_not_f_silu():
    x = torch.randn(4096) * 4
    assert torch.equal(swish(x), x * torch.sigmoid(x))
    assert not torch.equal(swish(x), F.silu(x))  # the two round differently, so the choice matters


def decode_by_hand(decoder: Decoder, latent: torch.Tensor, activation) -> torch.Tensor:
    """The decoder's layers applied one by one, with `activation` wherever the VAE activates."""

    def resnet(block, x):
        h = block.conv1(activation(block.norm1(x)))
        h = block.conv2(activation(block.norm2(h)))
        return block.nin_shortcut(x) + h

    x = decoder.conv_in(latent)
    x = resnet(decoder.mid.block_2, resnet(decoder.mid.block_1, x))
    for level in reversed(decoder.up):
        for block in level.block:
            x = resnet(block, x)
        x = x if level.upsample is None else level.upsample(x)
    return decoder.conv_out(activation(decoder.norm_out(x)))


@torch.no_grad()
def test_decoder_activates_with_x_times_sigmoid_like_the_official_vae():
    torch.manual_seed(0)
    decoder = Decoder(BSQVAEConfig(codebook_dim=8, base_ch=16, ch_mult=(1, 2), decoder_blocks=1, norm_groups=8))
    latent = torch.randn(2, 8, 6, 6)
    decoded = decoder(latent)
    assert torch.equal(decoded, decode_by_hand(decoder, latent, lambda x: x * torch.sigmoid(x)))
    assert not torch.equal(decoded, decode_by_hand(decoder, latent, F.silu))


@pytest.mark.parametrize(("codebook_dim", "magnitude"), [(32, 0.1767767071723938), (14, 0.267261266708374)])
def test_codes_from_bits_are_l2_normalised_like_the_official_indices_to_codes(codebook_dim, magnitude):
    # float32(1 / sqrt(d)) is 0.17677669 for d = 32 and 0.26726124 for d = 14; normalising the vector in
    # float32 moves every entry up by one ulp, as it does in the official code.
    bits = torch.randint(0, 2, (2, codebook_dim, 3, 4), generator=torch.Generator().manual_seed(0))
    codes = BSQ(codebook_dim).bits_to_codes(bits)
    assert torch.equal(codes > 0, bits.bool())
    assert torch.equal(codes.abs().unique(), torch.tensor([magnitude]))
