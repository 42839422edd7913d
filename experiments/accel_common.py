"""What the acceleration experiments share: methods against the baseline, on the same prompts and seeds.

`compare_methods` is the protocol of accel_eval, rank_sweep, accel_compare and benchmark:
1. Speed: every method (the baseline first) generates the first batch of prompts; after warm-up rounds,
   `repeats` timed rounds call each method once, in order (baseline, a, b, baseline, a, b, ...), so slow drifts
   of the machine fall on all methods alike. Latency is the median of a method's repeats, end to end (text
   encoding, every scale, VAE decoding) for one batch, with their min and max; speedup is the baseline median
   over the method's, with the min and max of the per-round ratios (baseline and method of the same round, run
   one after the other). A speedup whose range includes 1 is "not significant"; a method whose MACs equal the
   baseline's changes nothing the transformer computes and is a "no-op", its speedup 1 by construction. Such a
   method is refused before anything runs (check_policies), unless accel.allow_noop=true.
   Peak memory: CUDA's peak allocated tensor memory; on the CPU the process's peak resident set size, which
   also counts memory the allocator keeps after a free, so it never understates. Both include the model.
2. MACs: accel/macs.py counts the transformer blocks and head for the timed batch (analytic, not measured).
3. Quality: the baseline generates prompts.samples_per_prompt images of every prompt (seed + batch index per
   batch, as experiments/generate.py), then each method with the same seeds, into images/<method>/. Per image, the
   metrics of conf/metrics that compare with an image are taken against the baseline image of the same prompt,
   sample and seed, those that compare with the prompt (CLIP score) against the prompt; per set, ShapesEval
   (prompts=shapes_eval; its delta to the baseline with the standard error of the paired per-image difference)
   and FID against the baseline set. A metric whose weights are missing is left out loudly and listed under
   `unavailable_metrics`. On GenEval or DPG-Bench prompts each method's images are also written in the layout of
   the benchmark's official scorer, <benchmark>/<method>/ (experiments/import_scores.py brings the scores back).

Under torchrun (experiments/distributed.py) rank 0 alone times the methods while the other processes wait, so
the latencies are one process's; then every process makes its share of every method's images, and rank 0 scores
them all. resume=<run folder> keeps the images an interrupted run finished (experiments/image_batches.py); the
timing is measured again.

The summary holds one row per method (`methods`); the run folder gets the table, a Pareto figure (speedup
against quality) and a sample grid.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError
from tqdm import tqdm

from accel.macs import count_macs
from accel.policies import ModelSpec, build_policy
from accel.sampler import Policy, SamplingConfig, generate
from analysis.fid import (
    InceptionFeatures,
    MetricUnavailable,
    ReferenceStatistics,
    frechet_distance,
    frechet_distance_to,
    load_reference_statistics,
)
from analysis.metrics import Metric, PromptMetric, build_metrics, missing_files
from errors import UserError
from evals.prompt_files import BENCHMARK_LAYOUTS, export_benchmark_layout
from evals.prompts import load_prompts
from evals.shapes_eval import evaluate
from experiments.config_checks import check_model, check_prompts, flag, whole
from experiments.generate import check_benchmark_layout, check_fid_reference, sampling_config
from experiments.image_batches import ImageSet, make_images
from experiments.recorder import RunRecorder
from experiments.world_preview import caption_grid
from models.family import TransformerCosts
from models.pipeline import TextToImageModel, build_model, schedule_and_transformer
from models.schedules import Grid

log = logging.getLogger(__name__)

ACCEL_CONF = Path(__file__).resolve().parents[1] / "conf" / "accel"
BASELINE = "baseline"
MIN_REPEATS = 5  # fewer timed repeats give a median that one slow call can move
SCORE_CHUNK = 16  # images per metric call, so 1024 px sets do not need all their activations at once


# ----------------------------------------------------------------------------------------------------------
# Methods: a label and an accel config


@dataclass(frozen=True)
class Method:
    label: str
    accel: DictConfig  # a conf/accel/*.yaml node, as build_policy takes it


def accel_option(option: str, overrides: Mapping | None = None) -> DictConfig:
    """conf/accel/<option>.yaml with some of its keys changed; a key the option lacks is an error."""
    path = ACCEL_CONF / f"{option}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in ACCEL_CONF.glob("*.yaml"))
        raise UserError(f"accel option {option!r} does not exist; choose one of {known}")
    accel = OmegaConf.load(path)
    OmegaConf.set_struct(accel, True)
    try:
        return OmegaConf.merge(accel, overrides or {})
    except ConfigKeyError as error:
        raise UserError(f"accel option {option!r} has no key {error.key!r}; its keys are {list(accel)}") from None


def methods_from(specs: Sequence[DictConfig]) -> list[Method]:
    """Methods from a preset's `methods` list: [{label: ..., accel: <option>, overrides: {key: value}}, ...]."""
    labels = [spec.label for spec in specs]
    if BASELINE in labels or len(set(labels)) < len(labels):
        raise UserError(f"method labels must be unique and not {BASELINE!r} (the baseline always runs); got {labels}")
    # Overrides resolve against the whole config first, so they may name other keys (benchmark.stages_file).
    return [Method(spec.label, accel_option(spec.accel, OmegaConf.to_container(spec.overrides, resolve=True)
                                            if spec.get("overrides") else None)) for spec in specs]


