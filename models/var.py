"""The class-conditional VAR transformer (FoundationVision/VAR, d16-d36), written to match the official checkpoints.

VAR predicts, scale by scale, one index into the VQVAE's 4,096-entry codebook per token (models/vqvae.py holds
the tokenizer). Against Infinity (models/infinity.py, whose attention, FFN and head norm it shares): a class
embedding instead of text (row 1000 is the CFG null class), the condition enters through AdaLN only (per block
`ada_lin`, or one shared table plus a per-block `ada_gss` with `shared_aln`, as d36), no cross-attention, no
RoPE: a learned absolute position table `pos_1LC` over the whole 680-token sequence, added with the level
embedding before the first block. Self-attention is the same cosine attention (L2-normalised q, k, a clamped
per-head temperature, softmax scale 1) with the same q/k/v bias layout.

Parameter names and shapes are those of `var_d16.pth` ... `var_d30.pth` (`blocks.{i}`); the persistent buffers
`lvl_1L` and `attn_bias_for_masking` are in the files and load with them. The sampler's official settings (CFG
ramp, top-k 900, top-p 0.96) are the model config's `sampling` (conf/model/var_d16.yaml).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.infinity import (
    AdaLNBeforeHead,
    BlockStack,
    FeedForward,
    KVCache,
    Router,
    SelfAttention,
    ada_layer_norm,
    feed_forward_macs,
    run_on_all_tokens,
    self_attention_macs,
)
from models.schedules import Grid

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


class SquareScales:
    """What VAR's and STAR's configs share: square scales of `patch_nums` sides, unchunked blocks (their
    checkpoints do not group them), an FFN of `mlp_ratio` times the width."""

    patch_nums: tuple[int, ...]
    embed_dim: int
    mlp_ratio: float

    @property
    def block_chunks(self) -> int:
        return 1

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def schedule(self) -> list[Grid]:
        return [(pn, pn) for pn in self.patch_nums]

    @property
    def num_tokens(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)


@dataclass
class VARConfig(SquareScales):
    depth: int = 16
    embed_dim: int = 1024  # 64 * depth in every release
    num_heads: int = 16  # = depth (head dim 64)
    num_classes: int = 1000  # class_emb has one more row: the null class
    codebook_size: int = 4096
    token_channels: int = 32  # the VQVAE's code width (Cvae)
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False  # d36: one AdaLN table from the class, a per-block bias `ada_gss`

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads", "num_classes", "codebook_size", "token_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must split into {self.num_heads} heads")
        self.patch_nums = tuple(self.patch_nums)

    @classmethod
    def of_depth(cls, depth: int) -> VARConfig:
        """The released models: d16, d20, d24, d30 at 256 px; d36 at 512 px with shared AdaLN."""
        if depth not in (16, 20, 24, 30, 36):
            raise ValueError(f"VAR depth {depth} was not released; the releases are d16, d20, d24, d30 and d36")
        patch_nums, shared = (PATCH_NUMS_512, True) if depth == 36 else (PATCH_NUMS_256, False)
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=patch_nums, shared_aln=shared)

    # --- costs (accel/macs.py), multiply-accumulates per batch row ------------------------------------------

    @property
    def branches(self) -> tuple[str, ...]:
        return ("sa", "ffn")

    def branch_macs(self, name: str, tokens: int, kv_length: int, text_length: int) -> int:
        if name == "sa":
            return self_attention_macs(self.embed_dim, tokens, kv_length)
        return feed_forward_macs(self.embed_dim, self.mlp_hidden, tokens)

    def scale_macs(self, tokens: int) -> int:
        """Each block's AdaLN from the class (recomputed at every scale, as the official code), the head's AdaLN,
        and one logit per codebook entry."""
        C = self.embed_dim
        per_block_ada = 0 if self.shared_aln else self.depth * 6 * C * C
        return per_block_ada + 2 * C * C + self.codebook_size * C * tokens


@dataclass
class ClassCondition:
    """Per-row class conditioning. Under CFG, rows [0, B) are the classes and [B, 2B) the null class."""

    embedding: Tensor  # (R, C): class_emb of the label, the start token and the AdaLN input
    shared_ada: Tensor | None  # (R, 1, 6, C): with shared_aln, the shared AdaLN table before each block's bias

    def rows(self, index: Tensor | slice) -> ClassCondition:
        shared = None if self.shared_ada is None else self.shared_ada[index]
        return ClassCondition(self.embedding[index], shared)

    @property
    def num_rows(self) -> int:
        return self.embedding.shape[0]


class AbsolutePositions:
    """VAR's positions are in its input embedding: there is nothing to rotate, for any token subset."""

    def at(self, positions: Tensor) -> AbsolutePositions:
        return self

    def rotate(self, x: Tensor) -> Tensor:
        return x


