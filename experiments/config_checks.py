"""Config checks: every value a user can set is checked right after Hydra composes the config, before W&B starts,
before any model is built and, for a single run, before its run folder exists.

`CheckConfig` is a Hydra callback (registered in conf/hydra/default.yaml):
- a single run is checked in `on_run_start`, before Hydra makes the run folder;
- a sweep (-m) checks its output root and launcher in `on_multirun_start` and each job in `on_job_start`; a job
  that fails its check has its fresh folder removed, so no half-written run folder is left behind.
A failed check prints one paragraph (`error: <key>=<value> ...: what is valid, what to do`) and exits with 2.
Under several processes (torchrun) every process checks, and rank 0 prints the first failure, once.
A run that continues a folder (resume=<run folder>, a relaunched sweep job) must have the settings it was started
with: `check_continued_folder`.

The checks every run shares are here; an experiment module adds its own keys with `check(cfg)`, using the helpers
below (check_model, check_prompts, ...), so each key is checked where it is used.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import io
import math
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from errors import UserError
from experiments.distributed import Failure, RankFailed, launched_processes

WANDB_MODES = ("offline", "online", "disabled")
WANDB_PROBE_SECONDS = 5  # each of: connecting to the W&B server, its first answer
CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
HYDRA_FILES = {".hydra", "run.log"}  # what Hydra writes into a job folder before the job runs


class CheckConfig(Callback):
    """Runs `check_run` where Hydra lets it: before the run folder of a single run, per job in a sweep."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(check_run, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(check_sweep, config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return  # a single run was checked before its folder existed
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        _exit_on_error(lambda cfg: check_run(cfg, job_dir), config, remove_if_fresh=job_dir)


def _exit_on_error(check: Callable[[DictConfig], None], cfg: DictConfig, remove_if_fresh: Path | None = None) -> None:
    processes = launched_processes()
    failure = None
    try:
        check(cfg)
    except UserError as error:
        failure = Failure.of(error, processes.rank)
    try:
        processes.sync(failure)  # every process has checked; all stop when one failed
    except RankFailed as failed:
        failure = failed.failure
    if failure is None:
        return
    if processes.is_main:
        if remove_if_fresh is not None and {path.name for path in remove_if_fresh.iterdir()} <= HYDRA_FILES:
            shutil.rmtree(remove_if_fresh)
        print(failure.report, file=sys.stderr)
    processes.reported()
    sys.exit(2)


def check_run(cfg: DictConfig, job_dir: Path | None = None) -> None:
    """Every check of one run (a sweep's job in `job_dir`): the shared keys, the folder it continues, then the
    experiment's own `check(cfg)` where it has one."""
    check_value_kinds(cfg)
    check_output_root(cfg)
    check_seed(cfg)
    check_device(cfg)
    check_logger(cfg)
    experiment = experiment_module(cfg.task)
    if cfg.resume is not None:
        check_continued_folder(cfg, Path(cfg.resume), f"resume={cfg.resume}")
    elif job_dir is not None and (job_dir / "config.yaml").is_file() and getattr(experiment, "RESUMABLE", False):
        check_continued_folder(cfg, job_dir, f"the sweep job folder {job_dir}")
    if hasattr(experiment, "check"):
        experiment.check(cfg)


def check_sweep(cfg: DictConfig) -> None:
    """What a sweep (-m) needs before any job: a folder to write, a launcher that can start jobs here."""
    check_output_root(cfg)
    if cfg.resume is not None:
        raise UserError(f"resume={cfg.resume} continues one run, not a sweep: a sweep continues when you launch the "
                        "same command again (it runs only the jobs without a complete summary.json)")
    launcher = cfg.hydra.launcher
    if launcher._target_.endswith(".SlurmLauncher") and shutil.which("sbatch") is None:
        raise UserError(
            "hydra/launcher=slurm (submitit_slurm) submits the jobs with SLURM's sbatch, which is not on this "
            "machine's PATH; nothing was submitted: launch the sweep from the cluster's login node, or use "
            "hydra/launcher=local (the jobs as processes on this machine)"
        )


def experiment_module(task: str) -> ModuleType:
    """experiments/<task>.py, or an error naming the task."""
    try:
        return importlib.import_module(f"experiments.{task}")
    except ModuleNotFoundError as missing:
        if missing.name != f"experiments.{task}":
            raise
        raise UserError(f"task={task!r} has no module experiments/{task}.py") from None