# ----------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Wall-clock seconds of one method's timed repeats, in run order, and the peak memory they reached."""

    seconds: list[float]
    peak_memory_mib: float | None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def speedup_range(self, baseline: Timing) -> tuple[float, float]:
        """Min and max over rounds of the baseline's seconds over this method's, paired by round."""
        ratios = [base / own for base, own in zip(baseline.seconds, self.seconds)]
        return min(ratios), max(ratios)


class PeakMemory:
    """Peak memory in use while the block runs, in MiB: `with PeakMemory(device) as peak: ...; peak.mib`.

    CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak resident set size (VmHWM), reset before the
    block by writing 5 to /proc/self/clear_refs (Linux); None where the peak cannot be reset.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: float | None = None
        self._rss_peak_reset = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._rss_peak_reset = True
            except OSError:
                self._rss_peak_reset = False
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._rss_peak_reset:
            status = Path("/proc/self/status").read_text().splitlines()
            self.mib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def memory_measure(device: torch.device) -> str:
    """What PeakMemory reports on `device`, for the summary."""
    if device.type == "cuda":
        return "CUDA peak allocated tensor memory (torch.cuda.max_memory_allocated), model included"
    return "CPU peak resident set size of the process (VmHWM, reset per call), model and allocator caches included"


def time_interleaved(
    calls: Mapping[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, Timing]:
    """Time every call `repeats` times in interleaved rounds (a, b, c, a, b, c, ...) after `warmup` untimed rounds."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    peaks: dict[str, list[float | None]] = {name: [] for name in calls}
    for _ in tqdm(range(repeats), desc="timed rounds", leave=False):
        for name, call in calls.items():
            with PeakMemory(device) as peak:
                _synchronize(device)
                start = time.perf_counter()
                call()
                _synchronize(device)
                seconds[name].append(time.perf_counter() - start)
            peaks[name].append(peak.mib)
    return {name: Timing(seconds[name], _max_or_none(peaks[name])) for name in calls}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_or_none(values: list[float | None]) -> float | None:
    return None if None in values else max(values)


# ----------------------------------------------------------------------------------------------------------
# Quality of an image set against the baseline set


@dataclass
class ScoredSet:
    images: list[np.ndarray]
    scores: dict  # shapes_eval (+ per category and delta), <metric> means, fid
    per_image: list[dict]  # index, sample, prompt, seed, passed, <metric> values
    features: np.ndarray | None  # Inception features, for FID


