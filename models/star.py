"""STAR (Davinci-XLab/STAR-T2I): VAR's next-scale transformer turned text-to-image, written to match the official
checkpoints (`star_rope_d30_256-...pth`, `star_rope_d30_1024_drop_3-...pth`, their `['trainer']['var_wo_ddp']`).

STAR predicts, scale by scale, one index into VAR's 4,096-entry VQVAE codebook per token (models/vqvae.py, used
unchanged). Against VAR (models/var.py, whose layout it keeps):
- no AdaLN anywhere: every block is `x += SA(LN x); x += CA(LN x, text); x += FFN(LN x)` with one parameter-free
  LayerNorm (eps 1e-6), and the head is a parameter-free LayerNorm (`logit_norm`) then `head_logits`;
- the text is a CLIP text tower's (1024-d; models/text_encoder.py `CLIPTextEncoder`): its pooled output, through
  `encoder_proj`, is the start token (plus `pos_start`, then the level embedding as VAR); its 77 token features
  feed a cross-attention in every block, each block projecting them with its own `mat_kv` at every scale;
- the null text of CFG is CLIP(""), not learned; `class_emb` is built (it is in the files) but never used;
- no absolute positions: a 2-D RoPE whose coordinates are rescaled so that every scale spans the same [0, 64]
  grid corner to corner (`rope_coordinates`); pairs 0..hd/4-1 rotate by the column, the rest by the row;
- self- and cross-attention are both VAR's cosine attention (L2-normalised q, k, a clamped per-head temperature,
  softmax scale 1, the [q_bias, zero_k_bias, v_bias] layout).

Self-attention is Infinity's `SelfAttention`, which normalises q, k and applies the temperature before RoPE; the
official code rotates first. A rotation keeps norms, so the two agree to fp32 rounding (5e-7 on unit-scale inputs,
tests/test_star.py), not bit for bit.

The cross-attention row rule (`STARConfig.ca_source`). The official block adds `cross_attn(...)[0]`: batch row
0's cross-attention output, broadcast to every row. At batch 1 with CFG the null row thus receives the prompt row's
cross-attention, and cond and null rows differ only through their start tokens (CLIP pooled of the prompt vs of "")
and what self-attention carries from them; the released weights were trained that way. `"per_prompt"` (default)
generalises this per prompt, so that a batch of B prompts gives the images of B runs at batch 1: every row
computes its cross-attention (the official cost), then row b and its null row B + b both take prompt b's
conditional row's output. After the sampler drops a CFG branch (`rows(slice(B, 2B))`), a null row whose source row
is gone computes its own cross-attention, with its prompt's text tokens and mask (which the null rows carry for this
reason; their start token still comes from CLIP("")'s pooled vector). `"own_row"` is plain per-row cross-attention,
each row with its own text (the null rows with CLIP("")'s tokens), for ablations. The official batch > 1 behaviour
(every image takes prompt 0's cross-attention) is not reproduced. Under a token subset or router that picks
positions per row (FastVAR's pivotal tokens, norm-sampled indices), a row takes its source row's output token slot
by token slot, as the official `[0]` does on reduced tokens (FasterVAR's STAR).

Not in the state dict, as in the files: the RoPE table, the per-token scale index and the block-causal training
mask (made when needed; the 1024 px mask is 357 MB). The intra-scale "Causal-Driven Stable Sampling" head of the
sampler checkpoint (section E of the key listing) is not implemented: the public 1024 weights do not contain it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.infinity import (
    MAX_LOG_TEMPERATURE,
    BlockStack,
    FeedForward,
    KVCache,
    Rope,
    Router,
    SelfAttention,
    cross_attention_macs,
    feed_forward_macs,
    run_on_all_tokens,
    self_attention_macs,
)
from models.schedules import Grid
from models.var import PATCH_NUMS_256, PATCH_NUMS_512, SquareScales

if TYPE_CHECKING:  # the text encoder's module imports transformers, which the model itself does not need
    from models.text_encoder import CLIPTextTokens

PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
# (resolution, depth) -> schedule of the released models: star_256_d16, star_256_d30, star_512_d30, star_1024_d30.
RELEASES: dict[tuple[int, int], tuple[int, ...]] = {
    (256, 16): PATCH_NUMS_256,
    (256, 30): PATCH_NUMS_256,
    (512, 30): PATCH_NUMS_512,
    (1024, 30): PATCH_NUMS_1024,
}
CA_SOURCES = ("per_prompt", "own_row")


@dataclass
class STARConfig(SquareScales):
    depth: int = 30
    embed_dim: int = 1920  # 64 * depth in every release
    num_heads: int = 30  # = depth (head dim 64)
    text_channels: int = 1024  # CLIP's width (SD-2.1's OpenCLIP-ViT-H text tower)
    codebook_size: int = 4096
    token_channels: int = 32  # the VQVAE's code width (Cvae)
    patch_nums: tuple[int, ...] = PATCH_NUMS_1024
    num_classes: int = 1000  # the vestigial `class_emb` has one more row
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    rope_norm: float = 64.0  # every scale's RoPE coordinates span [0, rope_norm]
    rope_theta: float = 1e4
    logit_norm: bool = True  # the parameter-free LayerNorm before the head (the configs' "logit_norm": true)
    ca_source: str = "per_prompt"  # which row's cross-attention a row takes: see the module docstring

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads", "text_channels", "codebook_size", "token_channels",
                     "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim={self.embed_dim} must split into {self.num_heads} heads of a size divisible "
                             "by 4 (RoPE rotates a quarter of each head's dims by the column, a quarter by the row)")
        self.patch_nums = tuple(self.patch_nums)
        if not self.patch_nums or min(self.patch_nums) < 1:
            raise ValueError(f"patch_nums={self.patch_nums} must list scales of at least 1x1")
        if not self.rope_norm > 0 or not self.rope_theta > 0:
            raise ValueError(f"rope_norm={self.rope_norm} and rope_theta={self.rope_theta} must be positive")
        if self.ca_source not in CA_SOURCES:
            raise ValueError(f"ca_source={self.ca_source!r} is not one of {list(CA_SOURCES)}")

    @classmethod
    def release(cls, resolution: int, depth: int, **overrides) -> STARConfig:
        """The released models: star_256_d16, star_256_d30, star_512_d30, star_1024_d30."""
        if (resolution, depth) not in RELEASES:
            known = ", ".join(f"star_{r}_d{d}" for r, d in RELEASES)
            raise ValueError(f"STAR at {resolution} px with depth {depth} was not released; the releases are {known}")
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=RELEASES[resolution, depth],
                   **overrides)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    # --- costs (accel/macs.py), multiply-accumulates per batch row ------------------------------------------
    # C width, Ct text width, n the branch's tokens, L the block's KV length after the scale, T the text tokens.

    @property
    def branches(self) -> tuple[str, ...]:
        return ("sa", "ca", "ffn")

    def branch_macs(self, name: str, tokens: int, kv_length: int, text_length: int) -> int:
        C = self.embed_dim
        if name == "sa":
            return self_attention_macs(C, tokens, kv_length)
        if name == "ca":  # each block projects the raw CLIP tokens at every scale, as the official code; every row
            # runs it, including those that take another row's output
            return cross_attention_macs(C, tokens, text_length, text_width=self.text_channels)
        return feed_forward_macs(C, self.mlp_hidden, tokens)

    def scale_macs(self, tokens: int) -> int:
        """The head: one logit per codebook entry (STAR has no AdaLN to recompute)."""
        return self.codebook_size * self.embed_dim * tokens


# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding: every scale spans the same grid


def rope_coordinates(grid: Grid, norm: float) -> tuple[Tensor, Tensor]:
    """(x, y) of a grid's tokens in raster order, float32: column / (w - 1) * norm and row / (h - 1) * norm, so the
    grid spans [0, norm] corner to corner (s = 5, norm 64: 0, 16, 32, 48, 64); an axis of one token sits at 0."""
    h, w = grid

    def axis(size: int) -> Tensor:
        steps = torch.arange(size, dtype=torch.float32)
        return steps / (size - 1) * norm if size > 1 else steps

    return axis(w).repeat(h), axis(h).repeat_interleave(w)


def rope_frequencies(head_dim: int, theta: float) -> Tensor:
    """The hd/4 frequencies theta^(-4k / hd), k = 0 .. hd/4 - 1, float32 (hd 64: theta^(-k/16))."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))


def star_rope(grid: Grid, head_dim: int, norm: float, theta: float) -> Rope:
    """The rotation of a grid's tokens: interleaved pairs (2i, 2i+1); pairs 0 .. hd/4 - 1 turn by x * f_k, pairs
    hd/4 .. hd/2 - 1 by y * f_k. Rope.cos / sin are (1, 1, h * w, hd / 2)."""
    xs, ys = rope_coordinates(grid, norm)
    frequencies = rope_frequencies(head_dim, theta)
    angles = torch.cat((xs[:, None] * frequencies, ys[:, None] * frequencies), dim=-1)[None, None]
    return Rope(angles.cos(), angles.sin())


# ----------------------------------------------------------------------------------------------------------
# Conditioning


@dataclass
class STARTextCondition:
    """Per-row text conditioning. Under CFG, rows [0, B) are the prompts and [B, 2B) the null text "".

    `pooled` is each row's own (CLIP pooled of the prompt, or of ""): the start token. `text` / `text_mask` are what
    the row's cross-attention reads (for the null rows under "per_prompt": their prompt's). `ca_source[r]`: the row
    whose cross-attention output row r takes (its own index, or its prompt's conditional row).
    """

    pooled: Tensor  # (R, Ct)
    text: Tensor  # (R, T, Ct)
    text_mask: Tensor  # (R, T) bool, True at valid text tokens
    ca_source: tuple[int, ...]
    text_bias: Tensor = field(init=False, repr=False)  # (R, 1, 1, T) fp32, 0 at valid tokens and -inf at padding
    _ca_index: Tensor | None = field(init=False, repr=False)  # ca_source on the device; None when every row is its own

    def __post_init__(self) -> None:
        rows = self.pooled.shape[0]
        if len(self.ca_source) != rows or self.text.shape[0] != rows or self.text_mask.shape != self.text.shape[:2]:
            shapes = (f"pooled {tuple(self.pooled.shape)}, text {tuple(self.text.shape)}, "
                      f"mask {tuple(self.text_mask.shape)}")
            raise ValueError(f"condition rows disagree: {shapes}, {len(self.ca_source)} sources")
        bias = torch.zeros(self.text_mask.shape, dtype=torch.float32, device=self.text_mask.device)
        self.text_bias = bias.masked_fill(~self.text_mask, -torch.inf)[:, None, None, :]
        own = self.ca_source == tuple(range(rows))
        self._ca_index = None if own else torch.tensor(self.ca_source, device=self.pooled.device)

    @property
    def num_rows(self) -> int:
        return self.pooled.shape[0]

    def rows(self, index: Tensor | slice) -> STARTextCondition:
        """Some rows (e.g. one CFG branch). A row whose cross-attention source is not kept becomes its own source."""
        if isinstance(index, slice):
            kept = list(range(self.num_rows))[index]
        else:
            index = torch.as_tensor(index)
            index = index.nonzero().flatten() if index.dtype == torch.bool else index
            kept = [int(i) % self.num_rows for i in index.tolist()]
        position: dict[int, int] = {}
        for new, old in enumerate(kept):
            position.setdefault(old, new)
        sources = tuple(position.get(self.ca_source[old], new) for new, old in enumerate(kept))
        return STARTextCondition(self.pooled[index], self.text[index], self.text_mask[index], sources)

    def take_cross_attention(self, outputs: Tensor) -> Tensor:
        """Every row's own cross-attention output (R, n, C) -> what each row adds: its source row's."""
        return outputs if self._ca_index is None else outputs.index_select(0, self._ca_index)