# ----------------------------------------------------------------------------------------------------------
# A folder that a run continues

SETTINGS_THAT_MAY_CHANGE = ("resume", "logger", "paths", "device")  # where results go and how they are logged;
# the device's kind is compared on its own (cuda:1 is no change), the weight files through the keys that name them


def check_continued_folder(cfg: DictConfig, folder: Path, what: str) -> None:
    """A run continues `folder` only as the experiment that can, with the settings the folder's run had."""
    experiment = experiment_module(cfg.task)
    if not getattr(experiment, "RESUMABLE", False):
        raise UserError(f"{what}: {cfg.task} cannot continue a run; start it anew (resume= is for generate, "
                        "accel_eval and accel_compare)")
    saved_path = folder / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"{what} is not a run folder (it has no config.yaml): pass the folder of an interrupted run, "
                        f"e.g. {cfg.paths.output_root}/{cfg.task}/<its time>")
    saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    if saved.get("task") != cfg.task:
        raise UserError(f"{what} holds a {saved.get('task')} run, not {cfg.task}: run experiment={saved.get('task')} "
                        "to continue it, or start a new run")
    current = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    current.paths.weights_dir = to_absolute_path(cfg.paths.weights_dir)  # as run.py settles it before saving
    current = OmegaConf.to_container(current, resolve=True)
    choices = _group_choices(cfg)
    presets = dict(_leaves(preset_values(choices))) if choices else {}
    changed = [
        f"{key}={before!r} there, {after!r} now"
        for key, before, after in config_differences(saved, current)
        if key.split(".")[0] not in SETTINGS_THAT_MAY_CHANGE
        and not (before is ABSENT and presets.get(key, ABSENT) == after)  # a key added since, at its preset value
    ]
    import torch  # here, not at the top: see check_device

    kind = cfg.device.split(":")[0] if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if str(saved.get("device", "")).split(":")[0] != kind:
        changed.append(f"device={saved.get('device')!r} there, {cfg.device!r} now (other numerics)")
    if changed:
        raise UserError(f"{what} was run with other settings, so its images would not match this run's: "
                        + "; ".join(changed[:5]) + ("; ..." if len(changed) > 5 else "")
                        + f". Continue it with its own settings (in {saved_path}), or start a new run")


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()  # a key one of two configs lacks (e.g. added to the lab after a saved run started)


def config_differences(before: Any, after: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, before, after) of every leaf that differs between two plain configs; ABSENT where one lacks it."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [difference for key in sorted(before.keys() | after.keys(), key=str)
                for difference in config_differences(before.get(key, ABSENT), after.get(key, ABSENT), f"{prefix}{key}.")]
    return [] if before == after else [(prefix.rstrip("."), before, after)]


# ----------------------------------------------------------------------------------------------------------
# Values


def check_value_kinds(cfg: DictConfig) -> None:
    """Before any key's own check: no value is inf or nan, and a key whose preset value is a number holds a number
    (or null). A key that no check of this run reads is refused too: a typo'd value there is still a mistake."""
    choices = _group_choices(cfg)
    presets = dict(_leaves(preset_values(choices))) if choices else {}  # none: a config composed without Hydra's node
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if key.startswith("hydra.") or (isinstance(value, str) and value.startswith("${")):
            continue  # Hydra's own settings; an interpolation takes the kind of what it points at
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value!r}: no setting means inf or nan; give a finite number (null where the key "
                            "allows none)")
        preset = presets.get(key)
        preset_is_number = isinstance(preset, (int, float)) and not isinstance(preset, bool)
        value_is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if preset_is_number and value is not None and not value_is_number:
            raise UserError(f"{key}={value!r} must be a number (the preset's value is {preset!r})")


def _group_choices(cfg: DictConfig) -> tuple[str, ...]:
    """The run's config-group choices (experiment=..., model=...), without Hydra's own groups."""
    choices = cfg.hydra.runtime.choices if "hydra" in cfg else {}
    return tuple(sorted(f"{group}={choice}" for group, choice in choices.items()
                        if choice is not None and not group.startswith("hydra")))