@dataclass
class QualityProtocol:
    samples: list[dict]  # the prompt samples (evals.prompts.prompt_samples)
    seeds: list[int]  # per sample, as make_images uses them
    image_metrics: dict[str, Metric]  # against the baseline image of the same prompt, sample and seed
    prompt_metrics: dict[str, PromptMetric]  # against the prompt
    inception: InceptionFeatures | None  # FID against the baseline set (and the reference)
    shapes_eval: bool
    reference: ReferenceStatistics | None = None  # metrics.fid_reference: FID against it
    fid_vs_baseline: bool = True  # the Inception features may be there for the reference only
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it was left out

    def score(self, images: list[np.ndarray], baseline: ScoredSet | None) -> ScoredSet:
        """Score a set against the baseline set; None: this is the baseline set, compared with itself."""
        per_image = [{"index": sample["index"], "sample": sample["sample"], "prompt": sample["prompt"], "seed": seed}
                     for sample, seed in zip(self.samples, self.seeds)]
        features = self.inception(images) if self.inception is not None else None
        scores: dict = {}
        if self.shapes_eval:
            shapes = evaluate(images, self.samples)
            scores["shapes_eval"], scores["shapes_eval_per_category"] = shapes["overall"], shapes["per_category"]
            baseline_passed = shapes["correct"] if baseline is None else [row["passed"] for row in baseline.per_image]
            scores["shapes_eval_delta"], scores["shapes_eval_delta_se"] = paired_delta(shapes["correct"], baseline_passed)
            for row, passed in zip(per_image, shapes["correct"]):
                row["passed"] = passed
        baseline_images = images if baseline is None else baseline.images
        for name, metric in {**self.prompt_metrics, **self.image_metrics}.items():
            against = self.samples if name in self.prompt_metrics else baseline_images
            chunks = range(0, len(images), SCORE_CHUNK)
            values = torch.cat([metric(images[i : i + SCORE_CHUNK], against[i : i + SCORE_CHUNK]) for i in chunks])
            scores[name] = float(values.nanmean())
            for row, value in zip(per_image, values.tolist()):
                row[name] = value
        if features is not None and self.fid_vs_baseline:
            scores["fid"] = frechet_distance(features, features if baseline is None else baseline.features)
        if self.reference is not None:
            scores["fid_reference"] = frechet_distance_to(features, self.reference)
        return ScoredSet(images, scores, per_image, features)

    @property
    def score_names(self) -> list[str]:
        """The set-level scores a method's row gets, in table order."""
        names = ["shapes_eval", "shapes_eval_delta", "shapes_eval_delta_se"] if self.shapes_eval else []
        names += [*self.prompt_metrics, *self.image_metrics]
        names += ["fid"] if self.inception is not None and self.fid_vs_baseline else []
        return names + (["fid_reference"] if self.reference is not None else [])

    def higher_is_better(self, name: str) -> bool:
        """Direction of one of the score_names."""
        if name in ("fid", "fid_reference"):
            return False
        metric = {**self.image_metrics, **self.prompt_metrics}.get(name)
        return True if metric is None else metric.higher_is_better  # ShapesEval accuracy otherwise


def paired_delta(passed: Sequence[bool], baseline_passed: Sequence[bool]) -> tuple[float, float]:
    """Mean per-image difference in pass rate to the baseline (same prompts and seeds) and its standard error."""
    differences = np.asarray(passed, dtype=float) - np.asarray(baseline_passed, dtype=float)
    if len(differences) < 2:
        return float(differences.mean()), float("nan")
    return float(differences.mean()), float(differences.std(ddof=1) / np.sqrt(len(differences)))


def quality_protocol(cfg: DictConfig, samples: list[dict], seeds: list[int], with_fid: bool) -> QualityProtocol:
    """The metrics of cfg.metrics.names that can run here, ShapesEval on its suite, and FID when asked for."""
    device = torch.device(cfg.device)
    unavailable: dict[str, str] = {}
    metrics = build_metrics(cfg.metrics, device)
    for name, metric in list(metrics.items()):
        if missing := missing_files({name: metric}):
            unavailable[name] = "missing weights: " + "; ".join(missing)
            del metrics[name]
        elif isinstance(metric, PromptMetric) and not all(metric.applies_to(sample) for sample in samples):
            unavailable[name] = f"does not apply to prompts={cfg.prompts.name}"
            del metrics[name]
    inception, reference = None, None
    wants_inception = with_fid or cfg.metrics.fid_reference is not None
    if wants_inception and len(samples) < 2:
        unavailable["fid"] = "needs at least 2 images per set"
    elif wants_inception:
        try:
            inception = InceptionFeatures(device)
        except MetricUnavailable as reason:
            unavailable["fid"] = str(reason)
        if inception is not None and cfg.metrics.fid_reference is not None:
            reference = load_reference_statistics(cfg.metrics.fid_reference, inception, Path(cfg.paths.cache_dir))
    for name, reason in unavailable.items():
        log.warning("METRIC LEFT OUT: %s (%s)", name, reason)
    return QualityProtocol(
        samples, seeds,
        image_metrics={n: m for n, m in metrics.items() if not isinstance(m, PromptMetric)},
        prompt_metrics={n: m for n, m in metrics.items() if isinstance(m, PromptMetric)},
        inception=inception, shapes_eval=cfg.prompts.name == "shapes_eval", reference=reference,
        fid_vs_baseline=with_fid, unavailable=unavailable,
    )


