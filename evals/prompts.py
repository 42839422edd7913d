"""The prompts of a run, from the `prompts` config group (conf/prompts/*.yaml).

Every prompt is a dict with at least "prompt" (the text the model reads) and "index" (its position in the source,
kept when `limit` cuts the list). GenEval and ShapesEval items also carry their metadata (tag, objects...); a
GenEval prompt read through `prompts.rewrite_map` keeps the benchmark's own text in "original_prompt".
`prompt_samples` makes `samples_per_prompt` samples of each prompt: what generate and the accel experiments draw.
"""

from collections import deque
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from errors import UserError
from evals.prompt_files import read_dpg_prompts, read_geneval_metadata, read_prompt_map
from evals.shapes_eval import load_suite
from models.class_labels import ImageNetClassLabels, imagenet_class_names


def load_prompts(prompts_cfg: DictConfig) -> list[dict]:
    """Read the prompts that `prompts_cfg` (the composed `prompts` group) names."""
    source = prompts_cfg.name
    if source == "shapes_eval":
        custom_suite = prompts_cfg.path is not None
        items = load_suite(_existing_path(prompts_cfg, "ShapesEval suite file") if custom_suite else None)
    elif source == "geneval":
        items = read_geneval_metadata(_existing_path(prompts_cfg, "evaluation_metadata.jsonl"))
        if prompts_cfg.get("rewrite_map") is not None:
            items = rewritten(items, prompts_cfg.rewrite_map)
    elif source == "dpg":
        items = read_dpg_prompts(_existing_path(prompts_cfg, "DPG-Bench prompts folder"))
    elif source == "list":
        texts = _required(prompts_cfg, "texts", "'[a red cube,two green cones]'")
        if not OmegaConf.is_list(texts):
            raise UserError(f"prompts.texts={texts!r} must be a list: prompts.texts='[a red cube,two green cones]'")
        items = [{"prompt": str(text)} for text in texts]
    elif source == "imagenet":
        items = imagenet_prompts(prompts_cfg.classes)
    else:
        raise UserError(f"prompts.name={source!r} is unknown: use prompts=shapes_eval, geneval, dpg, list or imagenet")
    if not items:
        key = {"list": "texts", "imagenet": "classes"}.get(source, "path")
        raise UserError(f"prompts.{key}={prompts_cfg[key]!r} gives no prompts: a run needs at least one")
    items = [{**item, "index": index} for index, item in enumerate(items)]
    limit = prompts_cfg.limit
    if limit is None:
        return items
    if not isinstance(limit, int) or limit < 1:
        raise UserError(f"prompts.limit={limit!r} must be a positive whole number, or null for all prompts")
    return round_robin(items, limit)


def imagenet_prompts(classes: list | None) -> list[dict]:
    """ImageNet classes as prompts: the class name is the text (the semantic metrics read it), the index beside it."""
    names = imagenet_class_names()
    if classes is None:
        indices = range(len(names))
    elif not OmegaConf.is_list(classes):
        raise UserError(f"prompts.classes={classes!r} must be a list of class indices or names: "
                        "prompts.classes='[207,golden retriever]'")
    else:
        labels = ImageNetClassLabels(len(names))
        indices = [labels.class_index(str(item)) for item in classes]
    return [{"prompt": names[index], "class_index": index} for index in indices]


def rewritten(items: list[dict], map_path: str) -> list[dict]:
    """GenEval items whose prompt the map rewrites (the text the model reads); the original stays beside it."""
    if not Path(map_path).is_file():
        raise UserError(f"prompts.rewrite_map={map_path!r} does not exist: point it at a JSON object that maps each "
                        "GenEval prompt to the text the model reads (e.g. StageVAR's prompt_rewrite_cache.json)")
    rewrites = read_prompt_map(map_path)
    if missing := [item["prompt"] for item in items if item["prompt"] not in rewrites]:
        raise UserError(f"prompts.rewrite_map={map_path!r} has no rewrite of {len(missing)} prompt(s), e.g. "
                        f"{missing[0]!r}: add them, or leave prompts.rewrite_map=null for GenEval's own prompts")
    return [{**item, "prompt": rewrites[item["prompt"]], "original_prompt": item["prompt"]} for item in items]


def prompt_samples(prompts: list[dict], samples_per_prompt: int) -> list[dict]:
    """Each prompt `samples_per_prompt` times in a row, numbered by "sample": the images a run draws, in order."""
    return [{**prompt, "sample": sample} for prompt in prompts for sample in range(samples_per_prompt)]


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


def spread(prompts: list[dict], count: int) -> list[dict]:
    """`count` prompts evenly spaced over the list (suites are sorted by category, so each one gets its share)."""
    if count >= len(prompts):
        return prompts
    return [prompts[i] for i in np.linspace(0, len(prompts) - 1, count).round().astype(int)]