@functools.cache
def preset_values(group_choices: tuple[str, ...]) -> dict:
    """The config these group choices compose to before any key=value of the command line (unresolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # under run.py's @hydra.main, or a test's initialize()
        return OmegaConf.to_container(compose("config", list(group_choices)), resolve=False)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", list(group_choices)), resolve=False)


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain config; list entries as key[i]."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{prefix.rstrip('.')}[{index}].")
    else:
        yield prefix.rstrip("."), node


def whole(key: str, value: Any, minimum: int = 0, why: str = "") -> int:
    """`value` as a whole number >= minimum, or an error naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key}={value!r} must be a whole number >= {minimum}{why}; e.g. {key}={minimum}")
    return value


def number(key: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False,
           why: str = "") -> float:
    """`value` as a finite number in the interval low..high (open ends where said), or an error naming the key.
    inf and nan are refused whatever the bounds: no setting means them (an unbounded key uses null for "none")."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or value < low or value > high or (low_open and value == low) or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise UserError(f"{key}={value!r} must be a finite number in {interval}{why}")
    return float(value)


def flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{key}={value!r} must be true or false")
    return value


def positive_wholes(block: DictConfig, prefix: str, keys: list[str]) -> None:
    """Each of `keys` in `block` is a whole number >= 1 (counts, sizes, columns)."""
    for key in keys:
        whole(f"{prefix}.{key}", block[key], minimum=1)


# ----------------------------------------------------------------------------------------------------------
# The keys every run has


def check_seed(cfg: DictConfig) -> None:
    whole("seed", cfg.seed, minimum=0, why=" (batch b of a run is seeded with seed + b)")


def check_device(cfg: DictConfig) -> None:
    import torch  # here, not at the top: the other checks answer without waiting for torch

    if cfg.device == "auto":
        return
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"device={cfg.device!r} is not a device the lab runs on: use auto, cpu, cuda or cuda:<index>")
    if device.type == "cuda" and device.index is not None and launched_processes().several:
        raise UserError(f"device={cfg.device} under several processes: each takes its own GPU (cuda:<LOCAL_RANK>); "
                        "use device=cuda or device=auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device={cfg.device} but this machine has no usable CUDA GPU (torch.cuda.is_available() is False): "
                "use device=cpu, or device=auto to take a GPU when there is one"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={cfg.device}: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_output_root(cfg: DictConfig) -> None:
    """paths.output_root must be a folder that can hold run folders."""
    writable_folder("paths.output_root", cfg.paths.output_root, "hold run folders", example="outputs")


def writable_folder(key: str, value: str, purpose: str, example: str) -> Path:
    """The folder `key` names, made if missing, after trying to write in it (permissions alone do not tell)."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise UserError(f"{key}={value!r} must name a folder, e.g. {key}={example}")
    root = Path(value)
    if root.exists() and not root.is_dir():
        raise UserError(f"{key}={str(root)!r} is a file, not a folder: point it at a folder, e.g. {key}={example}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        raise UserError(
            f"{key}={str(root)!r} cannot {purpose} ({error.strerror or error}): point it at a folder you can write, "
            f"e.g. {key}={example}"
        ) from None
    return root


def check_logger(cfg: DictConfig) -> None:
    logger = cfg.logger
    if logger.name == "none":
        return
    if logger.name != "wandb":
        raise UserError(f"logger.name={logger.name!r} is unknown: use logger=wandb or logger=none")
    if logger.mode not in WANDB_MODES:
        raise UserError(f"logger.mode={logger.mode!r} is unknown: use one of {', '.join(WANDB_MODES)}")
    flag("logger.verbose", logger.get("verbose", False))
    if logger.mode == "online":
        check_wandb_online()


