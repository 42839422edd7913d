"""stage_probe: what each scale contributes, and where the semantic, structure and refinement stages begin.

Each prompt batch is generated once by the one sampler with a ScaleTrace observer (analysis/probe.py), then
measured and dropped. With `probe.source=ground_truth` every scale's bits are the ground truth's instead (the
world's renders quantised by the model's VAE; shapes-world prompts only): the partial images are the world's
own, and the stages found are those of the world, its VAE and the metrics, whatever the transformer has learnt
(it still runs, so its ranks are measured, but on inputs it did not choose).

The partial images give the *visible* evidence. With `probe.evidence=decided` or `both` the sampler also forks each
batch's run after every scale into `probe.continuations` continuations (analysis/continuations.py), whose final
images against the original's give the *decided* evidence; stages.json keeps the boundaries of both, and hands the
sampler those `probe.evidence` names (both: the later of the two). The run folder holds everything the notebook
needs to redraw the figures:
    results.jsonl    one row per prompt and scale: metrics vs the final image or prompt, band changes, ranks, and
                     the continuations' decided/<metric> and decided_spread/<metric>
    stages.json      boundaries (visible, decided, and those fed to the sampler), ranks r_k, the curves they were
                     decided on (analysis/stages.py)
    spectra.json     mean power spectra and singular-value energies per scale, and the probe's settings
    images/strip/    partial images of the first probe.strip_prompts prompts
    figures/         the paper's Fig. 1 panels, visible vs decided curves, the strip, power and singular-value
                     spectra, rank fractions

Under torchrun every process probes its share of the batches (experiments/distributed.py); rank 0 merges the rows
in prompt order and the spectra in batch order, as one process would have summed them, and decides the stages.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from accel.sampler import Continuations, generate
from analysis.continuations import continuation_seeds, decided_columns, decided_evidence
from analysis.metrics import Metric, build_metrics, missing_files
from analysis.plots import load_probe_run, probe_figures
from analysis.probe import ProbeConfig, RankChoice, RunningMeans, ScaleTrace, measure, rank_summary
from analysis.rows import INPUTS, scale_means
from analysis.spectra import band_labels
from analysis.stages import DecidedEvidence, StageBoundaries, StageRule, curves_by_kind, detect_stages, write_stages
from errors import UserError
from evals.prompts import spread
from experiments.config_checks import check_model, check_prompts
from experiments.generate import sampling_config
from experiments.prefix_probe import ground_truth_bits, world_renders
from experiments.recorder import RunRecorder
from models.pipeline import build_model, missing_model_files, resolve_device, schedule_and_transformer

log = logging.getLogger(__name__)
SHARDED = True  # every process of a torchrun run probes its share of the batches
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ProbeSettings:
    """What the probe measures, checked against the model before anything is computed."""

    probe: ProbeConfig
    rule: StageRule
    rank_choice: RankChoice
    blocks: list[int]  # block indices whose outputs' ranks are measured
    prompts: list[dict]
    metrics: dict[str, Metric]  # built, not loaded

    @classmethod
    def of(cls, cfg: DictConfig) -> ProbeSettings:
        probe = ProbeConfig(**OmegaConf.to_container(cfg.probe, resolve=True))
        rank_choice = RankChoice(**cfg.stages.ranks)
        if rank_choice.energy not in probe.rank_energies:
            raise UserError(
                f"stages.ranks.energy={rank_choice.energy} must be one of probe.rank_energies={list(probe.rank_energies)}"
            )
        if probe.source == "ground_truth" and cfg.prompts.name != "shapes_eval":
            raise UserError("probe.source=ground_truth renders the shapes world, so it needs prompts=shapes_eval, "
                            f"not prompts={cfg.prompts.name}")
        prompts = spread(check_prompts(cfg), probe.num_prompts)
        metrics = applicable_metrics(build_metrics(cfg.metrics, resolve_device(cfg.device)), prompts)
        require_files(cfg.model, metrics)
        _, transformer = schedule_and_transformer(cfg.model)
        blocks = probe.blocks(transformer.depth)
        if rank_choice.source not in [INPUTS] + [f"block{b}" for b in blocks]:
            raise UserError(f"stages.ranks.source={rank_choice.source!r}: use {INPUTS} or block<i> for i in {blocks}")
        return cls(probe, StageRule(**cfg.stages.rule), rank_choice, blocks, prompts, metrics)


def check(cfg: DictConfig) -> None:
    check_model(cfg)
    ProbeSettings.of(cfg)


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    settings = ProbeSettings.of(cfg)
    probe, rule, rank_choice, blocks = settings.probe, settings.rule, settings.rank_choice, settings.blocks
    prompts, metrics = settings.prompts, settings.metrics
    model = build_model(cfg.model, cfg.device)
    sampling = sampling_config(cfg.model)
    log.info("%s: probing %d prompts (%s, %s evidence) with %s", cfg.model.name, len(prompts), probe.source,
             probe.evidence, ", ".join(metrics))

    processes = recorder.processes
    starts = range(0, len(prompts), probe.batch_size)
    processes.warn_if_idle(len(starts))
    renders = world_renders(prompts, model, cfg.seed) if probe.source == "ground_truth" else None
    batch_spectra: dict[int, RunningMeans] = {}  # batch number -> its power spectra and singular-value energies
    per_batch = min(probe.batch_size, len(prompts))
    for number in tqdm(processes.share(len(starts)), desc=f"stage probe ({per_batch} per batch)",
                       disable=not processes.is_main):
        batch = prompts[starts[number] : starts[number] + probe.batch_size]
        trace = ScaleTrace(model.vae, blocks, chunk_starts=[chunk[0].index for chunk in model.transformer.chunks])
        texts = [p["prompt"] for p in batch]
        forced = () if renders is None else ground_truth_bits(model, renders[starts[number] : starts[number] + len(batch)])
        forks = (Continuations(range(len(model.schedule)), continuation_seeds(cfg.seed + number, probe.continuations))
                 if probe.decided else None)
        generation = generate(model, texts, sampling, seed=cfg.seed + number, observers=[trace], decode=False,
                              forced_codes=forced, continuations=forks)
        decided_by_scale = (decided_columns(trace.partial_images[-1], generation.continuations, batch, metrics)
                            if forks else {})
        batch_spectra[number] = RunningMeans()
        for row in measure(trace, batch, metrics, probe, batch_spectra[number], more_columns=decided_by_scale):
            recorder.log_partial(row)
        save_strip(recorder, trace, batch, first_position=starts[number], strip_prompts=probe.strip_prompts)
    shares = processes.gather(batch_spectra)
    if not processes.finish_share():
        return {}

    by_batch = {number: means for share in shares for number, means in share.items()}
    spectra = RunningMeans()
    for number in sorted(by_batch):  # in batch order: the sums of a one-process run, bit for bit
        spectra.add_means(by_batch[number])
    position = {prompt["index"]: i for i, prompt in enumerate(prompts)}
    rows = sorted(recorder.partial_rows(), key=lambda row: (position[row["index"]], row["scale"]))
    recorder.write_rows(rows)

    schedule = model.schedule
    curves = {name: scale_means(rows, name, len(schedule)) for name in metrics}
    by_kind = curves_by_kind(curves, {name: metric.kind for name, metric in metrics.items()})
    visible = detect_stages(by_kind["semantic"], by_kind["structural"], rule)
    decided = decided_evidence(rows, metrics, rule, len(schedule), probe.continuations) if probe.decided else None
    ranks = rank_summary(rows, rank_choice, schedule, probe.chunk_rank_energies)
    stages = write_stages(
        recorder.run_dir / "stages.json", model=cfg.model.name, source=probe.source, schedule=schedule,
        boundaries=visible, ranks=ranks, rule=rule, semantic_curves=by_kind["semantic"],
        structural_curves=by_kind["structural"], fidelity_curves=by_kind["fidelity"],
        num_prompts=len(prompts), code_version=code_version(), decided=decided, evidence=probe.evidence,
    )
    boundaries = StageBoundaries(stages["semantic_end"], stages["structure_end"], stages["refinement_start"])  # fed
    write_spectra(recorder.run_dir / "spectra.json", spectra, probe, blocks, len(schedule), model.image_size)
    for name, figure in probe_figures(load_probe_run(recorder.run_dir)).items():
        recorder.save_figure(figure, name)

    table = recorder.log_table(
        "stages",
        ["scale", "grid", "stage", "visible stage", "rank r_k", "r_k / M"] + list(curves),
        [
            [k, f"{h}x{w}", boundaries.stage(k), visible.stage(k), ranks["per_scale"][k], ranks["fraction"][k]]
            + [curve[k] for curve in curves.values()]
            for k, (h, w) in enumerate(schedule)
        ],
    )
    log.info("stages of %s, %s, %s evidence (semantic_end=%d, structure_end=%d, refinement_start=%d):\n%s",
             cfg.model.name, probe.source, probe.evidence, boundaries.semantic_end, boundaries.structure_end,
             boundaries.refinement_start, table)
    if decided is not None:
        log.info("decided evidence (%d continuations per prompt and scale; +- one standard error over prompts):\n%s",
                 probe.continuations, decided_table(recorder, decided, schedule))
    warnings = [
        f"no {stage} stage: " + ("structure settles with semantics" if stage == "structure" else
                                 "a curve settles only at the last scale, so no scale is left to accelerate")
        for stage in boundaries.empty_stages(len(schedule))
    ]
    for warning in warnings:
        log.warning("%s (the curves are in %s)", warning, recorder.run_dir / "stages.json")
    return {
        "warnings": warnings,
        "model": cfg.model.name,
        "source": probe.source,
        "num_prompts": len(prompts),
        "metrics": list(metrics),
        "evidence": probe.evidence,
        "visible": stages["visible"],
        "decided": None if decided is None else asdict(decided.boundaries),
        "semantic_end": boundaries.semantic_end,
        "structure_end": boundaries.structure_end,
        "refinement_start": boundaries.refinement_start,
        "semantics_settle_first": boundaries.semantics_settle_first,
        "ranks": ranks,
        "stages_file": str(recorder.run_dir / "stages.json"),
        "code_version": stages["code_version"],
    }


def decided_table(recorder: RunRecorder, decided: DecidedEvidence, schedule: list) -> str:
    """tables/decided.csv: per scale, its decided stage and each metric's continuation-vs-original curve with its
    standard error."""
    names = list(decided.curves)
    return recorder.log_table(
        "decided",
        ["scale", "grid", "decided stage"] + [column for name in names for column in (name, f"{name} se")],
        [
            [k, f"{h}x{w}", decided.boundaries.stage(k)]
            + [value for name in names for value in (decided.curves[name][k], decided.stderr[name][k])]
            for k, (h, w) in enumerate(schedule)
        ],
    )


def applicable_metrics(metrics: dict[str, Metric], prompts: list[dict]) -> dict[str, Metric]:
    """Drop prompt metrics that fit none of the prompts (ShapesEval on non-shapes prompts); each stage needs one."""
    kept = {}
    for name, metric in metrics.items():
        if metric.compares_with == "prompt" and not any(metric.applies_to(p) for p in prompts):
            log.warning("metric %s left out: it applies to none of these prompts", name)
            continue
        kept[name] = metric
    for kind in ("semantic", "structural"):
        if not any(metric.kind == kind for metric in kept.values()):
            raise UserError(
                f"metrics.names={list(metrics)} gives no {kind} metric for these prompts, so that stage cannot be "
                "found; add one (shapes_eval only applies to shapes-world prompts)"
            )
    return kept


def require_files(model_cfg: DictConfig, metrics: dict[str, Metric]) -> None:
    """Stop before any compute with one message naming every missing weight file, the model's and the metrics'."""
    missing = missing_model_files(model_cfg) + missing_files(metrics)
    if missing:
        raise UserError(
            "missing weight files; nothing was computed:\n  " + "\n  ".join(missing)
            + "\nModel weights go under paths.weights_dir (or STAGEVAR_WEIGHTS_DIR); metric weights go where each "
            "line says (see conf/metrics/full.yaml), or leave those metrics out with metrics.names=[...]."
        )


def save_strip(
    recorder: RunRecorder, trace: ScaleTrace, batch: list[dict], first_position: int, strip_prompts: int
) -> None:
    """Keep the partial images of the run's first `strip_prompts` prompts as images/strip/<index>_scale<k>.png."""
    for i, prompt in enumerate(batch[: max(0, strip_prompts - first_position)]):
        names = [f"{prompt['index']:05d}_scale{k:02d}" for k in range(len(trace.partial_images))]
        recorder.save_partial_images([images[i].numpy() for images in trace.partial_images], names,
                                     subdir="images/strip")


def write_spectra(
    path: Path, spectra: RunningMeans, probe: ProbeConfig, blocks: list[int], num_scales: int,
    image_size: tuple[int, int],
) -> None:
    """spectra.json: the mean power spectrum and singular-value energies per scale, and the probe's settings."""
    sources = [INPUTS] + [f"block{b}" for b in blocks]
    num_radii = min(image_size) // 2 + 1
    content = {
        "band_labels": band_labels(probe.band_edges),
        "rank_energies": list(probe.rank_energies),
        "rank_sources": sources,
        "radii": [r / (min(image_size) / 2) for r in range(num_radii)],  # in units of the Nyquist frequency
        "power_spectrum": [spectra.mean(f"power_spectrum/{k}") for k in range(num_scales)],
        "cumulative_energy": {
            source: [spectra.mean(f"cumulative_energy/{source}/{k}") for k in range(num_scales)] for source in sources
        },
    }
    path.write_text(json.dumps(content) + "\n")


def code_version() -> str:
    """The git commit of the code that ran (with -dirty for uncommitted changes), or 'unknown' outside git."""
    try:
        result = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"
