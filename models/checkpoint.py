"""Strict checkpoint I/O: read a state dict from any of the formats the official models ship in, and
load it so that every model tensor is filled and every checkpoint tensor is accounted for.

The official loaders are lenient (unknown keys silently ignored), so a wrong key layout "loads" as
random weights; here it is an error that names the file and the offending keys.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from errors import UserError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".index.json"
_LISTED_KEYS = 8  # how many offending keys an error message shows per kind


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


def read_state_dict(
    path: str | Path, *, key: str | None = None, config_key: str | None = None, header_only: bool = False
) -> dict[str, Tensor]:
    """Read a flat {name: tensor} dict onto the CPU.

    `path`: a `.pth`/`.pt`/`.bin`/`.ckpt` file (torch.load with weights_only), a `.safetensors` file, or a
    sharded folder (or its `*.index.json`) in Hugging Face layout. `key`: where the weights sit inside a
    nested checkpoint, dotted for deeper levels (`'vae'`, `'trainer.gpt_fsdp'`). `config_key`: the config
    key that named `path`, quoted in errors so the user knows what to change. `header_only`: meta tensors
    with the names and shapes of the file's tensors, read without their data (a safetensors file's header, a
    torch file's pickle), to check a checkpoint against a model in milliseconds.
    """
    path = Path(path)
    named_by = f" (set by config key `{config_key}`)" if config_key else ""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}{named_by}; put the file there or point the key at it")
    if path.is_dir() or path.name.endswith(INDEX_SUFFIX):
        content: object = _read_sharded(path, header_only)
    else:
        content = _read_file(path, header_only, named_by)
    for part in key.split(".") if key else ():
        if not isinstance(content, Mapping) or part not in content:
            found = _first(sorted(map(str, content))) if isinstance(content, Mapping) else type(content).__name__
            raise CheckpointError(f"{path}: no entry {part!r} on the way to key {key!r}; found: {found}")
        content = content[part]
    return _as_state_dict(content, path, key)


def _read_file(path: Path, header_only: bool = False, named_by: str = "") -> object:
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            return _read_safetensors_header(path) if header_only else safetensors.torch.load_file(path, device="cpu")
        if path.suffix in TORCH_SUFFIXES:  # on the meta device torch.load reads the pickle, not the tensor data
            return torch.load(path, map_location="meta" if header_only else "cpu", weights_only=True)
    except Exception as err:  # every reader failure means the same thing to the user: this file is unusable
        raise CheckpointError(f"cannot read checkpoint {path}{named_by}: {_read_failure(err, path)}") from err
    raise CheckpointError(
        f"unsupported checkpoint file {path}: expected a suffix in {(*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)} "
        f"or a folder with a `*{INDEX_SUFFIX}`"
    )


def _read_safetensors_header(path: Path) -> dict[str, Tensor]:
    """Meta tensors shaped as the file's, from its header alone; safetensors refuses a header whose tensors the
    file does not fully cover (a truncated file). Their dtype is torch's default: loading casts to the module's."""
    with safetensors.safe_open(path, framework="pt") as file:
        return {name: torch.empty(file.get_slice(name).get_shape(), device="meta") for name in file.keys()}


def _read_failure(err: Exception, path: Path) -> str:
    lines = str(err).strip().splitlines() or [""]
    refused = [line.strip() for line in lines if "Unsupported global" in line]
    if refused:  # torch's weights-only unpickler met a Python object other than tensors and containers
        return (
            f"it holds pickled Python objects, which are not loaded for safety ({refused[0]}); "
            "save the weights alone as a dict of tensors and point at that file"
        )
    kind = "safetensors" if path.suffix == SAFETENSORS_SUFFIX else "torch.save"
    return f"{type(err).__name__}: {lines[0]} (expected a complete {kind} file holding a dict of tensors)"


def _read_sharded(path: Path, header_only: bool = False) -> dict[str, Tensor]:
    if path.is_dir():
        indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) != 1:
            raise CheckpointError(
                f"checkpoint folder {path} must hold exactly one `*{INDEX_SUFFIX}`, found {[p.name for p in indexes]}"
            )
        path = indexes[0]
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a shard index (expected JSON with a `weight_map` object)") from err
    state_dict: dict[str, Tensor] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard_path = path.parent / shard_name
        if not shard_path.is_file():
            raise CheckpointError(f"{path} lists shard {shard_name}, but {shard_path} does not exist")
        state_dict.update(_as_state_dict(_read_file(shard_path, header_only), shard_path, None))
    absent = [name for name in weight_map if name not in state_dict]
    if absent:
        raise CheckpointError(
            f"{path}: {len(absent)} tensors listed in the index are not in their shards: {_first(absent)}"
        )
    return state_dict


def _as_state_dict(content: object, path: Path, key: str | None) -> dict[str, Tensor]:
    where = f"{path} (key {key!r})" if key else str(path)
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{where}: expected a dict of tensors, found {type(content).__name__}")
    not_tensors = [
        f"{name} ({type(value).__name__})" for name, value in content.items() if not isinstance(value, Tensor)
    ]
    if not_tensors:
        hint = "; pass `key` to pick the weights inside a nested checkpoint" if key is None else ""
        raise CheckpointError(
            f"{where}: expected a dict of tensors, but these are not tensors: {_first(not_tensors)}{hint}"
        )
    return dict(content)


def check_matches(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    rename: Callable[[str], str] | None = None,
    ignore: tuple[str, ...] = (),
) -> dict[str, Tensor]:
    """The checkpoint's tensors under their module names, when they fill `module` exactly; nothing is loaded.

    Exactly: every parameter and persistent buffer has a tensor of its shape, and no tensor lacks a place.
    `rename` maps checkpoint names to module names. `ignore` holds glob patterns of names that may be
    absent on either side (a name present on both sides still loads). Names that refer to one shared
    tensor in the module (aliases) count as filled when any of them is in the checkpoint. Either side may be
    meta tensors (read_state_dict(header_only=True), a module built on the meta device): only names and shapes
    count. Raises CheckpointError listing missing, unexpected and wrong-shape keys; `source` names the file.
    """
    targets = module.state_dict(keep_vars=True)
    incoming: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        target = rename(name) if rename else name
        if target in incoming:
            raise CheckpointError(
                f"{source}: two checkpoint tensors map to the module name {target!r} (one is {name!r})"
            )
        incoming[target] = value

    def ignored(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore)

    missing = [
        f"{names[0]} {tuple(targets[names[0]].shape)}"
        for names in _unfilled(targets, incoming) if not any(ignored(name) for name in names)
    ]
    unexpected = [
        f"{name} {tuple(value.shape)}" for name, value in incoming.items() if name not in targets and not ignored(name)
    ]
    wrong_shape = [
        f"{name}: checkpoint {tuple(value.shape)} vs module {tuple(targets[name].shape)}"
        for name, value in incoming.items()
        if name in targets and value.shape != targets[name].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            f"{len(names)} {kind}: {_first(names)}"
            for kind, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if names
        ]
        raise CheckpointError(
            f"{source} does not match {type(module).__name__} ({len(targets)} module tensors, "
            f"{len(state_dict)} in the checkpoint); nothing was loaded. " + "; ".join(problems)
        )
    return incoming


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    rename: Callable[[str], str] | None = None,
    ignore: tuple[str, ...] = (),
) -> None:
    """Fill every parameter and persistent buffer of `module` from `state_dict`, or nothing at all.

    `rename` and `ignore` as check_matches, whose errors this raises. Values are cast to the module tensor's
    dtype; tensors of a meta-device module are replaced, others are copied into.
    """
    incoming = check_matches(module, state_dict, source=source, rename=rename, ignore=ignore)
    targets = module.state_dict(keep_vars=True)
    left_on_meta = [names[0] for names in _unfilled(targets, incoming) if targets[names[0]].is_meta]
    if left_on_meta:
        raise CheckpointError(
            f"{source}: ignored tensors absent from the checkpoint have no values in the module (meta device): "
            f"{_first(left_on_meta)}; materialise them before loading or stop ignoring them"
        )

    on_meta = any(tensor.is_meta for tensor in targets.values())
    to_load = {
        name: value.to(device="cpu" if targets[name].is_meta else targets[name].device, dtype=targets[name].dtype)
        for name, value in incoming.items()
        if name in targets
    }
    with torch.no_grad():
        module.load_state_dict(to_load, strict=False, assign=on_meta)


def _unfilled(targets: Mapping[str, Tensor], incoming: Mapping[str, Tensor]) -> list[list[str]]:
    """The module's tensors the checkpoint leaves empty, each as the list of its names (aliases share one)."""
    aliases: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        aliases.setdefault(id(tensor), []).append(name)
    return [names for names in aliases.values() if not any(name in incoming for name in names)]


def save_safetensors(state_dict: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str]) -> None:
    """Save tensors and string metadata to a `.safetensors` file, creating its folder.

    Tensors are copied first, so aliased tensors (which safetensors refuses) are saved under each name.
    """
    bad_metadata = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad_metadata:
        raise TypeError(f"safetensors metadata must map str to str; convert these first: {bad_metadata}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().to("cpu", copy=True).contiguous() for name, value in state_dict.items()}
    safetensors.torch.save_file(tensors, path, metadata=dict(metadata))


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED_KEYS])
    return shown + (f", ... ({len(names) - _LISTED_KEYS} more)" if len(names) > _LISTED_KEYS else "")
