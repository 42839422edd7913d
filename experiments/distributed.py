"""The processes of one run: one (`python run.py ...`), or several that join one torch.distributed group, started
by torchrun (`torchrun --nproc_per_node=N run.py ...`, any number of nodes) or by a submitit job with
tasks_per_node > 1 (hydra/launcher=submitit_slurm).

How a run shares its work: an experiment cuts its images into batches in prompt order, batch b seeded with
seed + b whatever the number of processes (experiments/image_batches.py), and rank r of N makes batches r, r + N,
r + 2N, ... Each process writes its own images and rows into the one run folder; at `finish_share` the others
leave and rank 0 merges the rows, scores the whole set and writes the summary, figures, tables and W&B.

Failures: every meeting point (`sync`, `gather`, `finish_share`) also tells whether a process failed. A process
whose code raises tells the others at their next meeting point (`failures_shared`), so all of them stop, and rank
0 alone prints the first failing rank's error, once. The other processes log only errors (their warnings would
repeat rank 0's) and show no progress bars.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from errors import UserError

log = logging.getLogger(__name__)

RUN_FOLDER_TIME = "%Y-%m-%d_%H-%M-%S-%f"  # microseconds keep two runs started in the same second apart
# How long a meeting point waits for the slowest process: rank 0 times the methods alone while the others wait.
MEETING_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Failure:
    """What a failing process tells the others."""

    rank: int
    message: str  # one line, for summary.json
    report: str  # what rank 0 prints: the message of a UserError, the traceback of anything else
    exit_code: int

    @classmethod
    def of(cls, error: Exception, rank: int) -> Failure:
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if isinstance(error, UserError):
            return cls(rank, message, f"error: {f'rank {rank}: ' if rank else ''}{error}", exit_code=2)
        heading = f"rank {rank} failed:\n" if rank else ""
        return cls(rank, message, heading + traceback.format_exc().rstrip(), exit_code=1)


class RankFailed(Exception):
    """Another process of the run failed; rank 0 prints `failure.report`."""

    def __init__(self, failure: Failure):
        super().__init__(f"rank {failure.rank}: {failure.message}")
        self.failure = failure


@dataclass
class Processes:
    """This process's place among the run's processes; the default is a run of one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _sharing: bool = field(default=True, repr=False)  # False once the others have left (finish_share)
    _failure_met: bool = field(default=False, repr=False)  # a meeting point told of a failure

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def share(self, count: int) -> range:
        """This process's share of `count` batches: rank, rank + N, rank + 2N, ..."""
        return range(self.rank, count, self.world_size)

    def warn_if_idle(self, count: int, what: str = "batches") -> None:
        """Say once (rank 0) when some processes get nothing of `count` batches: fine, but worth knowing."""
        if self.is_main and self.world_size > count:
            idle = f"rank {count} has" if count == self.world_size - 1 else f"ranks {count}-{self.world_size - 1} have"
            log.warning("%d processes for %d %s: %s nothing to do", self.world_size, count, what, idle)

    def gather(self, value: Any, failure: Failure | None = None) -> list[Any]:
        """Every process's `value`, in rank order. A meeting point: raises RankFailed when another process failed."""
        if not self.several:
            return [value]
        answers = self._exchange((failure, value))
        failures = [failed for failed, _ in answers if failed is not None]
        self._failure_met = bool(failures)
        if failures and failures[0].rank != self.rank:
            raise RankFailed(failures[0])
        return [answer for _, answer in answers]

    def sync(self, failure: Failure | None = None) -> None:
        """Wait for every process (a meeting point)."""
        self.gather(None, failure)

    def finish_share(self) -> bool:
        """The last meeting point: every process has made its share. True on rank 0, which goes on alone to merge
        and score; the others return."""
        self.sync()
        self._sharing = False
        if self.several and not self.is_main:  # no meeting follows: leave the group now, not at shutdown (_join)
            _leave_process_group()
        return self.is_main

    def reported(self) -> None:
        """After a failure met at a meeting point, every process waits here until rank 0 has printed it: torchrun
        ends the other processes as soon as one exits with an error."""
        if self.several and self._failure_met:
            self._exchange(None)

    def _exchange(self, value: Any) -> list[Any]:
        """Every process's value. Objects travel through the CPU backend (gloo), whatever the device."""
        import torch.distributed as dist

        answers: list[Any] = [None] * self.world_size
        dist.all_gather_object(answers, value)
        return answers

    @contextlib.contextmanager
    def failures_shared(self) -> Iterator[None]:
        """A failure in the block (one run) reaches the other processes at their next meeting point, while they
        still meet."""
        self._sharing = True  # a sweep's next job shares its work again
        try:
            yield
        except RankFailed:
            raise  # the failure came from another process: nothing to tell
        except Exception as error:
            if self.several and self._sharing:
                self.sync(Failure.of(error, self.rank))
            raise


_launched: Processes | None = None
_start_time: str | None = None


def launched_processes() -> Processes:
    """The processes of this run; several join one torch.distributed group on the first call."""
    global _launched, _start_time
    if _launched is None:
        _launched = _join()
        if _launched.several:
            _start_time = _launched.gather(datetime.now().strftime(RUN_FOLDER_TIME))[0]
    return _launched


def run_start_time() -> str:
    """The run folder's time stamp: now, or rank 0's start time under several processes, so that they all write
    into one folder (each process composes its own config; without this the microseconds would differ)."""
    return _start_time or datetime.now().strftime(RUN_FOLDER_TIME)


def _join() -> Processes:
    if os.environ.get("SUBMITIT_EXECUTOR") and "WORLD_SIZE" not in os.environ:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            # A submitit job with several tasks (one per GPU): submitit knows the ranks, torch.distributed reads them
            # from the environment as under torchrun. Every GPU stays visible: a process takes cuda:<LOCAL_RANK>.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Processes()
    import torch
    import torch.distributed as dist

    # Meeting points exchange small Python objects, on the CPU (gloo); CUDA tensors would go through NCCL.
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=MEETING_TIMEOUT)
    # Left to interpreter shutdown, the group's threads can outlive it and abort the process ("terminate called
    # without an active exception"): a process that has made its share and leaves would fail the run.
    atexit.register(_leave_process_group)
    processes = Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if not processes.is_main:
        logging.disable(logging.WARNING)
    return processes


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