# ----------------------------------------------------------------------------------------------------------
# The protocol


@dataclass(frozen=True)
class ComparisonSettings:
    """The protocol's keys in an experiment's settings block (its other keys belong to the experiment)."""

    repeats: int = MIN_REPEATS  # timed rounds
    warmup: int = 1  # untimed rounds first
    fid: bool = True  # FID against the baseline set (Inception on every image: slow on a CPU)
    pareto_quality: str = "shapes_eval"  # the score on the Pareto figure's quality axis
    samples_shown: int = 8  # prompts on the sample grid

    @classmethod
    def from_block(cls, block: DictConfig) -> ComparisonSettings:
        return cls(**{f.name: block[f.name] for f in dataclasses.fields(cls) if f.name in block})


def check_comparison(cfg: DictConfig, methods: list[Method], settings_key: str) -> None:
    """Every setting of a comparison before any compute: model, prompts, the `settings_key` block, each policy."""
    check_model(cfg)
    check_prompts(cfg)
    check_benchmark_layout(cfg)
    check_fid_reference(cfg)
    options = check_timing(cfg, settings_key)
    whole(f"{settings_key}.samples_shown", options.samples_shown, minimum=1)
    flag(f"{settings_key}.fid", options.fid)
    build_metrics(cfg.metrics)  # names and settings; nothing is loaded
    check_policies(cfg, methods)


def check_timing(cfg: DictConfig, settings_key: str) -> ComparisonSettings:
    """The timing settings (repeats, warmup) of the `settings_key` block, checked."""
    options = ComparisonSettings.from_block(cfg[settings_key])
    whole(f"{settings_key}.repeats", options.repeats, minimum=MIN_REPEATS,
          why=" (timed rounds: with fewer, one slow call moves the median)")
    whole(f"{settings_key}.warmup", options.warmup, minimum=1, why=" (untimed rounds: first calls pay one-off costs)")
    return options


def check_policies(cfg: DictConfig, methods: list[Method]) -> None:
    """Every method's policy, built against the model's spec read from its config (no model is built).

    A policy that changes nothing the baseline computes is refused: its timing and scoring would run in full
    (half an hour on a CPU) to report 1.000x. accel.allow_noop=true (or a method's own allow_noop) runs it anyway.
    """
    spec = ModelSpec.of_config(cfg.model)
    _, transformer = schedule_and_transformer(cfg.model)
    guidance = sampling_config(cfg.model).guides(len(spec.schedule))
    allow_every_noop = flag("accel.allow_noop", cfg.accel.allow_noop)
    for method in methods:
        policy = build_policy(method.accel, spec)
        allowed = allow_every_noop or flag(f"allow_noop of method {method.label}", method.accel.allow_noop)
        if not allowed and changes_nothing(policy, transformer, spec.schedule, guidance):
            raise UserError(no_op_message(cfg, method, policy, len(spec.schedule), guidance))


def changes_nothing(policy: Policy, transformer: TransformerCosts, schedule: Sequence[Grid], guidance: bool) -> bool:
    """Whether a policy's plan computes what the baseline's does: the same MACs, speed_row's "no-op"."""
    def macs(plan_of: Policy | None) -> int:
        return count_macs(transformer, schedule, plan_of, batch_size=1, text_length=1, guidance=guidance).total

    return macs(policy) == macs(None)


