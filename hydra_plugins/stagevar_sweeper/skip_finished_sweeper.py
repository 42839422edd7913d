"""A sweeper that launches only the jobs whose folder has no complete summary.json (conf/hydra/default.yaml).

A relaunched or extended sweep runs what is missing and leaves a finished job's folder exactly as it was: Hydra
would otherwise rewrite its .hydra/ and run.log before the job could tell it had finished. A job folder is named
by its overrides alone, so the same overrides find the same folder whatever the other jobs are; whatever launcher
runs the jobs (basic, submitit_local, submitit_slurm) gets only the unfinished ones.

The sweep folder itself is named by the command's overrides (`hydra.sweeper.folder`, in conf/hydra/default.yaml's
`hydra.sweep.dir`), not by its start time, so the same command launched again finds it; a sweep extended with more
values is another command, so it needs a folder named by the user (hydra.sweep.dir=..., or rank_sweep.name=...).
"""

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from omegaconf import read_write
from omegaconf.errors import MissingMandatoryValue

log = logging.getLogger(__name__)

LONGEST_FOLDER_NAME = 120  # of 255 bytes a file system allows; job folders below add their own
UNSAFE_IN_A_FILE_NAME = re.compile(r"[^A-Za-z0-9._,=+-]")


@dataclass
class SkipFinishedSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.stagevar_sweeper.skip_finished_sweeper.SkipFinishedSweeper"
    folder: Optional[str] = None  # the sweep folder's name; None: named by the command's overrides


ConfigStore.instance().store(group="hydra/sweeper", name="skip_finished", node=SkipFinishedSweeperConf,
                             provider="stagevar")


class SkipFinishedSweeper(BasicSweeper):
    """BasicSweeper's jobs, less those that finished in an earlier launch."""

    _unfinished: list[list[str]]

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict[str, str]] = None,
                 folder: Optional[str] = None):
        super().__init__(max_batch_size, params)
        self.folder = folder

    def sweep(self, arguments: list[str]) -> Any:
        if self.folder is None:
            self.folder = sweep_folder_name(arguments, self.config.task)
            # Each job's config is composed anew from the Hydra overrides and its own (load_sweep_config), which
            # no longer tell what the whole command swept: the name goes to them as a Hydra override.
            with read_write(self.config):
                self.config.hydra.sweeper.folder = self.folder
                self.config.hydra.overrides.hydra.append(f"hydra.sweeper.folder='{self.folder}'")
        return super().sweep(arguments)

    def is_done(self) -> bool:
        # A batch whose jobs all finished before is passed over (a launcher cannot launch nothing).
        while not super().is_done():
            self._unfinished = [list(job) for job in self.overrides[self.batch_index] if not self._finished(job)]
            if self._unfinished:
                return False
            self.batch_index += 1
        return True

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        super().get_job_batch()  # moves on to the next batch
        return self._unfinished

    def _finished(self, overrides: Sequence[str]) -> bool:
        from experiments.recorder import is_complete  # here: plugin discovery at every start stays light

        job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        try:
            folder = Path(job_config.hydra.sweep.dir) / str(job_config.hydra.sweep.subdir)
        except MissingMandatoryValue:  # a subdir named by the job's number: a relaunch cannot find it again
            return False
        if is_complete(folder):
            log.info("finished before, left as it is: %s", folder)
            return True
        return False


def sweep_folder_name(arguments: Sequence[str], task: str) -> str:
    """The folder name of a sweep launched with these command-line overrides, in <output_root>/<task>/multirun/:
    readable, the same for the same overrides in any order, safe in a file name. What the path already says is left
    out (the output root, an experiment named as its task; train_tiny_gpu, of task train_tiny, stays). Where
    characters had to be replaced or the name is long, it ends in a short hash of the overrides, so that two
    different sweeps never share a folder."""
    def named_by_the_path(argument: str) -> bool:
        key, _, value = argument.lstrip("+~").partition("=")
        return key == "paths.output_root" or (key == "experiment" and value == task)

    overrides = sorted(argument for argument in arguments if not named_by_the_path(argument))
    text = "__".join(overrides)
    name = UNSAFE_IN_A_FILE_NAME.sub("_", text)
    if name != text or len(name) > LONGEST_FOLDER_NAME:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        name = f"{name[:LONGEST_FOLDER_NAME - len(digest) - 1]}-{digest}"
    return name or "no_overrides"
