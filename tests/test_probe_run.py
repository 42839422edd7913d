"""experiments/stage_probe.py end to end on a small random model saved like the tiny checkpoint, the files it
leaves, the notebook that redraws them, and the errors that stop it before any compute."""

import json
from dataclasses import astuple
from pathlib import Path

import nbformat
import pytest
from hydra import compose, initialize_config_dir
from nbclient import NotebookClient

import numpy as np
from omegaconf import OmegaConf

from accel.sampler import to_uint8

from accel.policies import CFGDropPolicy, ModelSpec, build_policy
from analysis.plots import load_probe_run, probe_figures
from analysis.ranks import aggregate_rank
from analysis.rows import decided_key, rank_key, scale_means, scale_stderrs, spread_key
from analysis.stages import StageBoundaries, load_stages, settling_scale
from errors import UserError
from evals.prompts import load_prompts, spread
from experiments import stage_probe
from experiments.prefix_probe import world_renders
from experiments.recorder import RunRecorder
from models.checkpoint import save_safetensors
from models.pipeline import TINY_FILES

from helpers import CONFIG_64PX, small_model

REPO = Path(__file__).resolve().parents[1]
NUM_PROMPTS, NUM_SCALES = 2, len(CONFIG_64PX["schedule"])


def probe_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", ["experiment=stage_probe", "logger=none", "device=cpu", *overrides])


def run_probe(cfg, run_dir: Path) -> dict:
    with RunRecorder(cfg, run_dir) as recorder:
        summary = stage_probe.run(cfg, recorder)
        recorder.finish(summary)
    return summary


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small_checkpoint")
    model = small_model(CONFIG_64PX)
    for part in ("transformer", "vae", "text_encoder"):
        save_safetensors(getattr(model, part).state_dict(), folder / f"{part}.safetensors", {})
    (folder / "config.json").write_text(json.dumps(CONFIG_64PX))
    return folder


def probe_run(checkpoint: Path, folder: Path, *overrides: str) -> Path:
    """A probe run of 2 prompts in batches of 1, with the default (offline) metrics."""
    cfg = probe_config(
        f"model.checkpoint_dir={checkpoint}", f"probe.num_prompts={NUM_PROMPTS}", "probe.batch_size=1",
        "probe.strip_prompts=2", *overrides,
    )
    run_probe(cfg, folder)
    return folder


@pytest.fixture(scope="module")
def run_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return probe_run(checkpoint, tmp_path_factory.mktemp("run"))


def test_the_run_folder_holds_rows_stages_and_figures(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert len(rows) == NUM_PROMPTS * NUM_SCALES
    assert all({"shapes_eval", "ssim", "ms_ssim", "gmsd", "st_lpips", rank_key("inputs", 0.95)} <= row.keys() for row in rows)
    schedule = [(side, side) for side in CONFIG_64PX["schedule"]]
    stages = load_stages(run_dir / "stages.json", "tiny", schedule)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and stages["num_prompts"] == NUM_PROMPTS
    for key in ("semantic_end", "structure_end", "refinement_start"):
        assert summary[key] == stages[key]
    boundaries = StageBoundaries(stages["semantic_end"], stages["structure_end"], stages["refinement_start"])
    assert [warning.split(":")[0] for warning in summary["warnings"]] == [
        f"no {stage} stage" for stage in boundaries.empty_stages(NUM_SCALES)  # an empty stage is said, not hidden
    ]
    assert sorted(path.stem for path in (run_dir / "figures").glob("*.png")) == sorted([
        "fig1a_semantic_curves", "fig1b_structural_curves", "fidelity_curves", "fig1c_frequency_band_changes",
        "partial_images",
        "power_spectra", "singular_value_spectra", "rank_fraction", "visible_vs_decided",
    ])
    strip = load_probe_run(run_dir).strip
    assert len(strip) == 2 and all(len(images) == NUM_SCALES for images in strip.values())  # across both batches


def test_the_spectra_figures_name_scales_by_their_grid_side_as_every_other_figure(run_dir: Path):
    figures = probe_figures(load_probe_run(run_dir))
    for name in ("power_spectra", "singular_value_spectra"):
        labels = [text.get_text() for text in figures[name].axes[-1].get_legend().get_texts()]
        assert labels == [f"grid {side}" for side in CONFIG_64PX["schedule"]], name


def test_the_released_stagevar_takes_its_per_chunk_ranks_from_the_probe(run_dir: Path):
    model = small_model(CONFIG_64PX)
    accel = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "accel" / "stagevar_released.yaml"),
                            {"ranks": "probe", "stages_file": str(run_dir / "stages.json")})
    released = build_policy(accel, ModelSpec("tiny", list(model.schedule), 2, 1))
    ratios = json.loads((run_dir / "stages.json").read_text())["ranks"]["chunk_ranks"]["ratio"]["0.96"]
    k = NUM_SCALES - 3  # the scale the released policy reduces (the last 2 are skipped)
    h, w = model.schedule[k]
    assert released.ranks == {k: [int(ratio * h * w) + 1 for ratio in ratios[str(k)]]}
    with pytest.raises(UserError, match=r"per-chunk ranks at \['0.9', '0.95', '0.96', '0.99'\], not at accel.alpha=0.5"):
        build_policy(OmegaConf.merge(accel, {"alpha": 0.5}), ModelSpec("tiny", list(model.schedule), 2, 1))


