"""The one scale loop: next-scale sampling with CFG, a KV cache, acceleration plans and observers.

Per scale k the sampler asks the policy for a `ScalePlan`, builds the scale input from the accumulated
latent, runs the transformer on the planned rows and tokens, samples bits, accumulates the codes, and shows
everything to the observers. Policies decide; only this loop acts. It follows the official Infinity
inference: tau before CFG on logits, per-bit top-k / top-p, one seeded multinomial per scale, codes
accumulated on the final grid with 5-D trilinear resizing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from models.bsq_vae import resize_latent
from models.infinity import BranchFn, Infinity, KVCache, Rope, Router, TextCondition, run_on_all_tokens
from models.pipeline import TextToImageModel
from models.schedules import Grid

Branches = Literal["both", "cond", "uncond"]


@dataclass
class SamplingConfig:
    """Official Infinity defaults: cfg 3, tau 0.5, top-k 900 (a no-op for 2 logits), top-p 0.97."""

    cfg: float | Sequence[float] = 3.0  # one value or one per scale
    tau: float | Sequence[float] = 0.5
    top_k: int = 0  # 0 = off
    top_p: float = 0.97  # 0 = off

    def per_scale(self, name: str, num_scales: int) -> list[float]:
        value = getattr(self, name)
        if isinstance(value, (int, float)):
            return [float(value)] * num_scales
        if len(value) != num_scales:
            raise ValueError(f"sampling.{name} has {len(value)} values but the schedule has {num_scales} scales")
        return [float(v) for v in value]


@dataclass
class ReducedTokens:
    """What a TokenSubset hands the blocks: r tokens, where their outputs go back, and the RoPE they get."""

    tokens: Tensor  # (R, r, C)
    positions: Tensor  # (r,) or (R, r): the raster positions the outputs are restored to
    rope_positions: Tensor  # (r,) or (R, r): the positions whose RoPE the tokens get (usually `positions`)


class TokenSubset(Protocol):
    """Runs the blocks on a reduced token set and restores the full grid (StageVAR's RP + RTR): around the whole
    block stack, or around each block chunk (`per_chunk`, as the released StageVAR code)."""

    per_chunk: bool

    def num_tokens(self, grid: Grid, chunk: int) -> int:
        """How many tokens `reduce` keeps at this grid in this chunk (for cost accounting without running the model)."""
        ...

    def reduce(self, x: Tensor, grid: Grid, chunk: int) -> ReducedTokens:
        """A unit's full input (R, M, C) (the level embedding added) -> the reduced tokens."""
        ...

    def restore(
        self, hidden: Tensor, reduced: ReducedTokens, grid: Grid, previous: Tensor | None, previous_grid: Grid | None
    ) -> Tensor:
        """The unit's outputs of the r tokens -> (R, M, C), the other positions from `previous`: the previous executed
        scale's output of the same unit (the whole stack, or this chunk)."""
        ...


class TokenRouter(Protocol):
    """A `Router` (models.infinity) that also says how many tokens each branch runs on (for cost accounting)."""

    def __call__(self, name: str, layer: int, x: Tensor, rope: Rope, branch: BranchFn) -> Tensor: ...

    def tokens_run(self, name: str, layer: int, num_tokens: int) -> int:
        """Tokens branch `name` of block `layer` runs on when the scale has `num_tokens` tokens."""
        ...


@dataclass
class ScalePlan:
    """What the sampler runs at one scale."""

    branches: Branches = "both"  # CFG rows to run; once a branch is dropped it stays dropped
    skip: bool = False  # no transformer pass: the scale adds nothing to the latent
    token_subset: TokenSubset | None = None
    router: TokenRouter | None = None  # per-sublayer token routing (FastVAR)


class Policy(Protocol):
    def plan(self, scale_index: int, grid: Grid, schedule: Sequence[Grid]) -> ScalePlan: ...


class BaselinePolicy:
    def plan(self, scale_index: int, grid: Grid, schedule: Sequence[Grid]) -> ScalePlan:
        return ScalePlan()


@dataclass
class ScaleRecord:
    """What observers see after each scale. Tensors are the sampler's own: clone before modifying."""

    index: int
    grid: Grid
    plan: ScalePlan
    inputs: Tensor | None  # (R, M, C) scale input F~ of the rows that ran (before the level embedding)
    hidden: Tensor | None  # (R, M, C) final hidden states (after restoration)
    block_hidden: dict[int, Tensor]  # outputs of the blocks observers asked for
    logits: Tensor | None  # (B, M, 2 * bits) after tau and CFG
    bits: Tensor | None  # (B, h, w, bits) sampled bits, int64 0/1
    latent: Tensor  # (B, C_vae, H, W) accumulated latent after this scale
    kv_lengths: list[int]  # per block, after this scale


class Observer(Protocol):
    capture_blocks: Iterable[int]

    def on_scale(self, record: ScaleRecord) -> None: ...


@dataclass
class Generation:
    images: Tensor | None  # (B, H, W, 3) uint8 RGB
    latent: Tensor  # (B, C_vae, H, W)
    bits: list[Tensor | None] = field(default_factory=list)  # per scale, None where skipped


def sample_bits(logits: Tensor, top_k: int, top_p: float, generator: torch.Generator) -> Tensor:
    """Sample every bit independently from its 2 logits: (B, n, 2 * bits) -> (B, n, bits) int64."""
    pairs = logits.reshape(-1, 2).float()
    if top_k == 1:  # any larger k keeps both values
        pairs = pairs.masked_fill(pairs < pairs.max(-1, keepdim=True).values, float("-inf"))
    if 0 < top_p < 1:  # drop the less likely value when its probability is <= 1 - top_p
        low = pairs.softmax(-1) <= 1 - top_p
        low &= ~low.all(-1, keepdim=True)
        pairs = pairs.masked_fill(low, float("-inf"))
    bits = torch.multinomial(pairs.softmax(-1), 1, replacement=True, generator=generator)
    return bits.view(logits.shape[0], logits.shape[1], -1)


def _rows(branches: Branches, batch: int) -> slice:
    return {"both": slice(0, 2 * batch), "cond": slice(0, batch), "uncond": slice(batch, 2 * batch)}[branches]


@torch.inference_mode()
def generate(
    model: TextToImageModel,
    prompts: list[str],
    sampling: SamplingConfig,
    seed: int,
    policy: Policy | None = None,
    observers: Sequence[Observer] = (),
    decode: bool = True,
    progress: bool = False,
    forced_bits: Sequence[Tensor] = (),
) -> Generation:
    """Generate one image per prompt. The same prompts, seed and plans give the same images.

    `forced_bits` (B, h, w, bits) per scale, for the first scales: taken instead of sampled bits (a ground-truth
    prefix, to see where a model loses the image; experiments/prefix_probe.py).
    """
    policy = policy or BaselinePolicy()
    transformer, vae, schedule = model.transformer, model.vae, model.schedule
    batch = len(prompts)
    cfg, tau = sampling.per_scale("cfg", len(schedule)), sampling.per_scale("tau", len(schedule))
    use_cfg = any(c != 1.0 for c in cfg)
    generator = torch.Generator(model.device).manual_seed(seed)
    capture = {block for observer in observers for block in observer.capture_blocks}

    text_tokens = model.text_encoder.encode(prompts)
    features, lengths = text_tokens.features.to(model.device), text_tokens.lengths.to(model.device)
    text = transformer.encode_text(features, lengths, with_null=use_cfg)
    branches: Branches = "both" if use_cfg else "cond"
    cache = KVCache(transformer.config.depth, capacity=sum(h * w for h, w in schedule))
    ropes = [transformer.rope(grid, model.rope_grid) for grid in schedule]  # once, on the device
    final_size = (schedule[-1][0] * vae.patch, schedule[-1][1] * vae.patch)
    latent = vae.zero_latent(batch, final_size, model.device)
    previous_outputs: list[Tensor | None] = []  # per block chunk, of the previous executed scale (restore reads them)
    previous_grid: Grid | None = None
    all_bits: list[Tensor | None] = []

    for k, grid in enumerate(tqdm(schedule, desc="scales", leave=False, disable=not progress)):
        plan = policy.plan(k, grid, schedule)
        if plan.skip:
            all_bits.append(None)
            _notify(observers, ScaleRecord(k, grid, plan, None, None, {}, None, None, latent, cache.lengths()))
            continue
        if use_cfg and plan.branches != branches:
            if branches != "both":
                raise ValueError(f"scale {k}: cannot run branches={plan.branches!r} after dropping to {branches!r}")
            rows = _rows(plan.branches, batch)
            text = text.rows(rows)
            previous_outputs = [None if output is None else output[rows] for output in previous_outputs]
            cache.keep_rows(rows)
            branches = plan.branches

        if k == 0:
            inputs = transformer.start_tokens(text)
        else:
            code_tokens = vae.codes_to_tokens(resize_latent(latent, (grid[0] * vae.patch, grid[1] * vae.patch)))
            inputs = transformer.embed_tokens(code_tokens).repeat(text.num_rows // batch, 1, 1)

        with model.autocast():
            outputs, block_hidden = _run_chunks(
                transformer, transformer.add_level(inputs, k), grid, text, ropes[k], cache, plan.router or run_on_all_tokens,
                plan.token_subset, previous_outputs, previous_grid, capture,
            )
        hidden = outputs[-1]
        logits = transformer.head_logits(hidden, text) * (1 / tau[k])  # as the official code: rounds unlike / tau
        if branches == "both":
            logits = cfg[k] * logits[:batch] + (1 - cfg[k]) * logits[batch:]

        if k < len(forced_bits):
            bits = forced_bits[k].to(model.device)
        else:
            bits = sample_bits(logits, sampling.top_k, sampling.top_p, generator).view(batch, *grid, -1)
        latent = latent + resize_latent(vae.bits_to_codes(bits), final_size)
        all_bits.append(bits)
        previous_outputs, previous_grid = outputs, grid
        _notify(observers, ScaleRecord(k, grid, plan, inputs, hidden, block_hidden, logits, bits, latent, cache.lengths()))

    images = to_uint8(vae.decode(latent)) if decode else None
    return Generation(images, latent, all_bits)


def _run_chunks(
    transformer: Infinity, x: Tensor, grid: Grid, text: TextCondition, rope: Rope, cache: KVCache, router: Router,
    subset: TokenSubset | None, previous: list[Tensor | None], previous_grid: Grid | None, capture: set[int],
) -> tuple[list[Tensor | None], dict[int, Tensor]]:
    """The block chunks in order on a scale's tokens x (R, M, C), with the plan's token subset around the whole
    stack or around each chunk. -> each chunk's full output (None inside a reduced stack), captured blocks."""
    chunks, outputs, captured = transformer.chunks, [], {}
    reduced: ReducedTokens | None = None
    for c, blocks in enumerate(chunks):
        if subset is not None and (subset.per_chunk or c == 0):
            reduced = subset.reduce(x, grid, c)
            x = reduced.tokens
        chunk_rope = rope if reduced is None else rope.at(reduced.rope_positions)
        x, chunk_captured = transformer.run_blocks(x, blocks, text, chunk_rope, cache, router, capture=capture)
        captured |= chunk_captured
        if subset is not None and (subset.per_chunk or c == len(chunks) - 1):
            unit_previous = (previous[c] if subset.per_chunk else previous[-1]) if previous else None
            x, reduced = subset.restore(x, reduced, grid, unit_previous, previous_grid), None
        outputs.append(x if reduced is None else None)
    return outputs, captured


def _notify(observers: Sequence[Observer], record: ScaleRecord) -> None:
    for observer in observers:
        observer.on_scale(record)


def to_uint8(images: Tensor) -> Tensor:
    """Decoder output in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), truncating like the official code."""
    return ((images.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