def no_op_message(cfg: DictConfig, method: Method, policy: Policy, num_scales: int, guidance: bool) -> str:
    """Why a method's policy changes nothing, and what to change; an empty refinement stage (cfg_drop, stagevar)
    is the usual reason: a stages.json whose probe found no refinement stage."""
    def key(name: str) -> str:  # where the user sets it: cfg.accel (accel_eval, rank_sweep) or a methods list
        return f"accel.{name}" if method.accel is cfg.accel else f"{name} in the overrides of method {method.label}"

    start = getattr(policy, "refinement_start", None)
    stages_file = method.accel.get("stages_file")
    if start is not None and start >= num_scales and stages_file:
        why = (f"the stages file {stages_file} has no refinement stage (refinement_start={start} of {num_scales} "
               "scales), so no scale is accelerated")
        fix = (f"set {key('stages_file')} to a stages.json of {cfg.model.name} whose refinement stage is not empty, "
               f"or to null to accelerate from {key('refinement_start')} (default -3: the last 3 scales)")
    elif start is not None and start >= num_scales:
        why = f"refinement_start={start} is past the last of the {num_scales} scales, so no scale is accelerated"
        fix = f"set {key('refinement_start')} to a scale of the schedule, e.g. -3 (the last 3 scales)"
    else:
        why = ("its plan runs every scale as the baseline does (no scale skipped, no CFG branch dropped, no token "
               "left out)")
        fix = f"set its keys so that it skips, drops or reduces work (conf/accel/{method.accel.name}.yaml says how)"
        if not guidance:
            why += f"; model.sampling.cfg={cfg.model.sampling.cfg} runs no second CFG branch to drop"
            fix = f"guide with model.sampling.cfg > 1, or {fix}"
    return (f"{method.label} (conf/accel/{method.accel.name}.yaml) is a no-op: {why}; its timing and scoring would "
            f"run in full to report 1.000x. Fix: {fix}; or set accel.allow_noop=true to measure the no-op anyway")


def compare_methods(cfg: DictConfig, recorder: RunRecorder, methods: list[Method], settings_key: str) -> dict:
    """The protocol (module docstring) for the baseline and `methods`: logs, tabulates, plots, returns the summary.

    `settings_key` names the experiment's settings block (ComparisonSettings' keys), e.g. accel_eval.
    """
    options = ComparisonSettings.from_block(cfg[settings_key])
    prompts = load_prompts(cfg.prompts)
    image_set = ImageSet.of(cfg, prompts)
    model = build_model(cfg.model, cfg.device)
    sampling = sampling_config(cfg.model)
    everyone = [Method(BASELINE, accel_option("none")), *methods]
    policies = {method.label: build_policy(method.accel, model) for method in everyone}
    processes = recorder.processes
    with_quality = not cfg.model.get("random_init", False)
    protocol = None  # rank 0 scores
    if not with_quality:
        log.warning("RANDOM WEIGHTS (model.random_init=true): speed only, as quality would measure noise")
    elif processes.is_main:
        protocol = quality_protocol(cfg, image_set.samples, image_set.seeds(), options.fid)
        if options.pareto_quality not in protocol.score_names:  # fail before any compute
            raise UserError(f"{settings_key}.pareto_quality={options.pareto_quality!r} is not measured here; "
                            f"choose one of {protocol.score_names}")
    log.info("%s on %s: %s against the baseline", cfg.task, cfg.model.name, ", ".join(m.label for m in methods))

    timed_prompts = [sample["prompt"] for sample in image_set.batches()[0].samples]
    rows: list[dict] = []  # rank 0's: one per method
    if processes.is_main:
        if processes.several:
            log.warning("TIMING ON RANK 0 ALONE: the other %d processes wait while it times the methods, so the "
                        "latencies are one process's, as in a one-process run", processes.world_size - 1)
        rows = measure_speed(model, policies, timed_prompts, sampling, cfg.seed, options, recorder)
    processes.sync()
    if with_quality:
        processes.warn_if_idle(len(image_set.batches()))
        for label, policy in policies.items():
            make_images(recorder, model, image_set, sampling, f"images/{label}",
                        row_fields={"kind": "image", "method": label}, policy=policy)
    if not processes.finish_share():
        return {}

    for row, method in zip(rows, everyone):
        row["accel"] = OmegaConf.to_container(method.accel, resolve=True)
    title = f"{cfg.task}: {cfg.model.name}, batch {len(timed_prompts)} on {model.device}"
    summary = {
        "model": cfg.model.name,
        "device": str(model.device),
        "image_size": list(model.image_size),
        "num_prompts": len(prompts),
        "samples_per_prompt": image_set.samples_per_prompt,
        "timing": {
            "batch_size": len(timed_prompts), "repeats": options.repeats, "warmup": options.warmup,
            "latency": "median seconds per batch, end to end", "memory": memory_measure(model.device),
        },
        "methods": rows,
        "scores": [],
    }
    if protocol is None:
        recorder.write_rows([])
        summary["quality"] = "not measured: random weights"
    else:
        image_rows = measure_quality(cfg, recorder, protocol, image_set, prompts, list(policies), rows,
                                     options.samples_shown)
        recorder.write_rows(image_rows)
        if cfg.prompts.name in BENCHMARK_LAYOUTS:
            folder = recorder.run_dir / cfg.prompts.name
            summary["exports"] = {cfg.prompts.name: {label: str(folder / label) for label in policies}}
            log.info("%s layout written to %s/<method>: score each with the official scorer, then bring the scores "
                     "back with experiment=import_scores", cfg.prompts.name, folder)
        quality, higher_is_better = options.pareto_quality, protocol.higher_is_better(options.pareto_quality)
        points = [ParetoPoint(row["method"], row["speedup"], row[quality]) for row in rows]
        recorder.save_figure(pareto_figure(points, quality, higher_is_better, title), "pareto")
        summary.update(
            scores=protocol.score_names,
            higher_is_better={name: protocol.higher_is_better(name) for name in protocol.score_names},
            pareto_quality=quality,
            unavailable_metrics=protocol.unavailable,
        )
    for row in rows:
        recorder.log({"kind": "method", **row})
    table = recorder.log_table(cfg.task, *comparison_table(rows, summary["scores"]))
    log.info(f"{title}, median of {options.repeats} interleaved repeats\n{table}")
    return summary