def rule_boundaries(curves: dict, rule: dict) -> StageBoundaries:
    semantic_end = max(settling_scale(curves[m], rule["semantic_tolerance"]) for m in rule["semantic_metrics"])
    structure_end = max(settling_scale(curves[m], rule["structure_tolerance"]) for m in rule["structural_metrics"])
    return StageBoundaries(semantic_end, structure_end, max(semantic_end, structure_end) + 1)


def test_boundaries_follow_the_rule_on_the_curves_of_the_rows(run_dir: Path):
    stages = json.loads((run_dir / "stages.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    rule = stages["rule"]
    for name, curve in stages["curves"].items():
        assert curve == pytest.approx(scale_means(rows, name, NUM_SCALES))  # decided on what the rows hold
    assert StageBoundaries(**stages["visible"]) == rule_boundaries(stages["curves"], rule)
    assert rule["semantic_metrics"] == ["shapes_composition"]
    assert rule["structural_metrics"] == ["shapes_eval", "ms_ssim", "st_lpips"]
    assert rule["fidelity_metrics"] == ["ssim", "gmsd"]  # drawn, but they decide no boundary
    assert stages["source"] == "model"


def test_the_decided_curves_compare_continuations_with_the_original_and_both_feeds_the_later_boundaries(run_dir: Path):
    stages = json.loads((run_dir / "stages.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    decided = stages["decided"]
    assert stages["evidence"] == "both" and decided["continuations"] == 2  # the defaults
    for name, curve in decided["curves"].items():
        assert curve == pytest.approx(scale_means(rows, decided_key(name), NUM_SCALES))
        assert decided["spread"][name] == pytest.approx(scale_means(rows, spread_key(name), NUM_SCALES))
        assert decided["stderr"][name] == pytest.approx(scale_stderrs(rows, decided_key(name), NUM_SCALES))
    for name in ("ms_ssim", "st_lpips", "ssim", "gmsd"):  # forked after the last scale, a continuation is the original
        assert decided["curves"][name][-1] == pytest.approx(stages["curves"][name][-1], abs=1e-6)
    assert decided["curves"]["shapes_eval"][-1] == 1  # the same verdict
    found = rule_boundaries(decided["curves"], stages["rule"])
    assert StageBoundaries(**{key: decided[key] for key in stages["visible"]}) == found
    fed = StageBoundaries(**stages["visible"]).later(found)
    assert (stages["semantic_end"], stages["structure_end"], stages["refinement_start"]) == astuple(fed)


def test_decided_evidence_alone_feeds_the_sampler_and_one_continuation_has_no_spread(checkpoint: Path, tmp_path: Path):
    run_dir = probe_run(checkpoint, tmp_path, "probe.evidence=decided", "probe.continuations=1")
    schedule = [(side, side) for side in CONFIG_64PX["schedule"]]
    stages = load_stages(run_dir / "stages.json", "tiny", schedule)  # the reader the policies use
    decided = stages["decided"]
    assert stages["evidence"] == "decided" and decided["continuations"] == 1 and decided["spread"] == {}
    assert all(stages[key] == decided[key] for key in ("semantic_end", "structure_end", "refinement_start"))
    assert set(stages["visible"]) == {"semantic_end", "structure_end", "refinement_start"}  # kept beside
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert all(decided_key("ssim") in row and spread_key("ssim") not in row for row in rows)
    policy = CFGDropPolicy(ModelSpec("tiny", schedule, 2, 1), stages_file=str(run_dir / "stages.json"))
    assert policy.refinement_start == decided["refinement_start"]
    assert (run_dir / "figures" / "visible_vs_decided.png").is_file()


def test_the_ground_truth_probe_decodes_the_worlds_own_bits_whatever_the_sampling(checkpoint: Path, tmp_path: Path):
    """probe.source=ground_truth: the partial images are the world renders' multi-scale codes (renders drawn with
    the run's seed), so the last one is the VAE's reconstruction, and no sampling setting changes them."""
    first = probe_run(checkpoint, tmp_path / "first", "probe.source=ground_truth", "probe.evidence=visible")
    second = probe_run(checkpoint, tmp_path / "second", "probe.source=ground_truth", "probe.evidence=visible",
                       "model.sampling.tau=1.0", "model.sampling.cfg=4")
    model = small_model(CONFIG_64PX)
    prompts = spread(load_prompts(probe_config().prompts), NUM_PROMPTS)
    renders = world_renders(prompts, model, seed=0)
    first_run, second_run = load_probe_run(first), load_probe_run(second)
    for i, prompt in enumerate(prompts):
        quantized, _ = model.vae.quantize(model.vae.encode(renders[i : i + 1]), model.schedule)
        reconstruction = to_uint8(model.vae.decode(quantized))[0].numpy().astype(int)
        # the sampler sums the codes its own way, so a pixel may round one level apart
        assert np.abs(first_run.strip[prompt["index"]][-1].astype(int) - reconstruction).max() <= 2
        for scale in range(NUM_SCALES):
            assert np.array_equal(first_run.strip[prompt["index"]][scale], second_run.strip[prompt["index"]][scale])
    assert first_run.stages["source"] == "ground_truth"


def test_the_ranks_are_the_90th_percentile_over_prompts(run_dir: Path):
    stages = json.loads((run_dir / "stages.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    key = rank_key("inputs", 0.95)
    expected = [aggregate_rank([row[key] for row in rows if row["scale"] == k], "p90") for k in range(NUM_SCALES)]
    assert stages["ranks"]["per_scale"] == expected
    assert stages["ranks"]["fraction"] == [rank / side**2 for rank, side in zip(expected, CONFIG_64PX["schedule"])]


def test_the_notebook_redraws_every_figure_from_the_run_folder(run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STAGE_PROBE_RUN", str(run_dir))
    notebook = nbformat.read(REPO / "notebooks" / "stage_probe.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 9
    assert any("refinement_start=" in output.get("text", "") for output in outputs)


def test_missing_weights_stop_the_probe_before_any_compute_naming_every_file(tmp_path: Path):
    cfg = probe_config("model=infinity2b", "metrics=full", f"paths.weights_dir={tmp_path}", f"metrics.torch_hub_dir={tmp_path}/hub")
    with pytest.raises(UserError) as error:
        run_probe(cfg, tmp_path / "run")
    message = str(error.value)
    for file in ("infinity_2b_reg.pth", "infinity_vae_d32reg.pth", "flan-t5-xl", "open_clip_model.safetensors",
                 "vit_base_patch14_dinov2.lvd142m/model.safetensors", "alexnet-owt-7be5be79.pth", "dists_weights.pt",
                 "vgg16-397923af.pth"):
        assert file in message
    assert message.count("\n  ") == 3 + 6  # one line per missing file: the model's three, the metrics' six
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_a_missing_tiny_checkpoint_is_named_file_by_file(tmp_path: Path):
    with pytest.raises(UserError) as error:
        run_probe(probe_config(f"model.checkpoint_dir={tmp_path}"), tmp_path / "run")
    for key, file in TINY_FILES.items():
        assert f"model.files.{key}: {tmp_path / file}" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["metrics.names=[ssim,gmsd]"], "no semantic metric"),
        (["prompts=list", "prompts.texts=[a red cube]"], "no semantic metric"),  # shapes_eval fits no such prompt
        (["metrics.names=[ssim,sharpness]"], "unknown metric.*valid: clip_image"),
        (["stages.ranks.energy=0.8"], r"stages.ranks.energy=0.8 must be one of probe.rank_energies"),
        (["stages.ranks.aggregate=median"], "stages.ranks.aggregate='median' is unknown"),
        (["probe.num_prompts=0"], "probe.num_prompts=0"),
        (["stages.rule.semantic_tolerance=2"], "stages.rule.semantic_tolerance=2"),
        (["probe.source=truth"], "probe.source='truth': use one of model, ground_truth"),
        (["probe.source=ground_truth", "probe.evidence=visible", "prompts=list", "prompts.texts=[a red cube]"],
         "needs prompts=shapes_eval"),
        (["probe.source=ground_truth"], "probe.source=ground_truth takes every scale's bits.*probe.evidence=visible"),
        (["probe.evidence=seen"], "probe.evidence='seen': use one of visible, decided, both"),
        (["probe.continuations=0"], "probe.continuations=0 must be a positive whole number"),
    ],
)
def test_bad_settings_are_reported_before_any_compute(tmp_path: Path, overrides: list[str], message: str):
    with pytest.raises(UserError, match=message):
        run_probe(probe_config(*overrides), tmp_path)
