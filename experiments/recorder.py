"""RunRecorder: everything a run leaves behind, in its run folder and (optionally) in W&B.

Run folder layout:
    config.yaml      the resolved config (Hydra's unresolved one stays in .hydra/)
    results.jsonl    one JSON line per log() call, flushed at once, so an interrupted run keeps its rows
    summary.json     written last: "status" is "complete", "failed" or "interrupted"
    figures/<name>.png, images/..., tables/<name>.csv
    wandb/           W&B's offline files when logger=wandb (upload later with `wandb sync`)
"""

from __future__ import annotations

import csv
import json
import logging
import numbers
import os
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from PIL import Image

if TYPE_CHECKING:  # imported when W&B starts: logger=none runs without the package (the GPU image lacks it)
    import wandb


log = logging.getLogger(__name__)


class RunRecorder:
    """Owns one run folder; use as `with RunRecorder(cfg, run_dir) as recorder: ...`."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.results_path = self.run_dir / "results.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self._wandb_run: wandb.Run | None = None
        self._wandb: ModuleType | None = None  # the wandb package, once W&B has started
        self._started_at = 0.0

    def __enter__(self) -> RunRecorder:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
        self._started_at = time.time()
        self._wandb_run = self._start_wandb()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            error = f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__
            self._write_summary(status, {"error": error})
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=0 if exc is None else 1)
            self._wandb_run = None

    def log(self, row: dict[str, Any]) -> None:
        """Append one result row to results.jsonl; its numeric fields also go to W&B."""
        with self.results_path.open("a") as results:
            results.write(json.dumps(row, default=_plain_json) + "\n")
        if self._wandb_run is not None:
            numeric = {key: value for key, value in row.items() if isinstance(value, numbers.Number)}
            if numeric:
                self._wandb_run.log(numeric)

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
        """Save uint8 RGB images (N,H,W,3 array or a list of H,W,3) as <subdir>/<name>.png."""
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
            Image.fromarray(image).save(path)
            paths.append(path)
        if self._wandb_run is not None:
            self._wandb_run.log({subdir: [self._wandb.Image(str(p), caption=p.stem) for p in paths]})
        return paths

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
        """Write tables/<name>.csv (and a W&B table); return the table as aligned text to print."""
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f"table {name!r} has {len(columns)} columns but a row of {len(row)}: {row}")
        with self._new_path("tables", f"{name}.csv").open("w", newline="") as table_file:
            writer = csv.writer(table_file)
            writer.writerow(columns)
            writer.writerows(rows)
        if self._wandb_run is not None:
            self._wandb_run.log({f"tables/{name}": self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
        return format_table(columns, rows)

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the run complete: summary.json gets status, timing and the experiment's summary."""
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
                "W&B ONLINE FAILED (%s): logging offline instead; upload later with `wandb sync %s/offline-run-*`",
                error, self.run_dir / "wandb",
            )
            return self._init_wandb("offline")

    def _init_wandb(self, mode: str) -> wandb.Run:
        logger = self.cfg.logger
        return self._wandb.init(
            mode=mode,
            project=logger.project,
            entity=logger.entity,
            name=f"{self.cfg.task}/{self.run_dir.name}",
            tags=list(logger.tags),
            config=OmegaConf.to_container(self.cfg, resolve=True),
            dir=self.run_dir,
            settings=self._wandb.Settings(quiet=not logger.get("verbose", False)),  # its banner buries the run's own output
        )

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

