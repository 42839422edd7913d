"""VAR's multi-scale VQVAE (`vae_ch160v4096z32.pth`, FoundationVision/VAR): an LDM-style conv autoencoder with
multi-scale residual vector quantisation and the phi refinement convs.

Parameter names match the official checkpoint, which uses plain `nn.Conv2d` / `nn.GroupNorm` naming
(`encoder.down.0.block.0.norm1.weight`), so it loads without renaming.

Grids:
- pixels (B, 3, H, W) in [-1, 1];
- the latent (B, codebook_dim, H / stride, W / stride): one code vector per cell;
- the transformer grid equals the latent grid (patch 1), so schedules are in latent cells.

The multi-scale tokenizer interface (`latent_size`, `zero_latent`, `scale_input`, `add_scale`, `sample`,
`teacher_forcing_inputs`, ...) is the one the scale loop calls; the BSQ-VAE offers the same names with bits in
place of code indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from errors import UserError


@dataclass
class VQVAEConfig:
    codebook_size: int = 4096  # V: code indices per latent cell
    codebook_dim: int = 32  # Cvae: latent channels = code vector length
    base_ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per resolution level
    encoder_blocks: int = 2  # ResnetBlocks per encoder level
    decoder_blocks: int = 3  # ResnetBlocks per decoder level
    norm_groups: int = 32
    # The training schedule; only its length matters here (rows of the `ema_vocab_hit_SV` buffer).
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    num_phi: int = 4  # partially shared phi convs
    phi_ratio: float = 0.5  # VAR's `quant_resi`: phi(h) = (1 - r) h + r conv(h)

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)  # Hydra hands over a ListConfig
        self.patch_nums = tuple(self.patch_nums)
        if min(self.codebook_size, self.codebook_dim, self.base_ch, self.num_phi) < 1 or not self.ch_mult:
            raise UserError(
                f"VQVAEConfig: codebook_size ({self.codebook_size}), codebook_dim ({self.codebook_dim}), base_ch "
                f"({self.base_ch}) and num_phi ({self.num_phi}) must be positive and ch_mult ({self.ch_mult}) "
                "non-empty"
            )
        if not self.patch_nums:
            raise UserError("VQVAEConfig: patch_nums must list at least one scale")
        for mult in self.ch_mult:
            channels = self.base_ch * mult
            if channels % self.norm_groups:
                raise UserError(
                    f"VQVAEConfig: norm_groups={self.norm_groups} does not divide {channels} channels "
                    f"(base_ch {self.base_ch} x ch_mult {mult}); choose norm_groups dividing every level"
                )

    @classmethod
    def vae_ch160v4096z32(cls) -> VQVAEConfig:
        """`vae_ch160v4096z32.pth` (VAR d16..d30, 256 px): 4096 codes of 32 channels, stride 16."""
        return cls()


def phi_index(scale_index: int, num_scales: int, num_phi: int = 4) -> int:
    """Which of the `num_phi` shared phi convs scale `scale_index` of `num_scales` uses.

    VAR places one tick per phi in [0, 1] (margins 1/(3n) for n = 4, 1/(2n) otherwise) and picks the tick
    nearest to the scale's position k / (K - 1), the first one on a tie. For K = 10 this gives
    [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]; k = 2 is an exact tie on paper that float64 resolves to 1, so the ticks are
    computed with numpy's linspace arithmetic (start + i * step, the last tick set to stop), in Python floats.

    One scale (VAR divides by zero there): it is the full-resolution scale, the finest, so position 1.0.
    """
    if num_phi < 1 or not 0 <= scale_index < num_scales:
        raise ValueError(f"scale_index {scale_index} must lie in [0, {num_scales}) and num_phi ({num_phi}) be >= 1")
    position = scale_index / (num_scales - 1) if num_scales > 1 else 1.0
    margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    start, stop = margin, 1 - margin
    if num_phi == 1:
        ticks = [start]
    else:
        step = (stop - start) / (num_phi - 1)
        ticks = [i * step + start for i in range(num_phi - 1)] + [stop]
    return min(range(num_phi), key=lambda i: abs(ticks[i] - position))  # min keeps the first of equal distances


def normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1, SiLU, conv1, norm2, SiLU, conv2, plus a 1x1 `nin_shortcut` when the width changes.

    VAR activates with `F.silu` (the BSQ-VAE's `x * sigmoid(x)` rounds differently, so it is not shared).
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = normalize(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the cells of a feature map, with a residual connection.

    One fused 1x1 conv makes q, k, v (in that order along the channels); softmax scale C^-0.5. Written with
    explicit batched matmuls in VAR's layouts rather than scaled_dot_product_attention, so it rounds as the
    official model does.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = normalize(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.scale = channels**-0.5

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        weights = torch.bmm(q.transpose(1, 2).contiguous(), k.contiguous()).mul_(self.scale)  # (B, HW query, HW key)
        weights = weights.softmax(dim=2).transpose(1, 2).contiguous()
        h = torch.bmm(v.contiguous(), weights).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric zero pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResnetBlocks, each followed by self-attention at the lowest resolution
    (`attn` stays empty elsewhere), then an optional resampling (`downsample` or `upsample`)."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int, attention: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch, groups) for _ in range(num_blocks if attention else 0))

    def run_blocks(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x


class EncoderLevel(Level):
    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int, attention: bool, downsample: bool):
        super().__init__(in_ch, out_ch, num_blocks, groups, attention)
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.run_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(Level):
    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int, attention: bool, upsample: bool):
        super().__init__(in_ch, out_ch, num_blocks, groups, attention)
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.run_blocks(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        groups = config.norm_groups
        channels = [config.base_ch * mult for mult in config.ch_mult]
        in_channels = [config.base_ch, *channels[:-1]]
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(3, config.base_ch, 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(in_channels[i], channels[i], config.encoder_blocks, groups, attention=i == last,
                         downsample=i < last)
            for i in range(len(channels))
        )
        self.mid = MidBlock(channels[-1], groups)
        self.norm_out = normalize(channels[-1], groups)
        self.conv_out = nn.Conv2d(channels[-1], config.codebook_dim, 3, padding=1)  # no double z: not a KL-VAE

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv_in(images)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        groups = config.norm_groups
        channels = [config.base_ch * mult for mult in config.ch_mult]
        # up[i] runs deepest first and takes the channels of level i + 1 (the mid block's for the deepest).
        in_channels = [*channels[1:], channels[-1]]
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.codebook_dim, channels[-1], 3, padding=1)
        self.mid = MidBlock(channels[-1], groups)
        self.up = nn.ModuleList(
            DecoderLevel(in_channels[i], channels[i], config.decoder_blocks, groups, attention=i == last,
                         upsample=i > 0)
            for i in range(len(channels))
        )
        self.norm_out = normalize(channels[0], groups)
        self.conv_out = nn.Conv2d(channels[0], 3, 3, padding=1)

    def forward(self, latent: Tensor) -> Tensor:
        x = self.mid(self.conv_in(latent))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Phi(nn.Conv2d):
    """The refinement of one scale's upsampled codes: (1 - r) h + r conv3x3(h). A Conv2d itself, so its
    parameters are `qresi_ls.{i}.weight` / `.bias` as in the checkpoint."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiBank(nn.Module):
    """The partially shared phi convs; scale k of K uses `qresi_ls[phi_index(k, K)]`."""

    def __init__(self, channels: int, num_phi: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(num_phi))

    def for_scale(self, scale_index: int, num_scales: int) -> Phi:
        return self.qresi_ls[phi_index(scale_index, num_scales, len(self.qresi_ls))]


class MultiScaleVQ(nn.Module):
    """The codebook and the phi convs: the quantiser's parameters. The math lives on `VQVAE`, which owns the
    scale schedule."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        # Codebook usage statistics from training, per scale of `patch_nums`: unused here, but in the checkpoint.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(config.patch_nums), config.codebook_size))
        self.quant_resi = PhiBank(config.codebook_dim, config.num_phi, config.phi_ratio)
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_dim)

    def nearest_codes(self, vectors: Tensor) -> Tensor:
        """(N, C) -> int64 (N,) index of the nearest code in Euclidean distance (no normalisation).

        Distances as VAR computes them, |z|^2 + |e|^2 - 2 z.e in one addmm, so near ties resolve alike.
        """
        codebook = self.embedding.weight.detach()
        distances = vectors.square().sum(dim=1, keepdim=True) + codebook.square().sum(dim=1)
        distances.addmm_(vectors, codebook.T, alpha=-2, beta=1)
        return distances.argmin(dim=1)


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # Registered as `quantize` (the checkpoint's name) without `add_module`, which refuses a name that a
        # method already has; the method `quantize` stays reachable, the module is `self.quantizer`.
        self._modules["quantize"] = MultiScaleVQ(config)
        self.quant_conv = nn.Conv2d(config.codebook_dim, config.codebook_dim, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.codebook_dim, 3, padding=1)

    @property
    def quantizer(self) -> MultiScaleVQ:
        return self._modules["quantize"]  # type: ignore[return-value]

    @property
    def stride(self) -> int:
        """Pixels per latent cell along each axis."""
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def patch(self) -> int:
        """Latent cells per transformer token along each axis: one code per token."""
        return 1

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def token_channels(self) -> int:
        """Channels of one transformer input token (what `word_embed` takes): a code vector."""
        return self.config.codebook_dim

    def latent_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Latent cells of a token grid."""
        return (grid[0] * self.patch, grid[1] * self.patch)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> continuous latent (B, codebook_dim, H / stride, W / stride)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % self.stride or images.shape[-2] % self.stride:
            raise ValueError(
                f"expected images (B, 3, H, W) with H, W divisible by {self.stride}, got {tuple(images.shape)}"
            )
        return self.quant_conv(self.encoder(images))

    def quantize(self, latent: Tensor, schedule: list[tuple[int, int]]) -> tuple[Tensor, list[Tensor]]:
        """Multi-scale residual quantisation of `latent` over `schedule` (coarse to fine, ending at its grid).

        Per scale: area-downsample the residual to the scale's grid (not at the last scale), take the nearest
        code of each cell, and add the codes' contribution (see `add_scale`) to the running sum, subtracting
        it from the residual. Returns the sum (float32, shaped like `latent`) and the int64 code indices
        (B, h, w) per scale. Runs in float32 with autocast off, as VAR's quantiser.
        """
        if not schedule or tuple(schedule[-1]) != tuple(latent.shape[-2:]):
            raise ValueError(
                f"the last scale {schedule[-1] if schedule else None} must equal the latent grid "
                f"{tuple(latent.shape[-2:])}"
            )
        B, C = latent.shape[:2]
        last = len(schedule) - 1
        with torch.autocast(latent.device.type, enabled=False):
            residual = latent.detach().float()
            f_hat = self.zero_latent(B, tuple(schedule[-1]), latent.device)
            codes_per_scale = []
            for k, (h, w) in enumerate(schedule):
                target = residual if k == last else F.interpolate(residual, size=(h, w), mode="area")
                codes = self.quantizer.nearest_codes(target.permute(0, 2, 3, 1).reshape(-1, C)).view(B, h, w)
                # What add_scale adds, computed once: the sum is exactly add_scale's, and the residual loses the
                # same tensor, as in VAR (rather than latent - f_hat, which rounds differently).
                contribution = self._contribution(codes, k, schedule)
                f_hat = f_hat + contribution
                residual = residual - contribution
                codes_per_scale.append(codes)
        return f_hat, codes_per_scale

    def zero_latent(self, batch: int, size: tuple[int, int], device: torch.device) -> Tensor:
        """The empty sum of code contributions (B, codebook_dim, *size), in the codebook's dtype."""
        return torch.zeros(batch, self.config.codebook_dim, *size, device=device,
                           dtype=self.quantizer.embedding.weight.dtype)

    def scale_input(self, latent: Tensor, grid: tuple[int, int]) -> Tensor:
        """The transformer input of a scale: the accumulated latent area-downsampled to its grid, as tokens
        (B, h * w, codebook_dim) in row-major order (VAR's get_next_autoregressive_input)."""
        return F.interpolate(latent, size=tuple(grid), mode="area").flatten(2).transpose(1, 2)

    def add_scale(self, latent: Tensor, codes: Tensor, scale_index: int, schedule: Sequence[tuple[int, int]]) -> Tensor:
        """`latent` plus the contribution of one scale's codes (B, h, w): their code vectors, bicubic-upsampled
        to the final grid (not at the last scale), through phi of that scale. A new tensor; `latent` is kept."""
        if tuple(latent.shape[-2:]) != tuple(schedule[-1]):
            raise ValueError(f"latent grid {tuple(latent.shape[-2:])} is not the last scale {schedule[-1]}")
        return latent + self._contribution(codes, scale_index, schedule)

    def _contribution(self, codes: Tensor, scale_index: int, schedule: Sequence[tuple[int, int]]) -> Tensor:
        if codes.ndim != 3 or tuple(codes.shape[1:]) != tuple(schedule[scale_index]):
            raise ValueError(
                f"codes of scale {scale_index} must be (B, {schedule[scale_index][0]}, {schedule[scale_index][1]}), "
                f"got {tuple(codes.shape)}"
            )
        # (B, h, w, C) -> contiguous (B, C, h, w), the layout of VAR's sampler.
        h = self.quantizer.embedding(codes).permute(0, 3, 1, 2).contiguous()
        if scale_index != len(schedule) - 1:
            h = F.interpolate(h, size=tuple(schedule[-1]), mode="bicubic")
        return self.quantizer.quant_resi.for_scale(scale_index, len(schedule))(h)

    def sample(
        self, logits: Tensor, grid: tuple[int, int], top_k: int, top_p: float, generator: torch.Generator
    ) -> Tensor:
        """Code indices (B, h, w) int64 drawn from logits (B, h * w, V) with VAR's top-k / top-p filter.

        top_k > 0 keeps the logits >= the k-th largest of each row. 0 < top_p < 1 keeps the nucleus: sorted
        ascending, the entries whose cumulative probability is <= 1 - top_p go, the largest always stays. Then
        one multinomial draw per token over the (B * h * w, V) rows with `generator`. `logits` is not modified.
        """
        B, n, V = logits.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"logits have {n} tokens, grid {tuple(grid)} has {grid[0] * grid[1]}")
        if top_k > 0:
            kth_largest = logits.topk(min(top_k, V), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth_largest, -torch.inf)
        if 0 < top_p < 1:
            ascending, order = logits.sort(dim=-1, descending=False)
            drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
            drop_sorted[..., -1] = False  # the largest survives even if rounding puts its cumsum below 1 - top_p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
        probs = logits.softmax(dim=-1).view(-1, V)
        return torch.multinomial(probs, 1, replacement=True, generator=generator).view(B, *grid)

    def teacher_forcing_inputs(self, codes: list[Tensor], schedule: list[tuple[int, int]]) -> Tensor:
        """Transformer inputs of scales 1..K-1 from the codes of every scale, as the sampler builds them:
        the contributions of the scales before each one summed on the final grid, area-downsampled to its grid
        -> (B, L - h0 * w0, codebook_dim), L the schedule's token count (L - 1 for VAR's 1x1 first scale)."""
        latent = self.zero_latent(codes[0].shape[0], tuple(schedule[-1]), codes[0].device)
        inputs = [latent.new_zeros(latent.shape[0], 0, self.token_channels)]  # one scale: no inputs
        for k, grid in enumerate(schedule[1:]):
            latent = self.add_scale(latent, codes[k], k, schedule)
            inputs.append(self.scale_input(latent, grid))
        return torch.cat(inputs, dim=1)

    def decode(self, latent: Tensor) -> Tensor:
        """Latent (B, codebook_dim, h, w) -> images (B, 3, h * stride, w * stride) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(latent)).clamp(-1, 1)
