"""RunRecorder: everything a run leaves behind, in its run folder and (optionally) in W&B.

Run folder layout:
    config.yaml      the resolved config (Hydra's unresolved one stays in .hydra/)
    results.jsonl    one JSON line per log() call, flushed at once, so an interrupted run keeps its rows
    results.rank<r>.jsonl   rows of process r's share of the work (log_partial), until rank 0 merges them into
                     results.jsonl (write_rows); an interrupted run keeps them
    summary.json     written last: "status" is "complete", "failed" or "interrupted"
    figures/<name>.png, images/..., tables/<name>.csv
    wandb/           W&B's offline files when logger=wandb (upload later with `wandb sync`); a failed run's are
                     removed (its summary.json says why it failed; there is nothing to upload)

Under several processes (experiments/distributed.py) every process has a recorder on the one folder: each writes
its share of the images and rows; rank 0 alone writes config.yaml, summary.json, figures, tables and W&B.
A resumable experiment run again in a folder (resume=<run folder>, a relaunched sweep job) finds the rows the
earlier attempt left in `earlier_rows`; any other experiment starts without them.
"""

from __future__ import annotations

import csv
import json
import logging
import numbers
import os
import shutil
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from errors import UserError
from experiments.distributed import Processes

if TYPE_CHECKING:  # imported when W&B starts: logger=none runs without the package (the GPU image lacks it)
    import wandb


log = logging.getLogger(__name__)


