"""The Infinity transformer (bitwise next-scale prediction), written to match the official checkpoints.

One file, nanoGPT style: a config dataclass, the attention / block modules, and the model, which exposes the
pieces a scale loop needs (text conditioning with the null branch, scale-input embedding, the blocks with a
KV cache and optional token subsets, the bitwise head). The scale loop itself lives in `accel/sampler.py`.

Parameter names and shapes are those of `infinity_2b_reg.pth` (blocks grouped as
`block_chunks.{i // per_chunk}.module.{i % per_chunk}`), and the math follows the official inference path:
shared AdaLN with a per-block bias, cosine self-attention with a clamped per-head temperature and softmax
scale 1, interleaved-pair 2-D RoPE normalised to the final grid, level embedding before block 0 only,
attentive text pooling for the start token and the AdaLN condition, cross-attention over valid text tokens,
a learned null text for CFG, and a head with two logits per bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.schedules import Grid

if TYPE_CHECKING:  # the text encoder's module imports transformers, which the model itself does not need
    from models.text_encoder import TextTokens

MAX_LOG_TEMPERATURE = math.log(100.0)


@dataclass
class InfinityConfig:
    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    text_channels: int = 2048  # width of the text encoder's features (flan-t5-xl: 2048)
    text_maxlen: int = 512  # rows of the learned null text `cfg_uncond`
    bits_per_token: int = 32  # head predicts 2 logits per bit
    block_chunks: int = 8  # only affects parameter names
    num_levels: int = 15  # rows of the level (scale index) embedding
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        # Official width: rounded to a multiple of 256 (8192 for 2B); tiny test models keep the plain ratio.
        hidden = self.embed_dim * self.mlp_ratio
        return round(hidden / 256) * 256 if hidden >= 256 else round(hidden)

    @property
    def pool_heads(self) -> int:
        # The text pool's head count follows the text width: 2048 / 128 = 16 for both 2B and 8B.
        return max(1, self.text_channels // 128 if self.text_channels <= 4096 else self.text_channels // 64)

    def __post_init__(self) -> None:
        counts = ("depth", "embed_dim", "num_heads", "text_channels", "text_maxlen", "bits_per_token", "block_chunks",
                  "num_levels")
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        if self.embed_dim % self.num_heads or self.head_dim % 4:
            raise ValueError(f"embed_dim={self.embed_dim} must split into {self.num_heads} heads of a size divisible by 4")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth={self.depth} must be a multiple of block_chunks={self.block_chunks}")

    # --- costs (accel/macs.py), multiply-accumulates per batch row ------------------------------------------
    # C width, F FFN width, n the branch's tokens, L the block's KV length after the scale, T the (padded) text
    # length, b bits per token, M the scale's tokens. The text's AdaLN and pooling run once per generation.

    @property
    def branches(self) -> tuple[str, ...]:
        return ("sa", "ca", "ffn")

    def branch_macs(self, name: str, tokens: int, kv_length: int, text_length: int) -> int:
        C = self.embed_dim
        if name == "sa":
            return self_attention_macs(C, tokens, kv_length)
        if name == "ca":  # the text is projected to the width C once per generation, then each block's K/V
            return cross_attention_macs(C, tokens, text_length, text_width=C)
        return feed_forward_macs(C, self.mlp_hidden, tokens)

    def scale_macs(self, tokens: int) -> int:
        """The head: its AdaLN from the pooled text, and two logits per bit."""
        return 2 * self.embed_dim**2 + 2 * self.bits_per_token * self.embed_dim * tokens

    @classmethod
    def infinity_2b(cls) -> InfinityConfig:
        return cls(depth=32, embed_dim=2048, num_heads=16, bits_per_token=32)

    @classmethod
    def infinity_8b(cls) -> InfinityConfig:
        return cls(depth=40, embed_dim=3584, num_heads=28, bits_per_token=56)


# Multiply-accumulates per batch row of the branches every family shares (accel/macs.py sums them).


def self_attention_macs(width: int, tokens: int, kv_length: int) -> int:
    """q, k, v and out projections of `tokens` tokens; QK^T and AV over the KV cache of `kv_length`."""
    return 4 * width * width * tokens + 2 * width * tokens * kv_length


def cross_attention_macs(width: int, tokens: int, text_length: int, text_width: int) -> int:
    """q and out projections; the text's K/V from `text_width` channels; QK^T and AV over the text."""
    return 2 * width * width * tokens + 2 * width * text_width * text_length + 2 * width * tokens * text_length


