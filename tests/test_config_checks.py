"""Bad config values stop a run before any compute: exit 2, one `error:` paragraph naming the key, no traceback,
and no run folder (experiments/config_checks.py). Runs in this process through run.main(), as tests/helpers.run_py."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb

from experiments import config_checks
from helpers import run_py, write_small_checkpoint
from models.checkpoint import read_state_dict, save_safetensors

REPO = Path(__file__).resolve().parents[1]

WANDB_KEY = "k" * 40


def refused(capsys: pytest.CaptureFixture, output_root: Path, *overrides: str) -> str:
    """Run with `overrides`; assert it stopped with exit 2 and wrote nothing; return its error message."""
    with pytest.raises(SystemExit) as stop:
        run_py(*overrides, f"paths.output_root={output_root}")
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not [path for path in output_root.rglob("*") if path.is_file()]  # no run folder, nothing half-written
    return err


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["experiment=generate", "prompts=list", "prompts.texts=[]"], "prompts.texts=[]"),
        (["experiment=stage_probe", "prompts=list", "prompts.texts=[]"], "prompts.texts=[]"),
        (["experiment=generate", "seed=abc"], "seed='abc'"),
        (["experiment=generate", "seed=-1"], "seed=-1"),
        (["experiment=generate", "model.batch_size=0"], "model.batch_size=0"),
        (["experiment=stage_probe", "model.batch_size=0"], "model.batch_size=0"),  # not the probe's derived key
        (["experiment=generate", "model.sampling.tau=0"], "model.sampling.tau=0"),
        (["experiment=generate", "model.sampling.cfg=-5"], "model.sampling.cfg=-5"),
        (["experiment=generate", "model.sampling.cfg=inf"], "model.sampling.cfg=inf"),  # crashed mid-sampling
        (["experiment=generate", "model.sampling.cfg=nan"], "model.sampling.cfg=nan"),
        (["experiment=generate", "model.sampling.tau=1e-40"], "model.sampling.tau=1e-40"),  # 1/tau overflows
        (["experiment=train_tiny", "train.vae.max_minutes=inf"], "train.vae.max_minutes=inf"),
        (["experiment=generate", "model.sampling.top_p=2"], "model.sampling.top_p=2"),
        (["experiment=generate", "device=banana"], "device='banana'"),
        (["experiment=generate", "model.files.transformer=/no/such/transformer.safetensors"],
         "model.files.transformer: /no/such/transformer.safetensors"),
        (["experiment=generate", "generate.grid_columns=0"], "generate.grid_columns=0"),
        (["experiment=generate", "paths.cache_dir=null"], "paths.cache_dir=None"),  # crashed in Path(None)
        (["experiment=stage_probe", "probe.continuations=true"], "probe.continuations=True"),
        (["experiment=accel_eval", "accel=stagevar_released", "accel.skip_last=0", "accel.reduce_last=4"],
         "reduce_last <= 3"),  # a KeyError of the presets
        (["experiment=accel_eval", "accel=none"], "accel=none"),
        (["experiment=accel_eval", "accel_eval.repeats=4"], "accel_eval.repeats=4"),
        (["experiment=accel_eval", "accel.rank_ratio=2"], "accel.rank_ratio=2"),
        (["experiment=accel_compare", "accel_compare.warmup=0"], "accel_compare.warmup=0"),
        (["experiment=stage_probe", "stages.ranks.energy=0.5"], "stages.ranks.energy=0.5"),
        (["experiment=accel_eval", "metrics.names=[ssim,no_such_metric]"], "'no_such_metric' in metrics.names"),
        (["experiment=prefix_probe", "prompts=list", "prompts.texts=[a red cube]"], "prompts=shapes_eval"),
        (["experiment=train_tiny", "train.vae.steps=0"], "train.vae.steps=0"),
        (["experiment=train_tiny", "train.resume=/no/such/run"], "train.resume='/no/such/run'"),
        (["experiment=world_preview", "preview.num_images=0"], "preview.num_images=0"),
        (["experiment=device_benchmark", "model=tiny", "device_benchmark.batch_sizes=[1,0]"],
         "device_benchmark.batch_sizes[1]=0"),
    ],
)
def test_a_bad_value_stops_the_run_before_any_compute(capsys, tmp_path: Path, overrides: list[str], named: str):
    assert named in refused(capsys, tmp_path, *overrides, "logger=none")


def test_an_empty_prompts_file_is_refused(capsys, tmp_path: Path):
    empty = tmp_path / "suite.jsonl"
    empty.write_text("")
    output_root = tmp_path / "outputs"
    assert f"prompts.path='{empty}' gives no prompts" in refused(
        capsys, output_root, "experiment=generate", f"prompts.path={empty}", "logger=none"
    )


@pytest.mark.parametrize("damage", ["truncated", "foreign names", "wrong shape"])
def test_a_bad_weight_file_stops_the_run_before_its_folder_and_w_and_b(capsys, tmp_path: Path, damage: str):
    # The default logger (W&B offline): before the headers were checked, each left a failed run folder with W&B in it.
    checkpoint = write_small_checkpoint(tmp_path / "checkpoint")
    path = checkpoint / "transformer.safetensors"
    weights = read_state_dict(path)
    name = sorted(weights)[0]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
        named = "cannot read checkpoint"
    elif damage == "foreign names":
        save_safetensors({f"model.{key}": value for key, value in weights.items()}, path, {})
        named = f"unexpected: model.{name}"
    else:
        save_safetensors({**weights, name: torch.zeros(weights[name].shape[0] + 1, *weights[name].shape[1:])}, path, {})
        named = f"wrong shape: {name}"
    err = refused(capsys, tmp_path / "outputs", "experiment=generate", f"model.checkpoint_dir={checkpoint}")
    assert str(path) in err and "model.files.transformer" in err and named in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(capsys, tmp_path: Path):
    assert "device=cuda but this machine has no usable CUDA GPU" in refused(
        capsys, tmp_path, "experiment=generate", "device=cuda", "logger=none"
    )


@pytest.mark.parametrize("where", ["a file", "under /proc"])
def test_an_output_root_that_cannot_hold_run_folders_is_refused(capsys, tmp_path: Path, where: str):
    output_root = tmp_path / "outputs"
    if where == "a file":
        output_root.write_text("")
    with pytest.raises(SystemExit) as stop:
        run_py("experiment=world_preview", "logger=none",
               f"paths.output_root={output_root if where == 'a file' else '/proc/stagevar_outputs'}")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: paths.output_root=") and "Traceback" not in err


@pytest.fixture
def fresh_wandb(monkeypatch: pytest.MonkeyPatch):
    """W&B as from a user's shell (not disabled as in conftest.py); it reads its key and server once per process,
    so forget them around a test that changes them."""
    monkeypatch.delenv("WANDB_MODE")
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.mark.usefixtures("fresh_wandb")
def test_an_immutable_output_root_is_refused(capsys, tmp_path: Path):
    output_root = tmp_path / "outputs"
    output_root.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(output_root)]).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(SystemExit) as stop:
            run_py("experiment=world_preview", "logger=none", f"paths.output_root={output_root}")
    finally:
        subprocess.run(["chattr", "-i", str(output_root)], check=True)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "cannot hold run folders" in err and not list(output_root.iterdir())


def test_online_wandb_without_a_key_is_refused(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    server = socket.create_server(("127.0.0.1", 0))  # a server that answers, so only the key is missing
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    with server:
        err = refused(capsys, tmp_path / "outputs", "experiment=world_preview", "logger=wandb", "logger.mode=online")
    assert "logger.mode=online needs a W&B API key" in err and "logger.mode=offline" in err


@pytest.mark.usefixtures("fresh_wandb")
def test_online_wandb_without_its_server_is_refused_in_seconds(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    err = refused(capsys, tmp_path / "outputs", "experiment=world_preview", "logger=wandb", "logger.mode=online")
    assert "cannot reach the W&B server http://127.0.0.1:9" in err


@pytest.mark.usefixtures("fresh_wandb")
def test_online_wandb_whose_server_never_answers_is_refused_within_the_probe_bound(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(config_checks, "WANDB_PROBE_SECONDS", 0.5)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    server = socket.create_server(("127.0.0.1", 0))  # takes connections (its backlog), never answers
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    with server:
        err = refused(capsys, tmp_path / "outputs", "experiment=world_preview", "logger=wandb", "logger.mode=online")
    assert "took the connection but did not answer within 0.5 s" in err


def test_a_sweep_job_with_a_bad_value_leaves_no_folder(capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as stop:
        run_py("-m", "experiment=world_preview", "logger=none", "prompts.limit=2", "preview.grid_columns=1",
               "preview.num_images=1,0", f"paths.output_root={tmp_path}")
    assert stop.value.code == 2 and "preview.num_images=0" in capsys.readouterr().err
    jobs = sorted(path.parent.name for path in tmp_path.rglob("summary.json"))
    assert len(jobs) == 1 and "num_images=1" in jobs[0]  # the good job ran; the bad one left nothing
    sweep_dir = next(tmp_path.glob("world_preview/multirun/*"))
    assert [path.name for path in sweep_dir.iterdir() if path.is_dir()] == jobs


def test_a_mistyped_key_gets_the_close_matches(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "run.py", "experiment=world_preview", "preview.num_image=3", f"paths.output_root={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "error: preview.num_image is not a config key; did you mean preview.num_images?" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())