class RunRecorder:
    """Owns one run folder; use as `with RunRecorder(cfg, run_dir) as recorder: ...`."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, processes: Processes | None = None,
                 resumable: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.processes = processes or Processes()
        self.resumable = resumable
        self.results_path = self.run_dir / "results.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.partial_rows_path = self.run_dir / f"results.rank{self.processes.rank}.jsonl"
        self.earlier_rows: list[dict] = []  # rows an earlier attempt left in the folder (resumable experiments)
        self._logged_rows: list[dict] = []  # this run's log() rows
        self._wandb_run: wandb.Run | None = None
        self._wandb: ModuleType | None = None  # the wandb package, once W&B has started
        self._offline_wandb_run: Path | None = None  # its folder under wandb/, when W&B runs offline
        self._started_at = 0.0

    def __enter__(self) -> RunRecorder:
        self._started_at = time.time()
        if self.processes.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.processes.is_main:
                self._settle_earlier_rows()
                OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
                self._wandb_run = self._start_wandb()
            self.processes.sync()  # the others read the settled rows
            if self.resumable and self.results_path.is_file():
                self.earlier_rows = read_rows(self.results_path)
        except BaseException as error:  # the folder exists: it says the run failed, as after any later error
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.processes.is_main:
            return
        failed = exc is not None and not isinstance(exc, KeyboardInterrupt)
        if exc is not None:
            error = f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__
            self._write_summary("failed" if failed else "interrupted", {"error": error})
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=0 if exc is None else 1)
            self._wandb_run = None
        if self._offline_wandb_run is None:
            return
        if failed:
            remove_offline_wandb_run(self._offline_wandb_run)
        else:  # complete, or interrupted with its rows so far
            log.info("W&B: upload the offline run with `wandb sync %s`", self._offline_wandb_run)

    def log(self, row: dict[str, Any]) -> None:
        """Append one result row to results.jsonl; its numeric fields also go to W&B."""
        _append_row(self.results_path, row)
        self._logged_rows.append(row)
        self._log_numbers(row)

    def log_partial(self, row: dict[str, Any]) -> None:
        """Append a row of this process's share to results.rank<r>.jsonl; W&B gets it when rank 0 merges."""
        _append_row(self.partial_rows_path, row)

    def partial_rows(self) -> list[dict]:
        """Every process's log_partial rows of this attempt, rank by rank (rank 0, after the others finished)."""
        return [row for path in self._partial_rows_files() for row in read_rows(path)]

    def write_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """results.jsonl becomes this run's log() rows followed by `rows` (every process's rows, merged and in their
        final order; rows an earlier attempt left are not kept); `rows` go to W&B, the row files of the shares go."""
        self._replace_rows([*self._logged_rows, *rows])
        for path in self._partial_rows_files():
            path.unlink()
        for row in rows:
            self._log_numbers(row)

    def _replace_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        partial = self.results_path.with_suffix(".jsonl.tmp")
        partial.write_text("".join(json.dumps(row, default=_plain_json) + "\n" for row in rows))
        os.replace(partial, self.results_path)

    def _log_numbers(self, row: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            numeric = {key: value for key, value in row.items() if isinstance(value, numbers.Number)}
            if numeric:
                self._wandb_run.log(numeric)

    def _partial_rows_files(self) -> list[Path]:
        return sorted(self.run_dir.glob("results.rank*.jsonl"), key=lambda path: int(path.stem.split("rank")[1]))

    def _settle_earlier_rows(self) -> None:
        """An earlier attempt's rows in this folder: gathered into results.jsonl (without the line a kill may have
        cut short) for a resumable experiment, removed for any other, so they never mix with this run's."""
        files = [path for path in (self.results_path, *self._partial_rows_files()) if path.is_file()]
        earlier = [row for path in files for row in read_rows(path)] if self.resumable else []
        for path in files:
            path.unlink()
        if earlier:
            self._replace_rows(earlier)

    def save_figure(self, fig: Figure, name: str) -> Path:
        """Save a matplotlib figure as figures/<name>.png (and to W&B), then close it."""
        path = self._new_path("figures", f"{name}.png")
        fig.savefig(path, dpi=150, bbox_inches="tight")
        plt.close(fig)
        if self._wandb_run is not None:
            self._wandb_run.log({f"figures/{name}": self._wandb.Image(str(path))})
        return path

    def save_images(
        self, images: np.ndarray | Sequence[np.ndarray], names: Sequence[str], subdir: str = "images"
    ) -> list[Path]:
        """Save uint8 RGB images (N,H,W,3 array or a list of H,W,3) as <subdir>/<name>.png (and to W&B)."""
        paths = self.save_partial_images(images, names, subdir)
        if self._wandb_run is not None:
            self._wandb_run.log({subdir: [self._wandb.Image(str(p), caption=p.stem) for p in paths]})
        return paths

    def save_partial_images(
        self, images: np.ndarray | Sequence[np.ndarray], names: Sequence[str], subdir: str = "images"
    ) -> list[Path]:
        """Save images of this process's share as <subdir>/<name>.png, each whole or not at all (a resumed run
        trusts the files it finds); W&B gets the figures drawn from them, not every image."""
        if len(images) != len(names):
            raise ValueError(f"save_images got {len(images)} images but {len(names)} names")
        paths = []
        for image, name in zip(images, names):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(
                    f"save_images needs uint8 (H,W,3) images; {name!r} is {image.dtype} {image.shape}"
                )
            path = self._new_path(subdir, f"{name}.png")
            partial = path.with_suffix(".png.tmp")
            Image.fromarray(image).save(partial, format="PNG")
            os.replace(partial, path)
            paths.append(path)
        return paths

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
        """Write tables/<name>.csv (and a W&B table); return the table as aligned text to print."""
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f"table {name!r} has {len(columns)} columns but a row of {len(row)}: {row}")
        write_csv(self._new_path("tables", f"{name}.csv"), columns, rows)
        if self._wandb_run is not None:
            self._wandb_run.log({f"tables/{name}": self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
        return format_table(columns, rows)

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the run complete: summary.json gets status, timing and the experiment's summary (rank 0)."""
        if not self.processes.is_main:
            return
        self._write_summary("complete", summary)
        if self._wandb_run is not None:
            self._wandb_run.summary.update(summary)

    def _start_wandb(self) -> wandb.Run | None:
        """W&B as `logger` says (experiments/config_checks.py has checked its keys); online falls back to offline."""
        logger = self.cfg.logger
        if logger.name == "none":
            return None
        import wandb

        self._wandb = wandb
        try:
            return self._init_wandb(logger.mode)
        except wandb.errors.Error as error:
            if logger.mode != "online":
                raise
            log.warning(
                "W&B ONLINE FAILED (%s): logging offline instead (the upload command comes when the run ends)", error
            )
            return self._init_wandb("offline")

    def _init_wandb(self, mode: str) -> wandb.Run:
        logger = self.cfg.logger
        verbose = logger.get("verbose", False)
        run = self._wandb.init(
            mode=mode,
            project=logger.project,
            entity=logger.entity,
            name=f"{self.cfg.task}/{self.run_dir.name}",
            tags=list(logger.tags),
            config=OmegaConf.to_container(self.cfg, resolve=True),
            dir=self.run_dir,
            settings=self._wandb.Settings(silent=not verbose),  # its banner buries the run's own output
        )
        if mode == "offline":
            self._offline_wandb_run = Path(run.dir).parent  # run.dir is its files/ folder
            where = f"offline run in {self._offline_wandb_run}"  # the upload hint comes at the end, unless it failed
        else:
            where = run.url if mode == "online" else mode
        if not verbose:  # one line of our own instead
            log.info("W&B: %s", where)
        return run

    def _write_summary(self, status: str, fields: dict[str, Any]) -> None:
        finished_at = time.time()
        record = {
            "status": status,
            "task": self.cfg.task,
            "started_at": _timestamp(self._started_at),
            "finished_at": _timestamp(finished_at),
            "duration_s": round(finished_at - self._started_at, 3),
        }
        if clashes := record.keys() & fields.keys():
            raise ValueError(f"summary keys {sorted(clashes)} are reserved for the recorder")
        record.update(fields)
        # Write then rename, so a crash mid-write never leaves a half summary behind.
        partial = self.summary_path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(record, indent=2, default=_plain_json) + "\n")
        os.replace(partial, self.summary_path)

    def _new_path(self, subdir: str, filename: str) -> Path:
        folder = self.run_dir / subdir
        folder.mkdir(parents=True, exist_ok=True)
        return folder / filename


def remove_offline_wandb_run(folder: Path) -> None:
    """Remove an offline W&B run's folder, W&B's links into it (latest-run, debug.log), and wandb/ if left empty."""
    shutil.rmtree(folder)
    wandb_dir = folder.parent
    for path in wandb_dir.iterdir():
        if path.is_symlink() and not path.exists():
            path.unlink()
    if not any(wandb_dir.iterdir()):
        wandb_dir.rmdir()


def is_complete(run_dir: Path) -> bool:
    """Whether a run folder holds a complete run (its summary.json says so)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "complete"
    except (OSError, json.JSONDecodeError):
        return False


def finished_jobs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep that hold a complete run (a job named by a path value nests deeper)."""
    return sorted(path.parent for path in sweep_dir.rglob("summary.json") if is_complete(path.parent))


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file. A last line without its newline is the row a killed run was writing: dropped."""
    text = path.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(f"{path}, line {number}: not a JSON row ({error.msg}); the file was edited or damaged: "
                            "remove the line, or start a new run") from None
    return rows


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as rows:
        rows.write(json.dumps(row, default=_plain_json) + "\n")


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="") as table_file:
        writer = csv.writer(table_file)
        writer.writerow(columns)
        writer.writerows(rows)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows as a markdown table with aligned columns; floats show 4 significant digits (1.0 -> 1.000)."""
    cells = [list(map(str, columns))] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(text.ljust(width) for text, width in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return format(value, "#.4g") if isinstance(value, (float, np.floating)) else str(value)


def _plain_json(value: Any) -> Any:
    """json.dumps fallback for numpy/torch scalars and arrays, and paths."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))