def measure_speed(
    model: TextToImageModel, policies: dict[str, Policy], prompts: list[str], sampling: SamplingConfig, seed: int,
    options: ComparisonSettings, recorder: RunRecorder,
) -> list[dict]:
    """One row per method (the baseline first): latency, speedup, peak memory, MACs and their speedup."""
    calls = {label: functools.partial(generate, model, prompts, sampling, seed, policy)
             for label, policy in policies.items()}
    timings = time_interleaved(calls, options.repeats, options.warmup, model.device)
    for label, timing in timings.items():
        for repeat, seconds in enumerate(timing.seconds):
            recorder.log({"kind": "timing", "method": label, "repeat": repeat, "seconds": seconds})
    text_length = model.text_length(prompts)
    guidance = sampling.guides(len(model.schedule))
    macs = {
        label: count_macs(model.transformer.config, model.schedule, policy, batch_size=len(prompts),
                          text_length=text_length, guidance=guidance).total
        for label, policy in policies.items()
    }
    return [speed_row(label, timing, timings[BASELINE], macs[label], macs[BASELINE]) for label, timing in timings.items()]


def speed_row(label: str, timing: Timing, baseline: Timing, method_macs: float, baseline_macs: float) -> dict:
    """A method's speed: latency with its spread, speedup with its range and verdict, MACs."""
    no_op = label != BASELINE and method_macs == baseline_macs
    if no_op:
        log.warning(
            "NO-OP: %s changes nothing the transformer computes (its MACs equal the baseline's), so its speedup is "
            "1 by construction; a StageVAR fed a stages.json whose refinement stage is empty is one", label
        )
    speedup, (lowest, highest) = baseline.median / timing.median, timing.speedup_range(baseline)
    if label == BASELINE or no_op:
        speedup = lowest = highest = 1.0
    verdict = "no-op" if no_op else "" if label == BASELINE or lowest > 1 or highest < 1 else "not significant"
    return {
        "method": label,
        "latency_s": timing.median, "latency_min_s": min(timing.seconds), "latency_max_s": max(timing.seconds),
        "speedup": speedup, "speedup_min": lowest, "speedup_max": highest, "speedup_verdict": verdict,
        "peak_memory_mib": timing.peak_memory_mib,
        "gmacs": method_macs / 1e9,
        "mac_speedup": baseline_macs / method_macs,
    }