# ----------------------------------------------------------------------------------------------------------
# Modules


class QKNormCrossAttention(nn.Module):
    """Cosine cross-attention from image tokens to the text tokens (VAR's attention with `attn_l2_norm`): q from
    `mat_q` + q_bias, k, v from the raw text through `mat_kv` + [zero_k_bias, v_bias], L2-normalised q and k, q times
    the clamped per-head temperature, softmax scale 1, the padding masked by an additive -inf bias."""

    def __init__(self, embed_dim: int, text_channels: int, num_heads: int):
        super().__init__()
        C = embed_dim
        self.num_heads = num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.mat_kv = nn.Linear(text_channels, 2 * C, bias=False)
        self.mat_q = nn.Linear(C, C, bias=False)
        self.proj = nn.Linear(C, C)

    def forward(self, x: Tensor, text: Tensor, text_bias: Tensor) -> Tensor:
        """x (R, n, C), text (R, T, Ct), text_bias (R, 1, 1, T) -> (R, n, C)."""
        B, n, C = x.shape
        T = text.shape[1]
        q = F.linear(x, self.mat_q.weight, self.q_bias).view(B, n, self.num_heads, -1).transpose(1, 2)
        kv = F.linear(text, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(B, T, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (R, H, T, hd)
        temperature = self.scale_mul_1H11.clamp(max=MAX_LOG_TEMPERATURE).exp()
        q = F.normalize(q, dim=-1) * temperature
        k = F.normalize(k, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=text_bias.to(q.dtype), scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, n, C).to(x.dtype))


class STARBlock(nn.Module):
    """x += SA(LN x);  x += CA(LN x, text)[of the row's source];  x += FFN(LN x). One parameter-free LayerNorm."""

    def __init__(self, config: STARConfig, index: int):
        super().__init__()
        C = config.embed_dim
        self.index = index
        self.eps = config.norm_eps
        self.attn = SelfAttention(C, config.num_heads)
        self.cross_attn = QKNormCrossAttention(C, config.text_channels, config.num_heads)
        self.ffn = FeedForward(C, config.mlp_hidden)

    def norm(self, x: Tensor) -> Tensor:
        """LayerNorm without affine, in fp32 (as autocast runs it), back in the stream's dtype."""
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def forward(
        self, x: Tensor, condition: STARTextCondition, rope: Rope, cache: KVCache | None,
        router: Router = run_on_all_tokens, attn_mask: Tensor | None = None,
    ) -> Tensor:
        def self_attention(tokens: Tensor, tokens_rope: Rope) -> Tensor:
            return self.attn(self.norm(tokens), tokens_rope, cache, self.index, attn_mask)

        def cross_attention(tokens: Tensor, tokens_rope: Rope) -> Tensor:
            own = self.cross_attn(self.norm(tokens), condition.text, condition.text_bias)
            return condition.take_cross_attention(own)

        def feed_forward(tokens: Tensor, tokens_rope: Rope) -> Tensor:
            return self.ffn(self.norm(tokens))

        x = x + router("sa", self.index, x, rope, self_attention)
        x = x + router("ca", self.index, x, rope, cross_attention)
        return x + router("ffn", self.index, x, rope, feed_forward)


class LogitHead(nn.Linear):
    """`head_logits`: the parameter-free `logit_norm` LayerNorm (when on), then Linear(C -> codebook), in fp32 with
    autocast off. Calling it is the transformer's `head_logits(hidden, condition)` (models/family.py); STAR's head
    reads no condition."""

    def __init__(self, embed_dim: int, codebook_size: int, norm_eps: float | None):
        super().__init__(embed_dim, codebook_size)
        self.norm_eps = norm_eps

    def forward(self, hidden: Tensor, condition: STARTextCondition | None = None) -> Tensor:
        """(R, n, C) -> (R, n, codebook_size) logits in fp32."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden = hidden.float()
            if self.norm_eps is not None:
                hidden = F.layer_norm(hidden, (hidden.shape[-1],), eps=self.norm_eps)
            return super().forward(hidden)


# ----------------------------------------------------------------------------------------------------------
# The model


class STAR(BlockStack, nn.Module):
    def __init__(self, config: STARConfig):
        super().__init__()
        self.config = config
        C = config.embed_dim
        init_std = math.sqrt(1 / C / 3)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * init_std)
        self.word_embed = nn.Linear(config.token_channels, C)
        self.class_emb = nn.Embedding(config.num_classes + 1, C)  # in the files, never used
        self.lvl_embed = nn.Embedding(len(config.patch_nums), C)
        self.blocks = nn.ModuleList(STARBlock(config, i) for i in range(config.depth))
        self.head_logits = LogitHead(C, config.codebook_size, config.norm_eps if config.logit_norm else None)
        self.encoder_proj = nn.Linear(config.text_channels, C)

    def init_weights(self, std: float = 0.02) -> None:
        """Initialisation for random-weight runs (checkpoints overwrite everything); residual branches start small,
        so that a random model's logits are not saturated."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
        for block in self.blocks:
            for linear in (block.attn.proj, block.cross_attn.proj, block.ffn.fc2):
                linear.weight.data.mul_(1 / math.sqrt(2 * self.config.depth))

    # --- condition --------------------------------------------------------------------------------------

    def condition(self, encoded: CLIPTextTokens, with_null: bool) -> STARTextCondition:
        """CLIP's reading of B prompts -> conditioning rows on the model's device; with `with_null`, B rows of the
        null text follow (its pooled vector CLIP(""), `encoded.null`; their cross-attention per `ca_source`)."""
        device = self.pos_start.device
        features, mask, pooled = (encoded.features.to(device).float(), encoded.mask.to(device).bool(),
                                  encoded.pooled.to(device).float())
        if features.shape[-1] != self.config.text_channels or pooled.shape[-1] != self.config.text_channels:
            raise ValueError(f"text features have {features.shape[-1]} channels; this STAR reads "
                             f"text_channels={self.config.text_channels}")
        B = features.shape[0]
        if not with_null:
            return STARTextCondition(pooled, features, mask, tuple(range(B)))
        null = encoded.null
        if null is None:
            raise ValueError("CFG needs the null text CLIP(\"\"), but the text encoder's output has no `null`")
        if null.features.shape[1:] != features.shape[1:]:
            raise ValueError(f"the null text's features {tuple(null.features.shape)} do not match the prompts' "
                             f"{tuple(features.shape)}")
        null_pooled = null.pooled.to(device).float().expand(B, -1)
        if self.config.ca_source == "per_prompt":
            text, text_mask = torch.cat((features, features)), torch.cat((mask, mask))
            sources = tuple(range(B)) * 2
        else:
            null_text = null.features.to(device).float().expand(B, -1, -1)
            text = torch.cat((features, null_text))
            text_mask = torch.cat((mask, null.mask.to(device).bool().expand(B, -1)))
            sources = tuple(range(2 * B))
        return STARTextCondition(torch.cat((pooled, null_pooled)), text, text_mask, sources)

    # --- inputs -----------------------------------------------------------------------------------------

    def start_tokens(self, condition: STARTextCondition) -> Tensor:
        """Input of the first (1x1) scale: the projected pooled text plus the learned start position."""
        return self.encoder_proj(condition.pooled).unsqueeze(1) + self.pos_start

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """The accumulated latent at the scale's grid (B, n, Cvae) -> (B, n, C)."""
        return self.word_embed(tokens.float())

    def add_level(self, x: Tensor, scale_index: int | Tensor) -> Tensor:
        """Add the level embedding (an int scale index, or (n,) per-token indices for a whole sequence)."""
        return x + (self.lvl_embed.weight[scale_index] if isinstance(scale_index, int) else self.lvl_embed(scale_index))

    def rope(self, grid: Grid, rope_grid: Grid) -> Rope:
        """The rotation of a grid's tokens on the model's device. Every scale spans [0, rope_norm] on its own, so
        the sampler's `rope_grid` plays no part."""
        rope = star_rope(grid, self.config.head_dim, self.config.rope_norm, self.config.rope_theta)
        device = self.pos_start.device
        return Rope(rope.cos.to(device), rope.sin.to(device))

    # --- transformer ------------------------------------------------------------------------------------

    @property
    def chunks(self) -> list[list[STARBlock]]:
        return [list(self.blocks)]

    # `head_logits(hidden, condition)` is the `head_logits` module (LogitHead): the official name of the head.

    def forward(self, scale_inputs: Tensor, condition: STARTextCondition) -> Tensor:
        """Teacher-forced logits of the whole sequence with the block-causal mask (the official training pass).

        `scale_inputs` (R, L - 1, Cvae): the inputs of scales 1..K-1 in order. Returns (R, L, codebook_size).
        """
        schedule = self.config.schedule
        tokens = torch.cat((self.start_tokens(condition), self.embed_tokens(scale_inputs)), dim=1)
        sizes = torch.tensor([h * w for h, w in schedule], device=tokens.device)
        scale_of_token = torch.repeat_interleave(torch.arange(len(schedule), device=tokens.device), sizes)
        block_causal = scale_of_token[:, None] >= scale_of_token[None, :]
        mask = torch.zeros(block_causal.shape, device=tokens.device).masked_fill(~block_causal, -torch.inf)
        rope = Rope.cat([self.rope(grid, schedule[-1]) for grid in schedule])
        hidden, _ = self.run_blocks(self.add_level(tokens, scale_of_token), self.blocks, condition, rope,
                                    attn_mask=mask.to(tokens.dtype))
        return self.head_logits(hidden, condition)
