"""The forced-prefix probe: from plain generation (nothing forced) to the VAE's reconstruction of the ground truth
(everything forced), and experiment=prefix_probe through run.py."""

import json

import numpy as np
import torch

from accel.sampler import SamplingConfig, generate, to_uint8
from evals.shapes_world import make_suite
from experiments.prefix_probe import prefix_images, world_renders

from helpers import CONFIG_64PX, quick_overrides, read_rows, run_py, small_model, write_small_checkpoint


def test_no_prefix_is_plain_generation_and_a_full_prefix_is_the_vae_reconstruction():
    model = small_model(CONFIG_64PX)
    prompts = make_suite()[::60][:4]
    sampling = SamplingConfig(cfg=3.0, tau=1.0)
    images = prefix_images(model, prompts, sampling, seed=5, batch_size=2)
    assert len(images) == len(model.schedule) + 1 and all(len(forced) == 4 for forced in images)

    texts = [item["prompt"] for item in prompts]
    plain = torch.cat([generate(model, texts[:2], sampling, seed=5).images, generate(model, texts[2:], sampling, seed=6).images])
    assert np.array_equal(np.stack(images[0]), plain.numpy())
    with torch.no_grad():
        truth = world_renders(prompts, model, seed=5)
        reconstruction = to_uint8(model.vae.decode(model.vae.quantize(model.vae.encode(truth), model.schedule)[0]))
    # The same bits, summed in another order: a float rounding may move a pixel by one level.
    assert np.abs(np.stack(images[-1]).astype(int) - reconstruction.numpy()).max() <= 1
    assert not np.array_equal(images[0][0], images[-1][0])


def test_the_experiment_writes_one_row_per_prefix_length(tmp_path):
    checkpoint = write_small_checkpoint(tmp_path / "ckpt")
    run_dir = tmp_path / "run"
    run_py("experiment=prefix_probe", "prefix_probe.num_prompts=4", f"hydra.run.dir={run_dir}",
           *quick_overrides(checkpoint, tmp_path / "outputs"))
    rows = read_rows(run_dir)
    assert [row["forced_scales"] for row in rows] == [0, 1, 2, 3, 4]  # the checkpoint has 4 scales
    assert [row["through_grid"] for row in rows] == ["none", "1x1", "2x2", "4x4", "8x8"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["overall_by_forced_scales"] == [row["overall"] for row in rows]
    assert (run_dir / "figures" / "prefix_curve.png").exists()
