"""The one entry point: python run.py experiment=<name> [group=option] [key=value ...]

The experiment preset sets `task`; this runs experiments/<task>.py's `run(cfg, recorder)` inside a
RunRecorder that owns the run folder Hydra made (see conf/hydra/default.yaml).
"""

import os

# Before anything imports huggingface_hub: a missing file should fail at once, not after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from errors import UserError
from experiments.config_checks import experiment_module, unknown_key_hints
from experiments.recorder import RunRecorder

CONFIG_DIR = Path(__file__).resolve().parent / "conf"

# Multirun job folders are named by their overrides (conf/hydra/default.yaml); a path value such as
# prompts.path=outputs/dev.jsonl must not split the name into nested folders.
OmegaConf.register_new_resolver("folder_name", lambda text: text.replace("/", "_"), replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # conf/hydra/default.yaml's callback has checked every value (experiments/config_checks.py) before this runs.
    try:
        run_experiment(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted: what finished is in {HydraConfig.get().runtime.output_dir}", file=sys.stderr)
        sys.exit(130)


def run_experiment(cfg: DictConfig) -> None:
    """Run the experiment named by cfg.task, recording into the run folder Hydra made."""
    # Settled once here, so every experiment and the saved config see what the run really used.
    cfg.paths.weights_dir = to_absolute_path(cfg.paths.weights_dir)
    if cfg.device == "auto":
        import torch  # not at the top: config mistakes are reported without waiting for torch to load

        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    experiment = experiment_module(cfg.task)
    with RunRecorder(cfg, HydraConfig.get().runtime.output_dir) as recorder:
        recorder.finish(experiment.run(cfg, recorder))


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        # Hydra refuses a mistyped key while composing, before any of our code runs, and exits with 1.
        if stop.code == 1 and (hints := unknown_key_hints(sys.argv[1:], CONFIG_DIR)):
            print("\n".join(hints), file=sys.stderr)
            sys.exit(2)
        raise