def feed_forward_macs(width: int, hidden: int, tokens: int) -> int:
    return 2 * width * hidden * tokens


# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding


@dataclass
class Rope:
    """cos / sin of the rotation angles for the tokens of one forward pass, shape (B or 1, 1, n, head_dim / 2)."""

    cos: Tensor
    sin: Tensor

    def rotate(self, x: Tensor) -> Tensor:
        """Rotate interleaved pairs (2i, 2i+1) of the last dim: (a, b) -> (a cos - b sin, a sin + b cos)."""
        pairs = x.float().unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((a * self.cos - b * self.sin, a * self.sin + b * self.cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    @staticmethod
    def cat(ropes: list[Rope]) -> Rope:
        return Rope(torch.cat([r.cos for r in ropes], dim=2), torch.cat([r.sin for r in ropes], dim=2))

    def at(self, positions: Tensor) -> Rope:
        """The angles of a subset of this scale's tokens: raster positions (r,) shared by all rows, or (R, r)."""
        if positions.dim() == 1:
            return Rope(self.cos[:, :, positions], self.sin[:, :, positions])
        index = positions[:, None, :, None].expand(-1, 1, -1, self.cos.shape[-1])
        rows = positions.shape[0]
        return Rope(*(angles.expand(rows, -1, -1, -1).gather(2, index) for angles in (self.cos, self.sin)))


def grid_positions(grid: Grid, final_grid: Grid) -> tuple[Tensor, Tensor]:
    """Integer (y, x) coordinates of a grid's tokens on the final grid, in raster order ("star style").

    `round` is half-to-even on the float32 products, as in the official cache.
    """
    (h, w), (final_h, final_w) = grid, final_grid
    ys = (torch.arange(h) * (final_h / h)).round().long()
    xs = (torch.arange(w) * (final_w / w)).round().long()
    return ys.repeat_interleave(w), xs.repeat(h)


def rope_angles(config: InfinityConfig, ys: Tensor, xs: Tensor) -> Rope:
    """Angles for tokens at integer coordinates: the first quarter of pairs rotate by y, the rest by x."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    angles = torch.cat((ys.float()[..., None] * inv_freq, xs.float()[..., None] * inv_freq), dim=-1)
    angles = angles.unsqueeze(-3) if angles.dim() == 3 else angles[None, None]  # (B|1, 1, n, half)
    return Rope(angles.cos(), angles.sin())


# ----------------------------------------------------------------------------------------------------------
# Conditioning shared by all blocks


@dataclass
class TextCondition:
    """Per-row text conditioning. Under CFG, rows [0, B) are conditional and [B, 2B) the null text."""

    pooled: Tensor  # (R, C): pooled text, start token and AdaLN input
    ada: Tensor  # (R, 1, 6, C): shared AdaLN output, before each block adds its own bias
    memory: Tensor  # (R, L, C): cross-attention keys/values source
    memory_mask: Tensor  # (R, L) bool, True at valid text tokens

    def rows(self, index: Tensor | slice) -> TextCondition:
        return TextCondition(self.pooled[index], self.ada[index], self.memory[index], self.memory_mask[index])

    @property
    def num_rows(self) -> int:
        return self.pooled.shape[0]


class KVCache:
    """Keys (after RoPE) and values of every scale seen so far, one entry per block.

    Each block's buffers hold `capacity` tokens (the whole schedule), allocated at its first scale: a scale
    writes its k, v in place and attention reads a view of what is filled, instead of re-concatenating the
    cache (a new allocation and a copy of everything cached) at every scale.
    """

    def __init__(self, depth: int, capacity: int):
        self.capacity = capacity
        self.keys: list[Tensor | None] = [None] * depth
        self.values: list[Tensor | None] = [None] * depth
        self.filled = [0] * depth

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this scale's k, v (B, H, n, hd) and return everything cached for the layer."""
        if self.keys[layer] is None:
            self.keys[layer] = k.new_empty(*k.shape[:2], self.capacity, k.shape[3])
            self.values[layer] = v.new_empty(*v.shape[:2], self.capacity, v.shape[3])
        start, end = self.filled[layer], self.filled[layer] + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} tokens is full: block {layer} needs {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.filled[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def copy(self) -> KVCache:
        """A cache of its own with the same entries, for a fork of a generation to write its next scales into.
        Only the filled tokens are copied: the rest of each buffer is written before it is read."""
        copied = KVCache(len(self.keys), self.capacity)
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            if keys is not None:
                end = self.filled[layer]
                copied.keys[layer], copied.values[layer] = keys.new_empty(keys.shape), values.new_empty(values.shape)
                copied.keys[layer][:, :, :end] = keys[:, :, :end]
                copied.values[layer][:, :, :end] = values[:, :, :end]
        copied.filled = list(self.filled)
        return copied

    def keep_rows(self, index: Tensor | slice) -> None:
        """Keep only some batch rows, e.g. the null-text half when CFG is dropped."""
        self.keys = [None if k is None else k[index] for k in self.keys]
        self.values = [None if v is None else v[index] for v in self.values]

    def lengths(self) -> list[int]:
        return list(self.filled)


# A router decides which tokens a residual branch sees (FastVAR-style pruning). It receives the branch name
# ("sa", "ca" or "ffn"), the block index, the residual stream x (B, n, C), the Rope of its tokens and the
# branch as a function of (tokens, rope); it returns the branch output for all n tokens.
BranchFn = Callable[[Tensor, Rope], Tensor]
Router = Callable[[str, int, Tensor, Rope, BranchFn], Tensor]


def run_on_all_tokens(name: str, layer: int, x: Tensor, rope: Rope, branch: BranchFn) -> Tensor:
    return branch(x, rope)


# ----------------------------------------------------------------------------------------------------------
# Modules


def ada_layer_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine in fp32, then the AdaLN modulation x * (1 + scale) + shift."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return normed * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Cosine attention over the cached scales: L2-normalised q, k, a clamped learned temperature, scale 1."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        C, H = embed_dim, num_heads
        self.num_heads = H
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(C, C)

    def forward(self, x: Tensor, rope: Rope, cache: KVCache | None, layer: int, attn_mask: Tensor | None) -> Tensor:
        B, n, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, n, hd)
        temperature = self.scale_mul_1H11.clamp(max=MAX_LOG_TEMPERATURE).exp()
        q = rope.rotate(F.normalize(q, dim=-1) * temperature)
        k = rope.rotate(F.normalize(k, dim=-1))
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=attn_mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, n, C).to(x.dtype))


