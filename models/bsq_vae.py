"""Infinity's multi-scale BSQ-VAE: a Flux-style conv autoencoder with binary spherical quantisation.

Parameter names match the official checkpoints (`infinity_vae_d32reg.pth` for Infinity-2B,
`infinity_vae_d56_f8_14_patchify.pth` for Infinity-8B), so they load without renaming; plain
VQGAN-style spellings load through `vae_checkpoint_name`.

Three grids appear here:
- pixels (B, 3, H, W) in [-1, 1];
- the VAE latent (B, codebook_dim, H/stride, W/stride);
- the transformer grid, equal to the latent grid, or half of it with spatial patchify (8B), where each
  2x2 block of latent cells becomes one token of 4*codebook_dim bits.
Scale schedules passed to `BSQVAE.quantize` are in transformer grid units.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from errors import UserError


@dataclass
class BSQVAEConfig:
    codebook_dim: int = 32  # latent channels = bits per latent cell
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)  # one entry per resolution level
    encoder_blocks: int = 2  # ResnetBlocks per encoder level
    decoder_blocks: int = 3  # ResnetBlocks per decoder level
    spatial_patchify: bool = False  # 2x2 pixel-unshuffle between latent and transformer grid
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)  # Hydra hands over a ListConfig
        if self.codebook_dim < 1 or self.base_ch < 1 or not self.ch_mult:
            raise UserError(
                f"BSQVAEConfig: codebook_dim ({self.codebook_dim}) and base_ch ({self.base_ch}) must be "
                f"positive and ch_mult ({self.ch_mult}) non-empty"
            )
        for mult in self.ch_mult:
            channels = self.base_ch * mult
            if channels % self.norm_groups:
                raise UserError(
                    f"BSQVAEConfig: norm_groups={self.norm_groups} does not divide {channels} channels "
                    f"(base_ch {self.base_ch} x ch_mult {mult}); choose norm_groups dividing every level"
                )

    @classmethod
    def d32(cls) -> BSQVAEConfig:
        """`infinity_vae_d32reg` (Infinity-2B): 32 bits, stride 16."""
        return cls(codebook_dim=32, ch_mult=(1, 2, 4, 4, 4))

    @classmethod
    def d14_patchify(cls) -> BSQVAEConfig:
        """`infinity_vae_d56_f8_14_patchify` (Infinity-8B): 14 bits, stride 8, 2x2 patchify -> 56 bits/token."""
        return cls(codebook_dim=14, ch_mult=(1, 2, 4, 4), spatial_patchify=True)


def resize_latent(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize (B, C, h, w) to `size` the way Infinity does, up or down: trilinear on a singleton time
    axis, align_corners=False, no antialiasing (differs from 4-D bilinear by ~1e-7, kept for parity)."""
    return F.interpolate(x.unsqueeze(2), size=(1, *size), mode="trilinear", align_corners=False).squeeze(2)


def sample_bits(logits: Tensor, top_k: int, top_p: float, generator: torch.Generator) -> Tensor:
    """Sample every bit independently from its 2 logits: (B, n, 2 * bits) -> (B, n, bits) int64, as the official
    Infinity sampler: per-bit top-k / top-p, then one seeded multinomial over all bits."""
    pairs = logits.reshape(-1, 2).float()
    if top_k == 1:  # any larger k keeps both values
        pairs = pairs.masked_fill(pairs < pairs.max(-1, keepdim=True).values, float("-inf"))
    if 0 < top_p < 1:  # drop the less likely value when its probability is <= 1 - top_p
        low = pairs.softmax(-1) <= 1 - top_p
        low &= ~low.all(-1, keepdim=True)
        pairs = pairs.masked_fill(low, float("-inf"))
    bits = torch.multinomial(pairs.softmax(-1), 1, replacement=True, generator=generator)
    return bits.view(logits.shape[0], logits.shape[1], -1)


def swish(x: Tensor) -> Tensor:
    """SiLU written as the official VAE writes it: `x * sigmoid(x)` rounds differently from `F.silu`."""
    return x * torch.sigmoid(x)


def vae_checkpoint_name(name: str) -> str:
    """Map a plain VQGAN-style key (`encoder.conv_in.weight`, `...norm1.bias`) to our wrapped name
    (`encoder.conv_in.conv.weight`, `...norm1.norm.bias`); wrapped and other names pass unchanged.

    A rename for `load_strict`. Only a layer name directly before `.weight`/`.bias` is wrapped, so a
    name is never wrapped twice (`downsample.conv.conv.weight` ends in `.conv.conv`, not `downsample.conv`).
    """
    name = re.sub(
        r"\.(conv_in|conv_out|conv1|conv2|nin_shortcut|downsample\.conv|upsample\.conv)\.(weight|bias)$",
        r".\1.conv.\2",
        name,
    )
    return re.sub(r"\.(norm1|norm2|norm_out)\.(weight|bias)$", r".\1.norm.\2", name)


