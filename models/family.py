"""What a next-scale model family exposes to the one scale loop (accel/sampler.py).

A family is a transformer and a multi-scale tokenizer. The loop, every policy and every observer see only
these pieces, so Infinity (bitwise head, BSQ codes summed on the final grid), class-conditional VAR and STAR
(codebook indices, upsampled and refined by phi) run through the same code:

    condition = transformer.condition(text_encoder.encode(prompts), with_null)   rows [0, B) and [B, 2B): null
    scale 0:    x = transformer.start_tokens(condition)
    scale k>0:  x = transformer.embed_tokens(tokenizer.scale_input(latent, grid_k))
    x = transformer.add_level(x, k); the blocks of transformer.chunks with a KV cache, RoPE, routers, subsets
    logits = transformer.head_logits(hidden, condition)  ->  codes = tokenizer.sample(logits, ...)
    latent = tokenizer.add_scale(latent, codes, k, schedule); image = tokenizer.decode(latent)

A new family is a new model file implementing these protocols, never a branch inside the loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from models.schedules import Grid


class Condition(Protocol):
    """Per-row conditioning (text or class). Under CFG, rows [0, B) are conditional and [B, 2B) the null branch."""

    @property
    def num_rows(self) -> int: ...

    def rows(self, index: Tensor | slice) -> Condition: ...


class Positions(Protocol):
    """The positional rotation of one forward pass's tokens (RoPE, or none for absolute-position families)."""

    def rotate(self, x: Tensor) -> Tensor:
        """Queries or keys (R, H, n, head_dim) rotated to their tokens' positions."""
        ...

    def at(self, positions: Tensor) -> Positions:
        """The rotation of a subset of the scale's tokens: raster positions (r,) shared by all rows, or (R, r)."""
        ...


class TransformerCosts(Protocol):
    """A transformer config that knows its multiply-accumulates per batch row (accel/macs.py sums them)."""

    depth: int
    block_chunks: int

    @property
    def branches(self) -> tuple[str, ...]:
        """The residual branches of a block, in order, as routers see them ("sa", "ca", "ffn")."""
        ...

    def branch_macs(self, name: str, tokens: int, kv_length: int, text_length: int) -> int:
        """One branch of one block on `tokens` tokens; `kv_length`: the block's KV length after this scale."""
        ...

    def scale_macs(self, tokens: int) -> int:
        """What a scale costs besides the blocks' branches: the head (and any per-scale conditioning)."""
        ...


class NextScaleTransformer(Protocol):
    config: TransformerCosts

    @property
    def chunks(self) -> list[list[nn.Module]]:
        """The blocks in their checkpoint chunks (one chunk for families without them)."""
        ...

    def condition(self, encoded: object, with_null: bool) -> Condition:
        """What the model's prompt encoder made of the prompts -> conditioning rows (+ the null rows)."""
        ...

    def start_tokens(self, condition: Condition) -> Tensor: ...

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Tokenizer tokens (B, n, D) -> transformer width (B, n, C)."""
        ...

    def add_level(self, x: Tensor, scale_index: int) -> Tensor:
        """The scale's level (and, for absolute-position families, position) embedding, before the first block."""
        ...

    def rope(self, grid: Grid, rope_grid: Grid) -> Positions: ...

    def run_blocks(
        self, x: Tensor, blocks: Sequence[nn.Module], condition: Condition, rope: Positions, cache: object,
        router: object, attn_mask: Tensor | None = None, capture: Iterable[int] = (),
    ) -> tuple[Tensor, dict[int, Tensor]]: ...

    def head_logits(self, hidden: Tensor, condition: Condition) -> Tensor: ...


class MultiScaleTokenizer(Protocol):
    """The VAE side of a family: what a code is, how codes accumulate into a latent, and decoding."""

    @property
    def stride(self) -> int:
        """Pixels per latent cell along each axis."""
        ...

    def latent_size(self, grid: Grid) -> tuple[int, int]:
        """Latent cells of a token grid."""
        ...

    def zero_latent(self, batch: int, size: tuple[int, int], device: torch.device) -> Tensor: ...

    def scale_input(self, latent: Tensor, grid: Grid) -> Tensor:
        """The accumulated latent -> the next scale's tokenizer tokens (B, h * w, D), row-major."""
        ...

    def sample(self, logits: Tensor, grid: Grid, top_k: int, top_p: float, generator: torch.Generator) -> Tensor:
        """Guided logits (B, h * w, ...) -> the scale's codes (B, h, w, ...) (bits, or codebook indices)."""
        ...

    def add_scale(self, latent: Tensor, codes: Tensor, scale_index: int, schedule: Sequence[Grid]) -> Tensor:
        """The latent with scale `scale_index`'s codes added (a new tensor: forks share the old one)."""
        ...

    def encode(self, images: Tensor) -> Tensor: ...

    def quantize(self, latent: Tensor, schedule: list[Grid]) -> tuple[Tensor, list[Tensor]]:
        """Multi-scale quantisation -> the quantised latent and the codes of every scale (a ground-truth prefix)."""
        ...

    def decode(self, latent: Tensor) -> Tensor:
        """Latent -> images (B, 3, H, W) clamped to [-1, 1]."""
        ...
