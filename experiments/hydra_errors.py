"""Hydra's own refusals of a command line, as the lab's one `error:` paragraph (exit 2, like a bad value's).

Hydra composes the config before any of our code runs, and on a mistake prints its own text (its config search
path, the advice to add a mistyped key with `+`, how to see a stack trace) and exits with 1. run.py has Hydra raise
instead (HYDRA_FULL_ERROR=1) and asks `command_line_error` what the error means for the user:
- an unknown option of a config group (model=nope), or none where one is required (no experiment=): the options;
- a key that is not in the config (preview.num_image=8): the close matches, "did you mean preview.num_images?";
- an override Hydra's grammar cannot read (一, é, ' or # outside quotes): how to quote it.
Any other composition error keeps Hydra's message, in the same paragraph.
"""

from __future__ import annotations

import difflib
import re
import shlex
from pathlib import Path

from antlr4.error.Errors import LexerNoViableAltException, RecognitionException
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from errors import UserError
from experiments.config_checks import unknown_key_hints

REQUIRED_GROUP = re.compile(r"You must specify '([\w/.]+)'")  # Hydra 1.3's words for a group left at ???


def command_line_error(error: HydraException, arguments: list[str], config_dir: Path) -> UserError | None:
    """What `error`, raised by Hydra while composing the config of the command line `arguments`, means for the
    user; None for an error that is not about the command line (a bug keeps its traceback)."""
    if isinstance(error, OverrideParseException):
        return unreadable_override(error.override)
    if isinstance(error, MissingConfigException) and error.options:
        group, option = error.missing_cfg_file.rsplit("/", 1)
        close = difflib.get_close_matches(option, error.options, n=1)
        return UserError(f"{group}={option} is not an option of {group}"
                         + (f" (did you mean {group}={close[0]}?)" if close else "")
                         + f": use one of {', '.join(error.options)}")
    if not isinstance(error, ConfigCompositionException):
        return None
    if isinstance(error.__cause__, (ConfigAttributeError, ConfigKeyError)):
        hints = unknown_key_hints(arguments, config_dir)
        return UserError("\n".join(hints) or f"{error.__cause__.full_key} is not a config key")
    if required := REQUIRED_GROUP.match(str(error)):
        group = required[1]
        return UserError(f"no {group} chosen: add {group}=<name>, one of {', '.join(group_options(group, config_dir))}")
    # Hydra's message is all there is (e.g. a sweep without -m); an OmegaConf cause says which value was wrong.
    cause = str(error.__cause__).splitlines()[0] if error.__cause__ else ""
    return UserError(": ".join(part for part in (str(error), cause) if part))


def unreadable_override(override: str) -> UserError:
    """An override that Hydra's grammar cannot read: where, and the same override quoted so that it can."""
    key, _, value = override.partition("=")
    position = _unreadable_position(override)
    if position == len(override):
        return UserError(f"{override} is not an override Hydra can read: a bracket or quote is not closed")
    where = "" if position is None else f": {override[position]!r} (character {position + 1}) must be in quotes"
    if not value or (position is not None and position < len(key)):
        return UserError(f"{override} is not an override Hydra can read{where}; write key=value, the key in letters, "
                         "digits, _ and -, joined by dots (e.g. prompts.limit=10)")
    return UserError(f"{override} is not an override Hydra can read{where}. Quote the value (each item of a list) "
                     f"and, for the shell, the whole override: {shlex.quote(f'{key}={_quoted(value)}')}")


def group_options(group: str, config_dir: Path) -> list[str]:
    """The options of a config group, as Hydra finds them (conf/<group>/ and plugins)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return GlobalHydra.instance().config_loader().get_group_options(group, ObjectType.CONFIG)


def _unreadable_position(override: str) -> int | None:
    """The index of the first character Hydra's grammar could not read (len(override): it ended too early)."""
    try:
        OverridesParser.create().parse_rule(override, "override")
    except HydraException as error:
        cause = error.__cause__  # what Hydra's OverrideParseException leaves out
        if isinstance(cause, LexerNoViableAltException):
            return cause.startIndex
        if isinstance(cause, RecognitionException) and cause.offendingToken is not None:
            start = cause.offendingToken.start  # -1 or past the end: the text ended before a closing bracket
            return start if 0 <= start < len(override) else len(override)
    return None


def _quoted(value: str) -> str:
    """`value` as Hydra reads plain text: in double quotes, or for a list each of its items."""
    if value.startswith("[") and value.endswith("]") and not re.search(r'[\[\]"]', value[1:-1]):
        return "[" + ",".join(_quoted(item.strip()) for item in value[1:-1].split(",")) + "]"
    return '"' + value.replace('"', '\\"') + '"'