class Conv(nn.Module):
    """A 2-D conv one level down, as in the official code (hence `.conv.` in parameter names)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    """GroupNorm one level down, as in the official code (hence `.norm.` in parameter names)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = Conv(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.conv2 = Conv(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = Conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric zero pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


def _resnet_blocks(in_ch: int, out_ch: int, num_blocks: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_blocks))


class EncoderLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.block = _resnet_blocks(in_ch, out_ch, num_blocks, groups)
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = _resnet_blocks(in_ch, out_ch, num_blocks, groups)
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, config: BSQVAEConfig):
        super().__init__()
        groups = config.norm_groups
        channels = [config.base_ch * mult for mult in config.ch_mult]
        in_channels = [config.base_ch, *channels[:-1]]
        last = len(channels) - 1
        self.conv_in = Conv(3, config.base_ch, 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(in_channels[i], channels[i], config.encoder_blocks, groups, downsample=i < last)
            for i in range(len(channels))
        )
        self.mid = MidBlock(channels[-1], groups)
        self.norm_out = Normalize(channels[-1], groups)
        self.conv_out = Conv(channels[-1], config.codebook_dim, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv_in(images)
        for level in self.down:
            x = level(x)
        return self.conv_out(swish(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, config: BSQVAEConfig):
        super().__init__()
        groups = config.norm_groups
        channels = [config.base_ch * mult for mult in config.ch_mult]
        # up[i] runs deepest first and takes the channels of level i + 1 (the mid block's for the deepest).
        in_channels = [*channels[1:], channels[-1]]
        self.conv_in = Conv(config.codebook_dim, channels[-1], 3, padding=1)
        self.mid = MidBlock(channels[-1], groups)
        self.up = nn.ModuleList(
            DecoderLevel(in_channels[i], channels[i], config.decoder_blocks, groups, upsample=i > 0)
            for i in range(len(channels))
        )
        self.norm_out = Normalize(channels[0], groups)
        self.conv_out = Conv(channels[0], 3, 3, padding=1)

    def forward(self, latent: Tensor) -> Tensor:
        x = self.mid(self.conv_in(latent))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(swish(self.norm_out(x)))


class BSQ(nn.Module):
    """Binary spherical quantiser on the channel axis: bit = (x > 0), code = (2 bit - 1) / sqrt(d).

    The official code L2-normalises before taking signs; that leaves the signs, hence the codes, unchanged.
    Its own codes are the plain +-1/sqrt(d); codes made from given bits (sampled or flipped) are L2-normalised,
    as the official `indices_to_codes` does: in float32 that moves them by an ulp for most d (32, 14), not for
    powers of 4.
    """

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.codebook_dim = codebook_dim
        # Bit weights for packing bits into one integer index. Nothing here packs bits; the buffer is
        # kept because the official checkpoints contain it.
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bits = (x > 0).long()
        return self._signed_codes(bits), bits

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """Bits (B, d, ...) 0/1 -> unit-norm codes (B, d, ...)."""
        return F.normalize(self._signed_codes(bits), dim=1)

    def _signed_codes(self, bits: Tensor) -> Tensor:
        return (bits.float() * 2 - 1) / math.sqrt(self.codebook_dim)


class MultiScaleBSQ(nn.Module):
    """Residual quantisation over a coarse-to-fine schedule, in VAE latent units (no phi convs)."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.lfq = BSQ(codebook_dim)

    def forward(
        self, latent: Tensor, schedule: list[tuple[int, int]], flips: list[Tensor] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Return the quantised latent (the sum of all upsampled codes) and the bits (B, d, h, w) per scale.

        `flips` (bool, one per scale, shaped like its bits): bits inverted before their codes enter the sum
        (bitwise self-correction, see `BSQVAE.quantize`).
        """
        full_size = tuple(latent.shape[-2:])
        residual = latent.float()  # the official quantiser runs with autocast off
        quantized = torch.zeros_like(residual)
        bits_per_scale = []
        for index, size in enumerate(schedule):
            codes, bits = self.lfq(F.interpolate(residual, size=size, mode="area"))
            if flips is not None:
                codes = self.lfq.bits_to_codes(bits ^ flips[index].long())
            codes = resize_latent(codes, full_size)
            residual = residual - codes
            quantized = quantized + codes
            bits_per_scale.append(bits)
        return quantized, bits_per_scale


class BSQVAE(nn.Module):
    def __init__(self, config: BSQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = MultiScaleBSQ(config.codebook_dim)
        # The official model registers the quantiser under a second name, so its checkpoints carry
        # `quantize.lfq.mask` as well. `add_module` refuses the name because the method `quantize` exists.
        self._modules["quantize"] = self.quantizer

    @property
    def patch(self) -> int:
        """Latent cells per transformer token along each axis."""
        return 2 if self.config.spatial_patchify else 1

    @property
    def bits_per_token(self) -> int:
        return self.config.codebook_dim * self.patch**2

    @property
    def stride(self) -> int:
        """Pixels per latent cell along each axis."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> continuous latent (B, codebook_dim, H / stride, W / stride)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % self.stride or images.shape[-2] % self.stride:
            raise ValueError(
                f"expected images (B, 3, H, W) with H, W divisible by {self.stride}, got {tuple(images.shape)}"
            )
        return self.encoder(images)

    def quantize(
        self, latent: Tensor, schedule: list[tuple[int, int]], flips: list[Tensor] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Multi-scale quantisation of `latent` over `schedule` (transformer grid units, coarse to fine).

        Returns the quantised latent (same shape as `latent`) and, per scale, the bits as int64 0/1 of
        shape (B, h, w, bits_per_token) in the transformer's layout.

        `flips` is Infinity's bitwise self-correction, for training only: one bool tensor per scale, shaped
        like its bits, marks bits to invert before they enter the running sum. Every later scale then
        quantises the residual of that corrupted prefix, so the returned bits, the labels, teach the
        transformer to correct earlier mistakes; the corrupted prefix itself is `bits ^ flips`, and the
        returned latent is its sum.
        """
        latent_schedule = [(h * self.patch, w * self.patch) for h, w in schedule]
        if not schedule or latent_schedule[-1] != tuple(latent.shape[-2:]):
            raise ValueError(
                f"the last scale {schedule[-1] if schedule else None} times patch {self.patch} must equal the "
                f"latent grid {tuple(latent.shape[-2:])}"
            )
        if flips is not None:
            flips = [F.pixel_shuffle(flip.permute(0, 3, 1, 2).float(), self.patch).bool() for flip in flips]
        quantized, bits_per_scale = self.quantizer(latent, latent_schedule, flips)
        return quantized, [F.pixel_unshuffle(bits, self.patch).permute(0, 2, 3, 1) for bits in bits_per_scale]

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """(B, h, w, bits_per_token) 0/1 -> unit-norm codes (B, codebook_dim, h * patch, w * patch), each entry
        +-1/sqrt(codebook_dim); channels-last in memory, as the official codes.

        With patchify, token bit k is latent channel k // 4 at sub-position ((k % 4) // 2, k % 2).
        """
        latent_bits = F.pixel_shuffle(bits.permute(0, 3, 1, 2), self.patch)
        # The sampler's bits are contiguous (B, h, w, d) and come out channels-last already; quantize()'s are a
        # permuted view of (B, d, h, w) and would not (1 ulp in the resized sums of their codes).
        return self.quantizer.lfq.bits_to_codes(latent_bits).contiguous(memory_format=torch.channels_last)

    def codes_to_tokens(self, latent: Tensor) -> Tensor:
        """(B, codebook_dim, h * patch, w * patch) -> transformer input (B, h * w, bits_per_token), row-major."""
        return F.pixel_unshuffle(latent, self.patch).flatten(2).transpose(1, 2)

    def zero_latent(self, batch: int, size: tuple[int, int], device: torch.device) -> Tensor:
        """The empty sum of codes (B, codebook_dim, *size), channels-last like the codes the official code adds to
        it: resizing and decoding round differently per memory layout, so bitwise parity needs the same one."""
        return torch.zeros(batch, self.config.codebook_dim, *size, device=device).to(memory_format=torch.channels_last)

    def latent_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Latent cells of a token grid."""
        return grid[0] * self.patch, grid[1] * self.patch

    def scale_input(self, latent: Tensor, grid: tuple[int, int]) -> Tensor:
        """The accumulated codes resized to a scale's grid -> its transformer input (B, h * w, bits_per_token)."""
        return self.codes_to_tokens(resize_latent(latent, self.latent_size(grid)))

    def sample(
        self, logits: Tensor, grid: tuple[int, int], top_k: int, top_p: float, generator: torch.Generator
    ) -> Tensor:
        """A scale's guided logits (B, h * w, 2 * bits) -> its bits (B, h, w, bits_per_token) int64 0/1."""
        return sample_bits(logits, top_k, top_p, generator).view(logits.shape[0], *grid, -1)

    def add_scale(self, latent: Tensor, codes: Tensor, scale_index: int, schedule: Sequence[tuple[int, int]]) -> Tensor:
        """Infinity's accumulation: the scale's codes (bits) resized to the final grid and added to the sum."""
        return latent + resize_latent(self.bits_to_codes(codes), tuple(latent.shape[-2:]))

    def teacher_forcing_inputs(self, bits: list[Tensor], schedule: list[tuple[int, int]]) -> Tensor:
        """Transformer inputs of scales 1..K-1 from the bits of every scale, as the sampler builds them:
        the codes accumulated before each scale on the final grid, resized to its grid -> (B, L - 1, bits)."""
        accumulated = self.zero_latent(bits[0].shape[0], self.latent_size(schedule[-1]), bits[0].device)
        inputs = []
        for k, (grid, scale_bits) in enumerate(zip(schedule[1:], bits[:-1])):
            accumulated = self.add_scale(accumulated, scale_bits, k, schedule)
            inputs.append(self.scale_input(accumulated, grid))
        return torch.cat(inputs, dim=1)

    def decode(self, latent: Tensor) -> Tensor:
        """Latent (B, codebook_dim, h, w) -> images (B, 3, h * stride, w * stride) clamped to [-1, 1]."""
        return self.decoder(latent).clamp(-1, 1)

