"""A sweeper that launches only the jobs whose folder has no complete summary.json (conf/hydra/default.yaml).

A relaunched or extended sweep runs what is missing and leaves a finished job's folder exactly as it was: Hydra
would otherwise rewrite its .hydra/ and run.log before the job could tell it had finished. A job folder is named
by its overrides alone, so the same overrides find the same folder whatever the other jobs are; whatever launcher
runs the jobs (basic, submitit_local, submitit_slurm) gets only the unfinished ones.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from omegaconf.errors import MissingMandatoryValue

log = logging.getLogger(__name__)


@dataclass
class SkipFinishedSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.stagevar_sweeper.skip_finished_sweeper.SkipFinishedSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="skip_finished", node=SkipFinishedSweeperConf,
                             provider="stagevar")


class SkipFinishedSweeper(BasicSweeper):
    """BasicSweeper's jobs, less those that finished in an earlier launch."""

    _unfinished: list[list[str]]

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
