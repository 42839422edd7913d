"""What Hydra refuses on the command line is one `error:` paragraph of ours, exit 2 (experiments/hydra_errors.py):
the valid options of a group, the close matches of a mistyped key, how to quote an override Hydra cannot read; none
of Hydra's own text (its search path, the `+` advice, HYDRA_FULL_ERROR), no traceback, nothing written."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from experiments.hydra_errors import unreadable_override

REPO = Path(__file__).resolve().parents[1]
HYDRAS_OWN_TEXT = ("Config search path", "HYDRA_FULL_ERROR", "To append", "+preview", "Exception", "Traceback")


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["experiment=nope"], "experiment=nope is not an option of experiment: use one of accel_compare, "),
        (["experiment=world_preview", "model=tiny_stage"],
         "model=tiny_stage is not an option of model (did you mean model=tiny_stages?): use one of infinity2b, "),
        ([], "no experiment chosen: add experiment=<name>, one of accel_compare, "),
        (["experiment=world_preview", "preview.num_image=8"],
         "preview.num_image is not a config key; did you mean preview.num_images?"),
        (["experiment=world_preview", "prompts=list", "prompts.texts=[一只猫]"],
         "prompts.texts=[一只猫] is not an override Hydra can read: '一' (character 16) must be in quotes. Quote the "
         "value (each item of a list) and, for the shell, the whole override: 'prompts.texts=[\"一只猫\"]'"),
    ],
)
def test_what_hydra_refuses_is_one_error_paragraph(tmp_path: Path, overrides: list[str], said: str):
    result = subprocess.run([sys.executable, "run.py", *overrides, f"paths.output_root={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {said}") and result.stderr.count("\n") == 1, result.stderr
    assert not any(text in result.stderr for text in HYDRAS_OWN_TEXT)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["[一只猫, 两只狗]", "[what's this]", "[a=b]", "/data/prompts/é.jsonl", 'say "hi" #1'])
def test_the_quoted_override_reads_as_the_text_meant(value: str):
    advice = str(unreadable_override(f"prompts.texts={value}"))
    quoted = advice.rsplit("the whole override: ", 1)[1]
    (override,) = shlex.split(quoted)  # as the shell hands it to run.py
    meant = [item.strip() for item in value[1:-1].split(",")] if value.startswith("[") else value
    assert OverridesParser.create().parse_override(override).value() == meant
