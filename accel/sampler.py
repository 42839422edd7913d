"""The one scale loop: next-scale sampling with CFG, a KV cache, acceleration plans and observers.

Per scale k the sampler asks the policy for a `ScalePlan`, builds the scale input from the accumulated
latent, runs the transformer on the planned rows and tokens, samples the scale's codes, accumulates them, and
shows everything to the observers. Policies decide; only this loop acts. The model family's pieces
(models/family.py) say what a condition, a code and an accumulation are: Infinity's bits summed on the final
grid with 5-D trilinear resizing, or VAR's and STAR's codebook indices refined by phi. It follows the official
inference: tau before CFG on logits, top-k / top-p, one seeded multinomial per scale.

`Continuations` fork a run: after a chosen scale the loop's state (KV cache, latent, CFG rows, the previous
scale's hidden states) is copied and the rest of the run is sampled again with other random draws, by the same
loop; the stage probe's "decided" evidence (experiments/stage_probe.py) is made of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from models.family import Condition, NextScaleTransformer, Positions
from models.infinity import BranchFn, KVCache, Router, run_on_all_tokens
from models.pipeline import TextToImageModel
from models.schedules import Grid

Branches = Literal["both", "cond", "uncond"]


@dataclass
class SamplingConfig:
    """Official Infinity defaults: cfg 3, tau 0.5, top-k 900 (a no-op for 2 logits), top-p 0.97.

    Guided logits at scale k are w_k * cond + (1 - w_k) * null, with w_k = cfg (one value or one per scale), or
    with `cfg_ramp` VAR's ramp: w_k = 1 + cfg * k / (K - 1), from no guidance at the first scale to 1 + cfg.
    """

    cfg: float | Sequence[float] = 3.0  # one value or one per scale
    tau: float | Sequence[float] = 0.5
    top_k: int = 0  # 0 = off
    top_p: float = 0.97  # 0 = off
    cfg_ramp: bool = False

    def per_scale(self, name: str, num_scales: int) -> list[float]:
        value = getattr(self, name)
        if isinstance(value, (int, float)):
            return [float(value)] * num_scales
        if len(value) != num_scales:
            raise ValueError(f"sampling.{name} has {len(value)} values but the schedule has {num_scales} scales")
        return [float(v) for v in value]

    def guidance(self, num_scales: int) -> list[tuple[float, float]]:
        """Per scale, the weights (of the conditional, of the null row) of the guided logits."""
        if not self.cfg_ramp:
            return [(cfg, 1 - cfg) for cfg in self.per_scale("cfg", num_scales)]
        if not isinstance(self.cfg, (int, float)):
            raise ValueError("sampling.cfg_ramp ramps one cfg value over the scales; give one value, not a list")
        ramp = [self.cfg * k / max(num_scales - 1, 1) for k in range(num_scales)]
        return [(1 + t, -t) for t in ramp]  # as VAR writes it: (1 + t) * cond - t * null

    def guides(self, num_scales: int) -> bool:
        """Whether CFG runs (some scale's guidance weight != 1): the null row runs beside every prompt's."""
        return any(cond != 1.0 for cond, _ in self.guidance(num_scales))


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

    def __call__(self, name: str, layer: int, x: Tensor, rope: Positions, branch: BranchFn) -> Tensor: ...

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
    logits: Tensor | None  # (B, M, ...) after tau and CFG: 2 per bit (Infinity) or one per codebook entry
    codes: Tensor | None  # the scale's sampled codes: (B, h, w, bits) int64 0/1 bits, or (B, h, w) indices
    latent: Tensor  # (B, C_vae, H, W) accumulated latent after this scale
    kv_lengths: list[int]  # per block, after this scale


class Observer(Protocol):
    capture_blocks: Iterable[int]

    def on_scale(self, record: ScaleRecord) -> None: ...


@dataclass(frozen=True)
class Continuations:
    """Fork the run after each scale in `after` and finish it once per seed from the state reached there.

    The KV cache is copied and the latent, CFG rows and previous hidden states are shared (the loop never writes
    them in place), so the prefix is not recomputed. A continuation's draws come from a generator of its own:
    seeded with its seed, or for None a copy of the run's generator, which makes the run's own draws again and
    so reproduces its images bit for bit. Continuations sample every scale after the fork (no forced bits) and
    are shown to no observer.
    """

    after: Sequence[int]
    seeds: Sequence[int | None]


@dataclass
class Generation:
    images: Tensor | None  # (B, H, W, 3) uint8 RGB
    latent: Tensor  # (B, C_vae, H, W)
    codes: list[Tensor | None] = field(default_factory=list)  # per scale, None where skipped
    # per scale forked after: the decoded images (B, H, W, 3) uint8 of each continuation, in seed order
    continuations: dict[int, list[Tensor]] = field(default_factory=dict)


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
    forced_codes: Sequence[Tensor] = (),
    continuations: Continuations | None = None,
) -> Generation:
    """Generate one image per prompt. The same prompts, seed and plans give the same images.

    `forced_codes` per scale, for the first scales: taken instead of sampled codes (a ground-truth prefix, to see
    where a model loses the image; experiments/prefix_probe.py). `continuations`: fork the run
    (see `Continuations`); their images are decoded whatever `decode` says. Forks follow the baseline policy only:
    a policy's plans may carry state from scale to scale (StageVAR's sketch generator, FastVAR's cached outputs)
    that a fork would share with the run.
    """
    policy = policy or BaselinePolicy()
    if continuations is not None and not isinstance(policy, BaselinePolicy):
        raise ValueError(f"continuations follow the baseline policy, not {type(policy).__name__}")
    batch = len(prompts)
    run = _Run.of(model, sampling, batch, policy, observers)
    state = _State(
        condition=model.transformer.condition(model.text_encoder.encode(prompts), with_null=run.use_cfg),
        branches="both" if run.use_cfg else "cond",
        cache=KVCache(model.transformer.config.depth, capacity=sum(h * w for h, w in model.schedule)),
        latent=model.vae.zero_latent(batch, run.final_size, model.device),
        generator=torch.Generator(model.device).manual_seed(seed),
    )
    forked = _run_scales(run, state, 0, observers, forced_codes, continuations, progress)
    images = to_uint8(model.vae.decode(state.latent)) if decode else None
    return Generation(images, state.latent, state.codes, forked)


@dataclass(frozen=True)
class _Run:
    """What stays fixed through one generate() call, forks included."""

    model: TextToImageModel
    sampling: SamplingConfig
    batch: int
    guidance: list[tuple[float, float]]  # per scale, the weights of the conditional and the null logits
    tau: list[float]
    policy: Policy
    ropes: list[Positions]  # per scale, made once on the device
    final_size: tuple[int, int]  # of the latent
    capture: set[int]  # blocks whose outputs observers asked for

    @property
    def use_cfg(self) -> bool:
        return self.sampling.guides(len(self.guidance))

    @classmethod
    def of(
        cls, model: TextToImageModel, sampling: SamplingConfig, batch: int, policy: Policy,
        observers: Sequence[Observer],
    ) -> _Run:
        schedule, vae = model.schedule, model.vae
        return cls(
            model, sampling, batch, sampling.guidance(len(schedule)), sampling.per_scale("tau", len(schedule)),
            policy, [model.transformer.rope(grid, model.rope_grid) for grid in schedule], vae.latent_size(schedule[-1]),
            {block for observer in observers for block in observer.capture_blocks},
        )


@dataclass
class _State:
    """What the loop carries from one scale to the next: what a fork copies."""

    condition: Condition
    branches: Branches
    cache: KVCache
    latent: Tensor
    generator: torch.Generator
    # per block chunk, the outputs of the previous executed scale, and its grid (token restoration reads them)
    previous_outputs: list[Tensor | None] = field(default_factory=list)
    previous_grid: Grid | None = None
    codes: list[Tensor | None] = field(default_factory=list)

    def fork(self, generator: torch.Generator) -> _State:
        """The same state with a KV cache and code list of its own (the only parts written in place) and
        `generator`."""
        return replace(self, cache=self.cache.copy(), generator=generator, codes=list(self.codes))


def _run_scales(
    run: _Run, state: _State, first: int, observers: Sequence[Observer], forced_codes: Sequence[Tensor],
    continuations: Continuations | None, progress: bool,
) -> dict[int, list[Tensor]]:
    """The scale loop: scales first .. K-1 on `state`. -> per scale forked after, the continuations' images."""
    forks = set(continuations.after) if continuations is not None else set()
    forked: dict[int, list[Tensor]] = {}
    for k in tqdm(range(first, len(run.model.schedule)), desc="scales", leave=False, disable=not progress):
        _run_scale(run, state, k, observers, forced_codes)
        if k in forks:
            forked[k] = [_continue(run, state, k, continuation_seed) for continuation_seed in continuations.seeds]
    return forked


def _continue(run: _Run, state: _State, fork_scale: int, seed: int | None) -> Tensor:
    """Finish the run from `state` (reached after `fork_scale`) on a fork of it -> its decoded images."""
    generator = torch.Generator(state.generator.device)
    if seed is None:
        generator.set_state(state.generator.get_state())
    else:
        generator.manual_seed(seed)
    tail = state.fork(generator)
    unobserved = replace(run, capture=set())  # no observer sees a tail: its blocks' outputs are not kept
    _run_scales(unobserved, tail, fork_scale + 1, observers=(), forced_codes=(), continuations=None, progress=False)
    return to_uint8(run.model.vae.decode(tail.latent))


def _run_scale(run: _Run, state: _State, k: int, observers: Sequence[Observer], forced_codes: Sequence[Tensor]) -> None:
    """Scale k: plan, transformer, codes, latent; `state` moves on to the next scale."""
    model, batch, schedule = run.model, run.batch, run.model.schedule
    transformer, vae, grid = model.transformer, model.vae, schedule[k]
    plan = run.policy.plan(k, grid, schedule)
    if plan.skip:
        state.codes.append(None)
        _notify(observers, ScaleRecord(k, grid, plan, None, None, {}, None, None, state.latent, state.cache.lengths()))
        return
    if run.use_cfg and plan.branches != state.branches:
        if state.branches != "both":
            raise ValueError(f"scale {k}: cannot run branches={plan.branches!r} after dropping to {state.branches!r}")
        rows = _rows(plan.branches, batch)
        state.condition = state.condition.rows(rows)
        state.previous_outputs = [None if output is None else output[rows] for output in state.previous_outputs]
        state.cache.keep_rows(rows)
        state.branches = plan.branches
    condition = state.condition

    if k == 0:
        inputs = transformer.start_tokens(condition)
    else:
        inputs = transformer.embed_tokens(vae.scale_input(state.latent, grid)).repeat(condition.num_rows // batch, 1, 1)

    with model.autocast():
        outputs, block_hidden = _run_chunks(
            transformer, transformer.add_level(inputs, k), grid, condition, run.ropes[k], state.cache,
            plan.router or run_on_all_tokens, plan.token_subset, state.previous_outputs, state.previous_grid,
            run.capture,
        )
    hidden = outputs[-1]
    logits = transformer.head_logits(hidden, condition) * (1 / run.tau[k])  # as the official code: rounds unlike / tau
    if state.branches == "both":
        cond_weight, null_weight = run.guidance[k]
        logits = cond_weight * logits[:batch] + null_weight * logits[batch:]

    if k < len(forced_codes):
        codes = forced_codes[k].to(model.device)
    else:
        codes = vae.sample(logits, grid, run.sampling.top_k, run.sampling.top_p, state.generator)
    state.latent = vae.add_scale(state.latent, codes, k, schedule)
    state.codes.append(codes)
    state.previous_outputs, state.previous_grid = outputs, grid
    _notify(observers, ScaleRecord(k, grid, plan, inputs, hidden, block_hidden, logits, codes, state.latent,
                                   state.cache.lengths()))


def _run_chunks(
    transformer: NextScaleTransformer, x: Tensor, grid: Grid, condition: Condition, rope: Positions, cache: KVCache,
    router: Router,
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
        x, chunk_captured = transformer.run_blocks(x, blocks, condition, chunk_rope, cache, router, capture=capture)
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
