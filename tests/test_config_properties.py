"""Every numeric config key of every experiment, set to a bad value, is refused by the checks with the key named
(or, where the value is valid, changes nothing about whether the checks pass): never a crash of the checks, never
inf, nan or a string accepted where the preset has a number. Checks only (experiments/config_checks.check_run, as
the Hydra callback runs them before any model is built), so the whole sweep takes seconds per experiment."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from errors import UserError
from experiments.config_checks import check_run

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))
BASE = {"train_tiny_gpu": ["device=cpu"]}  # this machine has no GPU; the GPU preset's other keys are what is tested
BAD_VALUES = [0, -1, math.inf, math.nan, 1e-40, 1e40, "abc"]


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def base_config(experiment: str, output_root: Path) -> DictConfig:
    overrides = [f"experiment={experiment}", "logger=none", f"paths.output_root={output_root}", *BASE.get(experiment, [])]
    return compose("config", overrides, return_hydra_config=True)


def numeric_keys(cfg: DictConfig) -> list[str]:
    """The dotted keys whose value in the composed config is a number (Hydra's own settings aside)."""
    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield f"{prefix}{key}"
    return [key for key in walk(OmegaConf.to_container(cfg, resolve=False)) if not key.startswith("hydra.")]


def check_outcome(cfg: DictConfig) -> str | None:
    """None when the checks pass, else the UserError's message; any other exception propagates (a test failure)."""
    try:
        check_run(cfg)
    except UserError as error:
        return str(error)
    return None


def assert_refused_or_harmless(base: DictConfig, base_outcome: str | None, key: str, value) -> None:
    cfg = base.copy()
    OmegaConf.update(cfg, key, value)
    outcome = check_outcome(cfg)
    never_valid = isinstance(value, str) or (isinstance(value, float) and not math.isfinite(value))
    if outcome is not None and f"{key}=" in outcome:
        return  # refused, the key named with its value
    assert not never_valid, f"{key}={value!r} was not refused with its key named: {outcome}"
    assert outcome == base_outcome, f"{key}={value!r}: {outcome}"  # valid, or refused for what the base lacks


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_numeric_key_refuses_bad_values_by_name(experiment: str, tmp_path: Path):
    base = base_config(experiment, tmp_path)
    base_outcome = check_outcome(base)  # import_scores alone needs a scored run folder
    keys = numeric_keys(base)
    assert keys, f"{experiment} has no numeric keys?"
    for key in keys:
        for value in BAD_VALUES:
            assert_refused_or_harmless(base, base_outcome, key, value)


ANY_VALUE = st.one_of(
    st.floats(), st.integers(min_value=-(10**30), max_value=10**30), st.booleans(), st.none(),
    st.text(alphabet=st.characters(blacklist_characters="${}\\"), max_size=6),  # no interpolations
)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_of_any_numeric_key_is_refused_by_name_or_harmless(data, tmp_path_factory):
    experiment = data.draw(st.sampled_from([name for name in EXPERIMENTS if name != "import_scores"]))
    base = base_config(experiment, tmp_path_factory.getbasetemp() / "outputs")
    key = data.draw(st.sampled_from(numeric_keys(base)))
    assert_refused_or_harmless(base, None, key, data.draw(ANY_VALUE))
