"""The shapes world has the paper's three stages on its own ground truth (experiment=stage_probe
probe.source=ground_truth on the committed model's VAE), with at least the last two scales refinement.

The gate of the default world: semantic_end < structure_end < refinement_start <= K - 2, and the partial image
at the first refinement scale already passes ShapesEval almost always. It reads only the VAE and the world, so
it holds whatever the transformer has learnt.
"""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments import stage_probe
from experiments.recorder import RunRecorder

REPO = Path(__file__).resolve().parents[1]
WORLD_MODEL = "tiny_stages"  # the committed model whose VAE and schedule define the world


@pytest.fixture(scope="module")
def ground_truth_stages(tmp_path_factory: pytest.TempPathFactory) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", [
            "experiment=stage_probe", "logger=none", "device=cpu", "probe.source=ground_truth",
            "probe.evidence=visible",  # the world's bits: there is no run of the model's to fork
            f"model={WORLD_MODEL}", "probe.num_prompts=32", "probe.strip_prompts=0",
            "model.sampling.cfg=1",  # the bits are the ground truth's: a second CFG branch would change nothing
        ])
    run_dir = tmp_path_factory.mktemp("ground_truth_probe")
    with RunRecorder(cfg, run_dir) as recorder:
        recorder.finish(stage_probe.run(cfg, recorder))
    return json.loads((run_dir / "stages.json").read_text())


def test_the_world_has_three_stages_and_a_refinement_stage_of_at_least_two_scales(ground_truth_stages):
    stages = ground_truth_stages
    num_scales = len(stages["schedule"])
    assert stages["source"] == "ground_truth"
    assert stages["semantic_end"] < stages["structure_end"] < stages["refinement_start"] <= num_scales - 2, stages


def test_the_first_refinement_scale_already_shows_what_shapes_eval_reads(ground_truth_stages):
    stages = ground_truth_stages
    assert stages["curves"]["shapes_eval"][stages["refinement_start"]] >= 0.95
