"""train_tiny: a 2-step smoke run of both phases, export, loading, and resuming an interrupted run."""

import json
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from accel.sampler import SamplingConfig, generate
from experiments import train_tiny
from experiments.recorder import RunRecorder
from models.pipeline import load_tiny

CONF = str(Path(__file__).resolve().parent.parent / "conf")
SMALL_ARCH = [
    "train.arch.schedule=[1,2,4,8]",
    "train.arch.transformer={depth: 2, embed_dim: 32, num_heads: 2, text_channels: 16, text_maxlen: 16,"
    " bits_per_token: 8, block_chunks: 1}",
    "train.arch.vae={codebook_dim: 8, base_ch: 8, ch_mult: [1, 2, 2, 2], encoder_blocks: 1, decoder_blocks: 1,"
    " norm_groups: 4}",
    "train.arch.text_encoder={width: 16, depth: 1, heads: 2, max_length: 16}",
    "train.vae.batch_size=2",
    "train.transformer.curriculum=[{scales: 2, batch_size: 3}, {scales: null, batch_size: 2}]",
    "train.log_every=1",
    "train.checkpoint_every=1",
    "logger=none",
]


def train(run_dir: Path, export_dir: Path, steps: int, *extra: str) -> dict:
    overrides = [f"train.vae.steps={steps}", f"train.transformer.steps={steps}", f"train.export_dir={export_dir}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", ["experiment=train_tiny", *SMALL_ARCH, *overrides, *extra])
    with RunRecorder(cfg, run_dir) as recorder:
        summary = train_tiny.run(cfg, recorder)
        recorder.finish(summary)
    return summary


def test_two_step_training_exports_a_loadable_model(tmp_path):
    summary = train(tmp_path / "run", tmp_path / "tiny", steps=2)
    assert summary["steps"] == {"vae": 2, "transformer": 2}
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in rows] == [("vae", 1), ("vae", 2), ("transformer", 1), ("transformer", 2)]
    assert (tmp_path / "run" / "figures" / "loss_curves.png").exists()

    model = load_tiny("tiny", torch.device("cpu"), str(tmp_path / "tiny"))
    images = generate(model, ["a photo of a red circle"], SamplingConfig(cfg=3.0, tau=1.0), seed=0).images
    assert images.shape == (1, 64, 64, 3)


def test_a_resumed_run_continues_where_the_interrupted_one_stopped(tmp_path):
    train(tmp_path / "first", tmp_path / "tiny", steps=1)
    summary = train(tmp_path / "second", tmp_path / "tiny", 2, f"train.resume={tmp_path / 'first'}")
    assert summary["steps"] == {"vae": 2, "transformer": 2}
    rows = [json.loads(line) for line in (tmp_path / "second" / "results.jsonl").read_text().splitlines()]
    # The first run's rows up to its checkpoint come along, so the loss curves cover the whole training.
    assert [(r["phase"], r["step"]) for r in rows] == [("vae", 1), ("transformer", 1), ("vae", 2), ("transformer", 2)]


def test_self_correction_flips_a_per_sample_fraction_of_the_bits_up_to_the_maximum():
    schedule = [(1, 1), (4, 4), (16, 16)]
    none = train_tiny.self_correction_flips(8, schedule, 16, 0.0, torch.Generator().manual_seed(0))
    assert [f.shape for f in none] == [(8, h, w, 16) for h, w in schedule] and not any(f.any() for f in none)

    flips = train_tiny.self_correction_flips(256, schedule, 16, 0.3, torch.Generator().manual_seed(0))
    per_sample = flips[-1].float().mean(dim=(1, 2, 3))
    assert per_sample.max() <= 0.33 and per_sample.min() < 0.02  # some samples are left clean
    assert 0.12 < per_sample.mean() < 0.18  # p ~ U{0, ..., 0.3}: mean 0.15


def test_sigterm_stops_after_the_current_step_with_the_state_saved(tmp_path, monkeypatch):
    def vae_step_then_sigterm(model, phase_cfg, batch, step, seed):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)  # arrives mid-step, as a scheduler's stop would
        return train_tiny.vae_step(model, phase_cfg, batch, step, seed)

    monkeypatch.setitem(train_tiny.PHASES, "vae", vae_step_then_sigterm)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "first", tmp_path / "tiny", 4, "train.checkpoint_every=100")
    state = torch.load(tmp_path / "first" / train_tiny.STATE_FILE, weights_only=True)["state"]
    assert (state["vae"], state["transformer"]) == (2, 0)
    assert json.loads((tmp_path / "first" / "summary.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run


def test_a_second_sigterm_stops_at_once(tmp_path, monkeypatch):
    def vae_step_then_two_sigterms(model, phase_cfg, batch, step, seed):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            raise AssertionError("the second SIGTERM should have stopped the step")
        return train_tiny.vae_step(model, phase_cfg, batch, step, seed)

    monkeypatch.setitem(train_tiny.PHASES, "vae", vae_step_then_two_sigterms)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "first", tmp_path / "tiny", 4, "train.checkpoint_every=100")
    assert not (tmp_path / "first" / train_tiny.STATE_FILE).exists()  # no checkpoint was due yet
