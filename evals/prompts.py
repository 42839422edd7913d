"""The prompts of a run, from the `prompts` config group (conf/prompts/*.yaml).

Every prompt is a dict with at least "prompt" and "index" (its position in the source, kept when
`limit` cuts the list). GenEval and ShapesEval items also carry their metadata (tag, objects...).
"""

from collections import deque
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from errors import UserError
from evals.prompt_files import read_dpg_prompts, read_geneval_metadata
from evals.shapes_eval import load_suite


def load_prompts(prompts_cfg: DictConfig) -> list[dict]:
    """Read the prompts that `prompts_cfg` (the composed `prompts` group) names."""
    source = prompts_cfg.name
    if source == "shapes_eval":
        custom_suite = prompts_cfg.path is not None
        items = load_suite(_existing_path(prompts_cfg, "ShapesEval suite file") if custom_suite else None)
    elif source == "geneval":
        items = read_geneval_metadata(_existing_path(prompts_cfg, "evaluation_metadata.jsonl"))
    elif source == "dpg":
        items = read_dpg_prompts(_existing_path(prompts_cfg, "DPG-Bench prompts folder"))
    elif source == "list":
        texts = _required(prompts_cfg, "texts", "'[a red cube,two green cones]'")
        if not OmegaConf.is_list(texts):
            raise UserError(f"prompts.texts={texts!r} must be a list: prompts.texts='[a red cube,two green cones]'")
        items = [{"prompt": str(text)} for text in texts]
    else:
        raise UserError(f"prompts.name={source!r} is unknown: use prompts=shapes_eval, geneval, dpg or list")
    if not items:
        key = "texts" if source == "list" else "path"
        raise UserError(f"prompts.{key}={prompts_cfg[key]!r} gives no prompts: a run needs at least one")
    items = [{**item, "index": index} for index, item in enumerate(items)]
    limit = prompts_cfg.limit
    if limit is None:
        return items
    if not isinstance(limit, int) or limit < 1:
        raise UserError(f"prompts.limit={limit!r} must be a positive whole number, or null for all prompts")
    return round_robin(items, limit)


def round_robin(items: list[dict], limit: int) -> list[dict]:
    """The first `limit` prompts taken in turn from each category (GenEval's `tag`; untagged prompts form one), in
    list order: a quick run of a category-sorted suite covers every category, not only the first."""
    by_category: dict[str | None, deque[dict]] = {}
    for item in items:
        by_category.setdefault(item.get("tag"), deque()).append(item)
    chosen: list[dict] = []
    while len(chosen) < min(limit, len(items)):
        chosen += [queue.popleft() for queue in by_category.values() if queue][: limit - len(chosen)]
    return sorted(chosen, key=lambda item: item["index"])


def _existing_path(prompts_cfg: DictConfig, what: str) -> Path:
    path = Path(_required(prompts_cfg, "path", f"<your {what}>"))
    if not path.exists():
        raise UserError(f"prompts.path={str(path)!r} does not exist: point it at your {what}")
    return path


def _required(prompts_cfg: DictConfig, key: str, example: str):
    if OmegaConf.is_missing(prompts_cfg, key):
        raise UserError(f"prompts.{key} is not set: add prompts.{key}={example} to the command")
    return prompts_cfg[key]