def check_wandb_online() -> None:
    """Online W&B needs a key and a server that answers: find out now, in at most 2 x WANDB_PROBE_SECONDS, not
    after the run's first 90 s (wandb.init waits that long on a server that takes the connection but never answers)."""
    import wandb

    offline = "or use logger.mode=offline and upload later with `wandb sync <run folder>/wandb/offline-run-*`"
    server = urlparse(wandb.setup().settings.base_url)  # WANDB_BASE_URL, or W&B's own
    print(f"W&B: checking that {server.geturl()} answers (at most {2 * WANDB_PROBE_SECONDS} s)", flush=True)
    try:
        socket.create_connection((server.hostname, server.port or 443), timeout=WANDB_PROBE_SECONDS).close()
    except OSError as error:
        raise UserError(f"logger.mode=online cannot reach the W&B server {server.geturl()} ({error}): check the "
                        f"network, {offline}") from None
    with contextlib.redirect_stderr(io.StringIO()):  # its "key loaded" chatter; the check answers for itself
        has_key = wandb.login(prompt=False, verify=False)
    if not has_key:
        raise UserError(f"logger.mode=online needs a W&B API key: run `wandb login` or set WANDB_API_KEY, {offline}")
    try:
        urllib.request.urlopen(server.geturl(), timeout=WANDB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        pass  # an HTTP status is an answer
    except OSError as error:
        reason = getattr(error, "reason", error)
        what = (f"took the connection but did not answer within {WANDB_PROBE_SECONDS} s"
                if isinstance(reason, TimeoutError) else f"did not answer ({reason})")
        raise UserError(f"logger.mode=online: the W&B server {server.geturl()} {what}: check the server, {offline}") from None


# ----------------------------------------------------------------------------------------------------------
# Keys that many experiments share: their `check(cfg)` calls these


def check_model(cfg: DictConfig) -> None:
    """Batch size, sampling settings, the model's own keys and its weight files (present, and their headers'
    tensor names and shapes the model's: a bad file fails here, not after the run folder and W&B started)."""
    from models.pipeline import check_model_weights, missing_model_files, schedule_and_transformer

    model = cfg.model
    whole("model.batch_size", model.batch_size, minimum=1, why=" (images generated at once)")
    sampling = model.sampling
    # Bounds that keep the guided, tempered logits finite in fp32 and bf16 (logits * cfg / tau), far beyond any
    # setting in use (cfg 1-5, tau 0.1-1); greedy sampling is top_k=1, not a vanishing tau.
    number("model.sampling.cfg", sampling.cfg, 0, 100, why=" (1 = no guidance; the official scripts use 3)")
    number("model.sampling.tau", sampling.tau, 1e-3, 100,
           why=" (the logits are multiplied by 1/tau; small = sharper; for greedy sampling use top_k=1)")
    whole("model.sampling.top_k", sampling.top_k, minimum=0, why=" (0 = off)")
    number("model.sampling.top_p", sampling.top_p, 0, 1, why=" (0 = off)")
    flag("model.sampling.cfg_ramp", sampling.get("cfg_ramp", False))
    if missing := missing_model_files(model):
        raise UserError(
            "missing model weights; nothing was computed:\n  " + "\n  ".join(missing)
            + "\nPoint paths.weights_dir (or model.checkpoint_dir for the tiny model) or model.files.<key> at them."
        )
    schedule_and_transformer(model)  # checks the resolution, aspect ratio and architecture keys
    check_model_weights(model)


def check_prompts(cfg: DictConfig) -> list[dict]:
    """The run's prompts (evals/prompts.py reads and checks them; an empty list is an error there)."""
    from evals.prompts import load_prompts

    whole("prompts.samples_per_prompt", cfg.prompts.samples_per_prompt, minimum=1, why=" (images per prompt)")
    return load_prompts(cfg.prompts)


# ----------------------------------------------------------------------------------------------------------
# Mistyped keys


def unknown_key_hints(arguments: list[str], config_dir: Path) -> list[str]:
    """For each `key=value` override of the command line `arguments` whose key is not in the composed config, a
    line with the closest keys.

    Hydra refuses such an override before any of our code runs ("Key ... is not in struct") and suggests adding it
    with `+`, which is rarely what the user meant; experiments/hydra_errors.py says these lines instead.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    overrides = []
    for argument in arguments:
        with contextlib.suppress(HydraException):  # not an override: a flag such as -m, or a flag's value
            overrides.append(parser.parse_override(argument))
    # A group swept over (-m model=a,b) composes with its first choice: a group's options mostly share their keys.
    group_choices = [f"{o.key_or_group}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
                     for o in overrides if (config_dir / o.key_or_group).is_dir()]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose("config", group_choices)
    except HydraException:
        return []  # the group choices themselves are wrong: experiments/hydra_errors.py says which
    known = list(_flat_keys(OmegaConf.to_container(cfg, resolve=False)))
    hints = []
    for override in overrides:
        key = override.key_or_group
        own = (config_dir / key).is_dir() or override.is_add() or override.is_delete() or key in known
        if own or key.startswith("hydra"):  # Hydra's own settings are not in the composed config
            continue
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hints.append(f"{key} is not a config key" + (f"; did you mean {' or '.join(close)}?" if close else
                     "; `python run.py <same groups> --cfg job` lists every key"))
    return hints


def _flat_keys(node: dict, prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat_keys(value, f"{prefix}{key}.")
