"""train_tiny: smoke runs of both phases (CPU preset and GPU preset), export, loading, resuming, starting from an
exported model, time caps, the loss weights."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from accel.sampler import SamplingConfig, generate
from errors import UserError
from evals.shapes_world import render
from experiments import train_tiny
from experiments.recorder import RunRecorder
from models.pipeline import load_tiny, tiny_from_config

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


def small_run_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", ["experiment=train_tiny", *SMALL_ARCH, *overrides])


def train(run_dir: Path, export_dir: Path, steps: int, *extra: str) -> dict:
    cfg = small_run_config(f"train.vae.steps={steps}", f"train.transformer.steps={steps}",
                           f"train.export_dir={export_dir}", *extra)
    train_tiny.check(cfg)  # as run.py does before any run
    with RunRecorder(cfg, run_dir) as recorder:
        summary = train_tiny.run(cfg, recorder)
        recorder.finish(summary)
    return summary


def test_two_step_training_exports_a_loadable_model(tmp_path):
    summary = train(tmp_path / "run", tmp_path / "tiny", steps=2)
    assert summary["steps"] == {"vae": 2, "transformer": 2}
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in rows] == [("vae", 1), ("vae", 2), ("transformer", 1), ("transformer", 2)]
    # Each transformer row says which prefix its step trained on (the curriculum: 2 scales, then all 4).
    assert [r.get("scales") for r in rows] == [None, None, 2, 4]
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


@pytest.fixture(scope="module")
def one_step(tmp_path_factory) -> Path:
    """A 1-step run (its folder `run`) and its exported model (`tiny`), for the runs that start from it."""
    root = tmp_path_factory.mktemp("one_step")
    train(root / "run", root / "tiny", steps=1)
    return root


def test_a_run_from_an_exported_model_keeps_its_vae_and_trains_its_transformer_on(one_step, tmp_path):
    lr, warmup = 1e-3, 10
    summary = train(tmp_path / "run", tmp_path / "tiny", 1, f"train.init_from={one_step / 'tiny'}",
                    "train.vae.steps=0", f"train.transformer.lr={lr}", f"train.transformer.warmup={warmup}")
    assert summary["steps"] == {"vae": 0, "transformer": 1} and summary["init_from"] == str(one_step / "tiny")
    assert "overall" in summary["vae_reconstruction_shapes_eval"]  # scored for the kept VAE
    figures = {path.name for path in (tmp_path / "run" / "figures").iterdir()}
    assert "samples_transformer.png" in figures and "samples_vae.png" not in figures

    def weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
        return safetensors.torch.load_file(folder / f"{part}.safetensors")

    before = {part: weights(one_step / "tiny", part) for part in ("transformer", "vae", "text_encoder")}
    after = {part: weights(tmp_path / "tiny", part) for part in before}
    assert all(torch.equal(after["vae"][name], tensor) for name, tensor in before["vae"].items())
    # Adam's first step moves each weight by at most its learning rate (here lr / warmup; weight decay adds
    # lr * 0.01 * |w|): every weight is within that of the folder's, not of a fresh initialisation.
    moves = [(after[part][name] - tensor).abs().max().item()
             for part in ("transformer", "text_encoder") for name, tensor in before[part].items()]
    assert 0 < max(moves) <= 1.1 * lr / warmup

    training = json.loads((tmp_path / "tiny" / "config.json").read_text())["training"]
    assert training["init_from"] == str(one_step / "tiny")
    assert training["previous"] == json.loads((one_step / "tiny" / "config.json").read_text())["training"]
    # Resuming this run keeps its VAE too: its state knows where its weights started.
    with pytest.raises(UserError, match="pass train.vae.steps=0"):
        train_tiny.check(small_run_config(f"train.resume={tmp_path / 'run'}", "train.vae.steps=1"))
    train_tiny.check(small_run_config(f"train.resume={tmp_path / 'run'}", "train.vae.steps=0"))


@pytest.mark.parametrize(
    ("override", "named"),
    [("train.arch.schedule=[1,2,4,6]", "schedule is [1, 2, 4, 8] in"),
     ("train.arch.vae.base_ch=16", "vae.base_ch is 8 in")],
)
def test_init_from_a_model_of_another_architecture_is_refused_before_training(one_step, override, named):
    cfg = small_run_config(f"train.init_from={one_step / 'tiny'}", "train.vae.steps=0", override)
    with pytest.raises(UserError, match="set train.arch to the folder's config") as error:
        train_tiny.check(cfg)
    assert named in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.vae.steps=1"], "training its VAE again would change the bits its transformer predicts"),
        (["train.vae.steps=0", "train.resume={run}"], "train.init_from and train.resume together"),
        (["train.vae.steps=0", "train.init_from=/no/such/model"], "is not an exported tiny model"),
    ],
)
def test_init_from_refuses_vae_training_resuming_and_a_folder_without_a_model(one_step, overrides, message):
    overrides = [f"train.init_from={one_step / 'tiny'}", *(o.format(run=one_step / "run") for o in overrides)]
    with pytest.raises(UserError, match=message):
        train_tiny.check(small_run_config(*overrides))


def test_only_a_run_from_an_exported_model_may_skip_the_vae_phase():
    with pytest.raises(UserError, match="train.vae.steps=0 keeps the VAE of train.init_from"):
        train_tiny.check(small_run_config("train.vae.steps=0"))


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


def test_the_gpu_preset_runs_on_the_cpu_with_worker_processes_and_exports_fp16(tmp_path):
    """A smoke run of experiment=train_tiny_gpu (scripts/gpu_train.sh's training) with its worker processes,
    bf16 autocast and fp16 export; loading casts the weights back to fp32."""
    overrides = [f"train.export_dir={tmp_path / 'tiny'}", "train.vae.steps=1", "train.transformer.steps=1",
                 "device=cpu", "train.threads=1", "train.data_workers=1", "train.transformer.autocast=bf16"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", ["experiment=train_tiny_gpu", *SMALL_ARCH, *overrides])
    assert cfg.train.export_dtype == "float16"
    with RunRecorder(cfg, tmp_path / "run") as recorder:
        summary = train_tiny.run(cfg, recorder)
    assert summary["steps"] == {"vae": 1, "transformer": 1}
    stored = safetensors.torch.load_file(tmp_path / "tiny" / "transformer.safetensors")
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    model = load_tiny("tiny", torch.device("cpu"), str(tmp_path / "tiny"))
    assert next(model.transformer.parameters()).dtype == torch.float32
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["training"]["device"] == "cpu"


def test_the_gpu_preset_draws_the_images_of_the_cpu_preset():
    """train_tiny_gpu inherits train_tiny's schedule, so its own VAE must have the same stride."""
    models = {}
    for experiment in ("train_tiny", "train_tiny_gpu"):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", [f"experiment={experiment}"])
        train_tiny.check(cfg)
        models[experiment] = tiny_from_config(train_tiny.arch_config(cfg.train), experiment, torch.device("cpu"))
    assert models["train_tiny_gpu"].schedule == models["train_tiny"].schedule
    assert models["train_tiny_gpu"].image_size == models["train_tiny"].image_size == (64, 64)


def test_worker_processes_draw_the_same_batches_as_the_training_process():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", ["experiment=train_tiny", *SMALL_ARCH, "train.vae.steps=5"])
    in_process = list(train_tiny.world_batches("vae", cfg, first_step=2, pin_memory=False))
    cfg.train.data_workers = 2
    from_workers = list(train_tiny.world_batches("vae", cfg, first_step=2, pin_memory=False))
    assert len(in_process) == len(from_workers) == 3  # steps 2, 3, 4: a resumed run continues the data stream
    for (images, captions), (worker_images, worker_captions) in zip(in_process, from_workers):
        assert torch.equal(images, worker_images) and captions == worker_captions


def test_a_phase_stops_at_its_time_cap_and_the_run_still_exports(tmp_path):
    summary = train(tmp_path / "run", tmp_path / "tiny", 50, "train.transformer.max_minutes=1e-6")
    assert summary["steps"] == {"vae": 50, "transformer": 1}
    assert (tmp_path / "tiny" / "transformer.safetensors").exists()


def test_the_learning_rate_decays_with_progress_whether_steps_or_time():
    phase_cfg = OmegaConf.create({"lr": 1.0, "warmup": 10, "steps": 100, "min_lr_ratio": 0.05})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    rates = {}
    for step, progress in [(0, 0.0), (9, 0.09), (10, 0.1), (20, 0.55), (20, 1.0)]:
        train_tiny.set_learning_rate(optimizer, phase_cfg, step, progress)
        rates[step, progress] = optimizer.param_groups[0]["lr"]
    assert rates[0, 0.0] == pytest.approx(0.1) and rates[9, 0.09] == pytest.approx(1.0)  # linear warm-up
    assert rates[10, 0.1] == pytest.approx(1.0)
    assert rates[20, 0.55] == pytest.approx(0.525)  # half-way through the decay: the mean of peak and floor
    assert rates[20, 1.0] == pytest.approx(0.05)  # out of time at step 20: decayed all the way


def test_tokens_on_and_around_objects_weigh_more():
    metadata = {"tag": "single_object", "include": [{"class": "square", "count": 1}], "prompt": "a photo of a square"}
    image = torch.from_numpy(render(metadata, np.random.default_rng(0))).permute(2, 0, 1)[None].float() / 127.5 - 1
    schedule = [(1, 1), (4, 4), (16, 16)]
    weights = train_tiny.object_token_weights(image, schedule, object_weight=4.0)
    assert weights.shape == (1, 1 + 16 + 256) and set(weights.unique().tolist()) == {1.0, 4.0}
    assert weights[0, 0] == 4.0  # the 1x1 scale's one token covers the object
    finest = weights[0, 17:].view(16, 16)
    mask = train_tiny.object_mask(image)[0, 0]  # (64, 64): the object and a 2-pixel band
    cells_with_object = F.max_pool2d(mask[None, None], 4)[0, 0].bool()
    assert torch.equal(finest == 4.0, cells_with_object)
    assert 0 < cells_with_object.float().mean() < 0.5