class CrossAttention(nn.Module):
    """Softmax attention from image tokens (or a learned pooling query) to the valid text tokens."""

    def __init__(self, embed_dim: int, kv_channels: int, num_heads: int, pool_query: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = embed_dim // num_heads
        if pool_query:
            self.mat_q = nn.Parameter(torch.randn(1, num_heads, head_dim) * head_dim**-0.5)
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_channels, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor | None, memory: Tensor, memory_mask: Tensor) -> Tensor:
        B, L, _ = memory.shape
        kv = F.linear(memory, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(B, L, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd)
        if isinstance(self.mat_q, nn.Parameter):  # pooling: one learned query per head
            q = self.mat_q.unsqueeze(2).expand(B, -1, -1, -1)  # (B, H, 1, hd)
        else:
            q = self.mat_q(x).view(B, x.shape[1], self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=memory_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).flatten(2))


class TextAttentivePool(nn.Module):
    def __init__(self, text_channels: int, embed_dim: int, num_heads: int):
        super().__init__()
        self.ca = CrossAttention(embed_dim, text_channels, num_heads, pool_query=True)

    def forward(self, text: Tensor, mask: Tensor) -> Tensor:
        return self.ca(None, text, mask).squeeze(1)


class FeedForward(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttnBlock(nn.Module):
    """x += SA(AdaLN(x)) * gamma1;  x += CA(LN(x), text);  x += FFN(AdaLN(x)) * gamma2."""

    def __init__(self, config: InfinityConfig, index: int):
        super().__init__()
        C = config.embed_dim
        self.index = index
        self.eps = config.norm_eps
        # Per-block bias added to the shared AdaLN output; slices: gamma1, gamma2, scale1, scale2, shift1, shift2.
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        self.sa = SelfAttention(C, config.num_heads)
        self.ca = CrossAttention(C, C, config.num_heads)
        self.ffn = FeedForward(C, config.mlp_hidden)
        self.ca_norm = nn.LayerNorm(C, eps=config.norm_eps)

    def forward(
        self,
        x: Tensor,
        text: TextCondition,
        rope: Rope,
        cache: KVCache | None,
        router: Router = run_on_all_tokens,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + text.ada).unbind(2)

        def self_attention(tokens: Tensor, tokens_rope: Rope) -> Tensor:
            modulated = ada_layer_norm(tokens, scale1, shift1, self.eps).to(tokens.dtype)
            return self.sa(modulated, tokens_rope, cache, self.index, attn_mask) * gamma1

        def cross_attention(tokens: Tensor, tokens_rope: Rope) -> Tensor:
            # In fp32 with fp32 copies of its (bf16) parameters, as bf16 autocast runs LayerNorm on CUDA.
            norm = self.ca_norm
            normed = F.layer_norm(tokens.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
            return self.ca(normed, text.memory, text.memory_mask)

        def feed_forward(tokens: Tensor, tokens_rope: Rope) -> Tensor:
            return self.ffn(ada_layer_norm(tokens, scale2, shift2, self.eps).to(tokens.dtype)) * gamma2

        x = x + router("sa", self.index, x, rope, self_attention)
        x = x + router("ca", self.index, x, rope, cross_attention)
        return x + router("ffn", self.index, x, rope, feed_forward)


class _BlockChunk(nn.Module):
    """Official checkpoints group blocks in chunks; kept only so that parameter names match."""

    def __init__(self, blocks: list[CrossAttnBlock]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * embed_dim))

    def forward(self, x: Tensor, pooled: Tensor) -> Tensor:
        scale, shift = self.ada_lin(pooled).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return ada_layer_norm(x, scale, shift, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


# ----------------------------------------------------------------------------------------------------------
# The model


class BlockStack:
    """The block loop every family's transformer shares (Infinity, VAR, STAR): blocks called as
    block(x, condition, rope, cache, router, attn_mask), each with an `index`."""

    def run_blocks(
        self,
        x: Tensor,
        blocks: Sequence[nn.Module],
        condition: object,
        rope: object,
        cache: KVCache | None = None,
        router: Router = run_on_all_tokens,
        attn_mask: Tensor | None = None,
        capture: Iterable[int] = (),
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run `blocks` in order on tokens x (B, n, C); returns the output and that of the blocks in `capture`."""
        capture = set(capture)
        captured: dict[int, Tensor] = {}
        for block in blocks:
            x = block(x, condition, rope, cache, router, attn_mask)
            if block.index in capture:
                captured[block.index] = x
        return x, captured


class Infinity(BlockStack, nn.Module):
    def __init__(self, config: InfinityConfig):
        super().__init__()
        self.config = config
        C, Ct = config.embed_dim, config.text_channels
        self.cfg_uncond = nn.Parameter(torch.randn(config.text_maxlen, Ct) * 1.2 / Ct**0.5)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * 0.02)
        self.text_norm = RMSNorm(Ct, config.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct, C, config.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(config.num_levels, C)
        self.word_embed = nn.Linear(config.bits_per_token, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        per_chunk = config.depth // config.block_chunks
        blocks = [CrossAttnBlock(config, i) for i in range(config.depth)]
        self.block_chunks = nn.ModuleList(
            _BlockChunk(blocks[c * per_chunk : (c + 1) * per_chunk]) for c in range(config.block_chunks)
        )
        self.head_nm = AdaLNBeforeHead(C, config.norm_eps)
        self.head = nn.Linear(C, 2 * config.bits_per_token)

    @property
    def blocks(self) -> list[CrossAttnBlock]:
        return [block for chunk in self.block_chunks for block in chunk.module]

    def blocks_to(self, dtype: torch.dtype) -> None:
        """The official inference numerics with dtype=bf16: the blocks in bf16 (run under bf16 autocast); the
        embeddings, text path, norms before the head and the head stay fp32."""
        for block in self.blocks:
            block.to(dtype)

    def init_weights(self, std: float = 0.02) -> None:
        """Initialisation for training from scratch (checkpoints overwrite everything)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
        for block in self.blocks:  # residual branches start small so the stream is stable
            for linear in (block.sa.proj, block.ffn.fc2, block.ca.proj):
                linear.weight.data.mul_(1 / math.sqrt(2 * self.config.depth))
        nn.init.zeros_(self.head.weight)

    # --- text -------------------------------------------------------------------------------------------

    def condition(self, encoded: TextTokens, with_null: bool) -> TextCondition:
        """The text encoder's tokens -> conditioning rows, on the model's device (see `encode_text`)."""
        device = self.pos_start.device
        return self.encode_text(encoded.features.to(device), encoded.lengths.to(device), with_null)

    def encode_text(self, features: Tensor, lengths: Tensor, with_null: bool) -> TextCondition:
        """Text encoder features (B, L, Ct) with valid lengths (B,) -> conditioning rows.

        With `with_null`, B more rows follow: the learned null text `cfg_uncond[:len]` of each prompt's length.
        """
        L = features.shape[1]
        if L > self.config.text_maxlen:
            raise ValueError(f"text has {L} tokens, more than text_maxlen={self.config.text_maxlen}")
        mask = torch.arange(L, device=features.device)[None, :] < lengths[:, None]
        if with_null:
            features = torch.cat((features, self.null_text(lengths, L).to(features.dtype)))
            mask = torch.cat((mask, mask))
        normed = self.text_norm(features)
        pooled = self.text_proj_for_sos(normed, mask)
        ada = self.shared_ada_lin(pooled.float()).view(-1, 1, 6, self.config.embed_dim)
        return TextCondition(pooled, ada, self.text_proj_for_ca(normed), mask)

    def null_text(self, lengths: Tensor, num_tokens: int) -> Tensor:
        """The learned null text `cfg_uncond[:len]` at each prompt's length, zero-padded to (B, num_tokens, Ct)."""
        mask = torch.arange(num_tokens, device=lengths.device)[None, :] < lengths[:, None]
        return self.cfg_uncond[:num_tokens].unsqueeze(0) * mask[..., None]

    # --- inputs -----------------------------------------------------------------------------------------

    def start_tokens(self, text: TextCondition) -> Tensor:
        """Input of the first (1x1) scale: pooled text plus the learned start position."""
        return text.pooled.unsqueeze(1) + self.pos_start

    def embed_tokens(self, code_tokens: Tensor) -> Tensor:
        """Scale input: accumulated codes at the scale's grid (B, n, bits) -> (B, n, C)."""
        return self.word_embed(code_tokens.float())

    def rope(self, grid: Grid, final_grid: Grid) -> Rope:
        """Rope of a grid's tokens, on the model's device (`Rope.at` picks a subset)."""
        rope = rope_angles(self.config, *grid_positions(grid, final_grid))
        device = self.pos_start.device
        return Rope(rope.cos.to(device), rope.sin.to(device))

    # --- transformer ------------------------------------------------------------------------------------

    @property
    def chunks(self) -> list[list[CrossAttnBlock]]:
        """The blocks in their checkpoint chunks (the unit of the released StageVAR's token reduction)."""
        return [list(chunk.module) for chunk in self.block_chunks]

    def add_level(self, x: Tensor, scale_index: int | Tensor) -> Tensor:
        """Add the level (scale index) embedding to the tokens, as before the first block.

        `scale_index` is an int, or a (n,) tensor of per-token scale indices for a full sequence.
        """
        # An int indexes the table directly: a tensor made from it would be a host-to-device copy per scale.
        return x + (self.lvl_embed.weight[scale_index] if isinstance(scale_index, int) else self.lvl_embed(scale_index))

    def head_logits(self, hidden: Tensor, text: TextCondition) -> Tensor:
        """(B, n, C) -> (B, n, 2 * bits) logits in fp32; logits[2k], logits[2k+1] score bit k = 0, 1."""
        device_type = hidden.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.head(self.head_nm(hidden.float(), text.pooled.float()))

    def forward(self, scale_inputs: Tensor, text: TextCondition, schedule: list[Grid], rope_grid: Grid) -> Tensor:
        """Teacher-forced logits for a whole sequence, with a block-causal mask (used for training).

        `scale_inputs` (B, L - 1, bits) holds the inputs of scales 1..K-1 in order (scale 0 is the start token);
        `rope_grid` is the grid RoPE coordinates are normalised to. Returns logits (B, L, 2 * bits).
        """
        tokens = torch.cat((self.start_tokens(text), self.embed_tokens(scale_inputs)), dim=1)
        sizes = torch.tensor([h * w for h, w in schedule], device=tokens.device)
        scale_of_token = torch.repeat_interleave(torch.arange(len(schedule), device=tokens.device), sizes)
        block_causal = scale_of_token[:, None] >= scale_of_token[None, :]
        rope = Rope.cat([self.rope(grid, rope_grid) for grid in schedule])
        tokens = self.add_level(tokens, scale_of_token)
        hidden, _ = self.run_blocks(tokens, self.blocks, text, rope, attn_mask=block_causal)
        return self.head_logits(hidden, text)
