"""The stage probe on the committed tiny model: what the issue asks of its result.

The boundaries must follow the rule on the curves the run measured (no scale is hard-coded here), semantics
must settle no later than structure, and the rank fraction must fall over the last scales.
"""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from analysis.rows import rank_key, scale_means
from analysis.stages import settling_scale
from experiments import stage_probe
from experiments.recorder import RunRecorder

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (REPO / "checkpoints" / "tiny" / "config.json").exists(), reason="checkpoints/tiny is not trained yet"
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    """stages.json and the rows of a probe of 8 shapes-suite prompts with the default (offline) metrics."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", ["experiment=stage_probe", "logger=none", "device=cpu", "probe.num_prompts=8",
                                 "probe.batch_size=8", "probe.strip_prompts=0", "probe.evidence=visible"])
    run_dir = tmp_path_factory.mktemp("tiny_probe")
    with RunRecorder(cfg, run_dir) as recorder:
        recorder.finish(stage_probe.run(cfg, recorder))
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return json.loads((run_dir / "stages.json").read_text()), rows


def test_the_boundaries_follow_the_rule_on_the_measured_curves(tiny_run):
    stages, _ = tiny_run
    rule, curves = stages["rule"], stages["curves"]
    semantic_end = max(settling_scale(curves[m], rule["semantic_tolerance"]) for m in rule["semantic_metrics"])
    structure_end = max(settling_scale(curves[m], rule["structure_tolerance"]) for m in rule["structural_metrics"])
    assert (stages["semantic_end"], stages["structure_end"]) == (semantic_end, structure_end)
    assert stages["refinement_start"] == max(semantic_end, structure_end) + 1


def test_semantics_settle_no_later_than_structure(tiny_run):
    stages, _ = tiny_run
    assert stages["semantic_end"] <= stages["structure_end"]


def test_the_rank_fraction_falls_over_the_last_scales(tiny_run):
    stages, rows = tiny_run
    num_scales = len(stages["schedule"])
    for source in ("inputs", "block0"):
        fraction = scale_means(rows, rank_key(source, 0.95, fraction=True), num_scales)
        assert fraction[-1] < fraction[-2] < fraction[-3], (source, fraction)