def measure_quality(
    cfg: DictConfig, recorder: RunRecorder, protocol: QualityProtocol, image_set: ImageSet, prompts: list[dict],
    labels: list[str], rows: list[dict], samples_shown: int,
) -> list[dict]:
    """Score every method's images (the baseline first) from the run folder; adds the scores to `rows` and returns
    the per-image rows. On a benchmark's prompts, the images also go out in its scorer's layout."""
    baseline: ScoredSet | None = None
    image_rows, shown, captions = [], [], []
    for row, label in zip(rows, labels):
        images = image_set.load(recorder.run_dir / "images" / label)
        scored = protocol.score(images, baseline)
        baseline = baseline or scored
        row.update(scored.scores)
        image_rows += [{"kind": "image", "method": label, **image_row} for image_row in scored.per_image]
        if cfg.prompts.name in BENCHMARK_LAYOUTS:
            export_benchmark_layout(cfg.prompts.name, recorder.run_dir / cfg.prompts.name / label, prompts, images,
                                    image_set.samples_per_prompt)
        shown += images[:samples_shown]
        captions += [label] * min(samples_shown, len(images))
    recorder.save_figure(caption_grid(shown, captions, columns=min(samples_shown, len(images))), "samples")
    return image_rows


SPEED_COLUMNS = ["latency (s)", "latency min-max", "speedup", "speedup min-max", "verdict", "MAC speedup",
                 "peak memory (MiB)"]
SCORE_HEADERS = {"shapes_eval": "ShapesEval", "shapes_eval_delta": "delta ShapesEval", "shapes_eval_delta_se": "+-",
                 "fid": "FID vs baseline", "fid_reference": "FID vs reference"}


def comparison_table(rows: list[dict], score_names: Sequence[str]) -> tuple[list[str], list[list]]:
    """Columns and rows of the method table: speed with its spread and verdict, then the quality scores (None
    where a row has none)."""
    columns = ["method", *SPEED_COLUMNS, *(SCORE_HEADERS.get(name, name) for name in score_names)]
    table = []
    for row in rows:
        speed = [
            row["latency_s"], value_range(row, "latency_min_s", "latency_max_s", "{:.3g}"),
            row["speedup"], value_range(row, "speedup_min", "speedup_max", "{:.2f}"), row.get("speedup_verdict"),
            row["mac_speedup"], row["peak_memory_mib"],
        ]
        table.append([row["method"], *speed, *(row.get(name) for name in score_names)])
    return columns, table


def value_range(row: dict, low: str, high: str, number: str) -> str | None:
    """'low-high' of a row, or None for rows written before ranges were measured (an old sweep job)."""
    if low not in row:
        return None
    return f"{number.format(row[low])}-{number.format(row[high])}"


# ----------------------------------------------------------------------------------------------------------
# Pareto figure: speed against quality


@dataclass(frozen=True)
class ParetoPoint:
    label: str
    speedup: float
    quality: float


def pareto_front(points: Sequence[ParetoPoint], higher_is_better: bool) -> list[ParetoPoint]:
    """The points no other point dominates (as fast and as good, and better in one), slowest first."""
    sign = 1 if higher_is_better else -1

    def dominates(a: ParetoPoint, b: ParetoPoint) -> bool:
        at_least = a.speedup >= b.speedup and sign * a.quality >= sign * b.quality
        return at_least and (a.speedup > b.speedup or sign * a.quality > sign * b.quality)

    return sorted((b for b in points if not any(dominates(a, b) for a in points)), key=lambda p: p.speedup)


def pareto_figure(points: Sequence[ParetoPoint], quality_name: str, higher_is_better: bool, title: str) -> Figure:
    """Speedup against quality, one marker per point, the Pareto front ringed and joined; better is up and right."""
    fig, axis = plt.subplots(figsize=(7.5, 4.5))
    front = pareto_front(points, higher_is_better)
    axis.plot([p.speedup for p in front], [p.quality for p in front], color="0.6", linestyle="--", marker="o",
              markersize=13, markerfacecolor="none", zorder=1, label="Pareto front")
    for point, marker in zip(points, itertools.cycle("osD^vP*Xhp<>")):
        axis.scatter(point.speedup, point.quality, marker=marker, s=40, zorder=2, label=point.label)
    if not higher_is_better:
        axis.invert_yaxis()
    axis.set_xlabel("wall-clock speedup over the baseline (x)")
    axis.set_ylabel(f"{quality_name} ({'higher' if higher_is_better else 'lower'} is better)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig
