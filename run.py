"""The one entry point: python run.py experiment=<name> [group=option] [key=value ...]

The experiment preset sets `task`; this runs experiments/<task>.py's `run(cfg, recorder)` inside a
RunRecorder that owns the run folder Hydra made (see conf/hydra/default.yaml).

Under torchrun (or a submitit job with several tasks) every process runs this file and they share the work
(experiments/distributed.py): rank 0 alone reports errors and interruptions.
"""

import os

# Before anything imports huggingface_hub: a missing file should fail at once, not after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from errors import UserError
from experiments.config_checks import experiment_module
from experiments.distributed import Failure, Processes, RankFailed, launched_processes, run_start_time
from experiments.hydra_errors import command_line_error
from experiments.recorder import RunRecorder, finished_jobs

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
log = logging.getLogger(__name__)

# Multirun job folders are named by their overrides alone (conf/hydra/default.yaml), so that a relaunched sweep finds
# them again; a path value such as prompts.path=outputs/dev.jsonl must not split the name into nested folders.
OmegaConf.register_new_resolver("folder_name", lambda text: text.replace("/", "_") or "no_overrides", replace=True)
# A run's folder: resume=<run folder>, else a new one named by the start time that all its processes share.
OmegaConf.register_new_resolver("start_time", run_start_time, use_cache=True, replace=True)
OmegaConf.register_new_resolver("if_null", lambda value, default: default if value is None else value, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # conf/hydra/default.yaml's callback has checked every value (experiments/config_checks.py) before this runs.
    processes = launched_processes()
    try:
        run_experiment(cfg, processes)
    except KeyboardInterrupt:
        if processes.is_main:  # every process got the Ctrl-C
            print(f"interrupted: {interrupted_message(cfg)}", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if not processes.several and not isinstance(error, UserError):
            raise  # a bug in a one-process run: its traceback, whole (Hydra raises it, see __main__)
        # Rank 0 prints the first failing process's error (its message, or the traceback of a bug), once.
        failure = error.failure if isinstance(error, RankFailed) else Failure.of(error, processes.rank)
        if processes.is_main:
            print(failure.report, file=sys.stderr)
        processes.reported()
        sys.exit(failure.exit_code)


def run_experiment(cfg: DictConfig, processes: Processes) -> None:
    """Run the experiment named by cfg.task, recording into the run folder Hydra made."""
    settle(cfg, processes)
    experiment = experiment_module(cfg.task)
    if processes.several and not getattr(experiment, "SHARDED", False):
        if not processes.is_main:
            return
        log.warning("%s runs on one process: rank 0 runs it alone, the other %d processes have nothing to do",
                    cfg.task, processes.world_size - 1)
        processes = Processes()
    run_dir = HydraConfig.get().runtime.output_dir
    with processes.failures_shared():
        with RunRecorder(cfg, run_dir, processes, resumable=getattr(experiment, "RESUMABLE", False)) as recorder:
            recorder.finish(experiment.run(cfg, recorder))


def settle(cfg: DictConfig, processes: Processes) -> None:
    """Settle the values every experiment and the saved config should see as the run really used them."""
    cfg.paths.weights_dir = to_absolute_path(cfg.paths.weights_dir)
    if cfg.device in ("auto", "cuda"):
        import torch  # not at the top: config mistakes are reported without waiting for torch to load

        if cfg.device == "auto":
            cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.device == "cuda" and processes.several:
            # Each process its own GPU; where SLURM gives each task one GPU, that is cuda:0 of every process.
            cfg.device = f"cuda:{processes.local_rank % torch.cuda.device_count()}"
            torch.cuda.set_device(cfg.device)


def interrupted_message(cfg: DictConfig) -> str:
    """Where what finished is: the run folder (and how to resume it), or the sweep folder and its finished jobs."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        run_dir = hydra_cfg.runtime.output_dir
        resumable = getattr(experiment_module(cfg.task), "RESUMABLE", False)
        return f"what finished is in {run_dir}" + (f"; continue it with resume={run_dir}" if resumable else "")
    sweep_dir = Path(hydra_cfg.sweep.dir)
    finished = [str(path.relative_to(sweep_dir)) for path in finished_jobs(sweep_dir)]
    # The same overrides name the same sweep folder (hydra_plugins/stagevar_sweeper), where finished jobs are skipped.
    return (f"sweep {sweep_dir}: {len(finished)} job(s) finished ({', '.join(finished) or 'none'}); to run the "
            f"others, run the same command again: {shlex.join(['python', *sys.argv])}")


if __name__ == "__main__":
    processes = launched_processes()  # under torchrun: join the other processes before Hydra names the run folder
    # Hydra composes the config before any of our code runs: it raises what it refuses (a mistyped key, an unknown
    # option, an override it cannot read) instead of printing its own text, so that we say it in our words.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except HydraException as error:
        if (mistake := command_line_error(error, sys.argv[1:], CONFIG_DIR)) is None:
            raise
        failure = Failure.of(mistake, processes.rank)
        try:  # every process composed the same command line and met the same mistake
            processes.sync(failure)
        except RankFailed as failed:
            failure = failed.failure
        if processes.is_main:
            print(failure.report, file=sys.stderr)
        processes.reported()  # the others wait for rank 0's paragraph: torchrun would end it with them
        sys.exit(failure.exit_code)