class AdaLNSelfAttn(nn.Module):
    """x += SA(AdaLN(x)) * gamma1;  x += FFN(AdaLN(x)) * gamma2, the six AdaLN slices from the class."""

    def __init__(self, config: VARConfig, index: int):
        super().__init__()
        C = config.embed_dim
        self.index = index
        self.eps = config.norm_eps
        self.attn = SelfAttention(C, config.num_heads)
        self.ffn = FeedForward(C, config.mlp_hidden)
        if config.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:  # slices: gamma1, gamma2, scale1, scale2, shift1, shift2
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(
        self, x: Tensor, condition: ClassCondition, rope: AbsolutePositions, cache: KVCache | None,
        router: Router = run_on_all_tokens, attn_mask: Tensor | None = None,
    ) -> Tensor:
        if condition.shared_ada is not None:
            ada = self.ada_gss + condition.shared_ada
        else:
            ada = self.ada_lin(condition.embedding).view(-1, 1, 6, x.shape[-1])
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)

        def self_attention(tokens: Tensor, tokens_rope: AbsolutePositions) -> Tensor:
            modulated = ada_layer_norm(tokens, scale1, shift1, self.eps).to(tokens.dtype)
            return self.attn(modulated, tokens_rope, cache, self.index, attn_mask) * gamma1

        def feed_forward(tokens: Tensor, tokens_rope: AbsolutePositions) -> Tensor:
            return self.ffn(ada_layer_norm(tokens, scale2, shift2, self.eps).to(tokens.dtype)) * gamma2

        x = x + router("sa", self.index, x, rope, self_attention)
        return x + router("ffn", self.index, x, rope, feed_forward)


class VAR(BlockStack, nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        C, L = config.embed_dim, config.num_tokens
        init_std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(config.token_channels, C)
        self.class_emb = nn.Embedding(config.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * init_std)
        self.pos_1LC = nn.Parameter(torch.randn(1, L, C) * init_std)
        self.lvl_embed = nn.Embedding(len(config.patch_nums), C)
        if config.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(AdaLNSelfAttn(config, i) for i in range(config.depth))
        scale_of_token = torch.tensor([k for k, pn in enumerate(config.patch_nums) for _ in range(pn * pn)])
        # Persistent, as in the official files: the scale of every token and the block-causal training mask.
        self.register_buffer("lvl_1L", scale_of_token[None])
        block_causal = scale_of_token[:, None] >= scale_of_token[None, :]
        self.register_buffer("attn_bias_for_masking", torch.zeros(L, L).masked_fill(~block_causal, -torch.inf)[None, None])
        self.head_nm = AdaLNBeforeHead(C, config.norm_eps)
        self.head = nn.Linear(C, config.codebook_size)
        starts = [0]
        for pn in config.patch_nums:
            starts.append(starts[-1] + pn * pn)
        self.scale_starts = starts  # token offsets of each scale in the 680-token sequence

    def init_weights(self, std: float = 0.02) -> None:
        """Initialisation for random-weight runs (checkpoints overwrite everything); residual branches and the
        head start small, so that a random model's logits are not saturated."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
        for block in self.blocks:
            for linear in (block.attn.proj, block.ffn.fc2):
                linear.weight.data.mul_(1 / math.sqrt(2 * self.config.depth))

    # --- condition --------------------------------------------------------------------------------------

    def condition(self, labels: Tensor, with_null: bool) -> ClassCondition:
        """Class indices (B,) -> conditioning rows; with `with_null`, B rows of the null class follow."""
        labels = labels.to(self.pos_start.device)
        if with_null:
            labels = torch.cat((labels, torch.full_like(labels, self.config.num_classes)))
        embedding = self.class_emb(labels)
        shared = self.shared_ada_lin(embedding).view(-1, 1, 6, self.config.embed_dim) if self.config.shared_aln else None
        return ClassCondition(embedding, shared)

    # --- inputs -----------------------------------------------------------------------------------------

    def start_tokens(self, condition: ClassCondition) -> Tensor:
        """Input of the first (1x1) scale: the class embedding plus the learned start position."""
        return condition.embedding.unsqueeze(1) + self.pos_start

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """The accumulated latent at the scale's grid (B, n, Cvae) -> (B, n, C)."""
        return self.word_embed(tokens.float())

    def add_level(self, x: Tensor, scale_index: int) -> Tensor:
        """Add the scale's level and absolute position embeddings, summed first, as the official code does."""
        start, end = self.scale_starts[scale_index], self.scale_starts[scale_index + 1]
        level_and_position = self.lvl_embed.weight[scale_index] + self.pos_1LC[:, start:end]
        return x + level_and_position

    def rope(self, grid: Grid, rope_grid: Grid) -> AbsolutePositions:
        return AbsolutePositions()

    # --- transformer ------------------------------------------------------------------------------------

    @property
    def chunks(self) -> list[list[AdaLNSelfAttn]]:
        return [list(self.blocks)]

    def head_logits(self, hidden: Tensor, condition: ClassCondition) -> Tensor:
        """(B, n, C) -> (B, n, codebook_size) logits in fp32."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.head(self.head_nm(hidden.float(), condition.embedding.float()))

    def forward(self, scale_inputs: Tensor, condition: ClassCondition) -> Tensor:
        """Teacher-forced logits of the whole sequence with the block-causal mask (the official training pass).

        `scale_inputs` (B, L - 1, Cvae): the inputs of scales 1..K-1 in order. Returns (B, L, codebook_size).
        """
        tokens = torch.cat((self.start_tokens(condition), self.embed_tokens(scale_inputs)), dim=1)
        tokens = tokens + (self.lvl_embed(self.lvl_1L) + self.pos_1LC)
        hidden, _ = self.run_blocks(tokens, self.blocks, condition, AbsolutePositions(),
                                    attn_mask=self.attn_bias_for_masking[0, 0].to(tokens.dtype))
        return self.head_logits(hidden, condition)

