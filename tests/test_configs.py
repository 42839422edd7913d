"""Every config option composes, presets and the command line layer in the right order, typos fail.

Options are discovered from conf/, so a new yaml file is covered without touching this test.
"""

import importlib
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from errors import UserError
from evals.prompts import load_prompts

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS_CHOSEN_ELSEWHERE = {"experiment", "hydra"}


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


EXPERIMENTS = options("experiment")
GROUP_OPTIONS = [
    (group.name, option)
    for group in sorted(CONF.iterdir())
    if group.is_dir() and group.name not in GROUPS_CHOSEN_ELSEWHERE
    for option in options(group.name)
]


def test_there_is_something_to_compose():
    assert EXPERIMENTS and ("model", "tiny") in GROUP_OPTIONS


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_every_model(experiment: str, model: str):
    cfg = compose_config(f"experiment={experiment}", f"model={model}")
    # Every interpolation resolves; values a user must give (???) may stay open.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert cfg.model.name == model  # the command line beats a preset's model choice
    experiment_module = importlib.import_module(f"experiments.{cfg.task}")
    assert callable(experiment_module.run)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group: str, option: str):
    cfg = compose_config(f"experiment={EXPERIMENTS[0]}", f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert cfg[group].name == option  # each option names itself, so code can branch on it


def test_no_experiment_lists_the_experiments():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config()
    assert "experiment=" in str(error.value)
    assert all(name in str(error.value) for name in EXPERIMENTS)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as error:
        compose_config(f"experiment={EXPERIMENTS[0]}", "model=no_such_model")
    assert all(name in str(error.value) for name in options("model"))


def test_command_line_beats_the_preset():
    preset = compose_config("experiment=world_preview")
    overridden = compose_config("experiment=world_preview", "preview.num_images=3")
    assert preset.preview.num_images != 3
    assert overridden.preview.num_images == 3


def test_mistyped_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="rank_ration"):
        compose_config(f"experiment={EXPERIMENTS[0]}", "accel.rank_ration=0.1")


def test_weights_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STAGEVAR_WEIGHTS_DIR", "/data/stagevar")
    assert compose_config(f"experiment={EXPERIMENTS[0]}").paths.weights_dir == "/data/stagevar"


# The prompts group: what each option yields through evals.prompts.load_prompts.


def prompts_cfg(*overrides: str) -> DictConfig:
    return compose_config(f"experiment={EXPERIMENTS[0]}", *overrides).prompts


def test_default_prompts_are_the_indexed_shapes_suite():
    prompts = load_prompts(prompts_cfg())
    assert [item["index"] for item in prompts] == list(range(len(prompts)))
    assert all({"prompt", "tag", "include"} <= item.keys() for item in prompts)

    # A limit takes prompts in turn from each category (the suite is sorted by category), in suite order.
    limited = load_prompts(prompts_cfg("prompts.limit=8"))
    assert [item["tag"] for item in limited] == [
        "single_object", "single_object", "two_object", "two_object", "counting", "colors", "position", "color_attr"
    ]
    assert [item["index"] for item in limited] == [0, 1, 56, 57, 112, 168, 224, 280]
    assert limited[2] == prompts[56]


def test_prompt_list_from_the_command_line():
    prompts = load_prompts(prompts_cfg("prompts=list", "prompts.texts=[a red cube,two green cones]"))
    assert prompts == [{"prompt": "a red cube", "index": 0}, {"prompt": "two green cones", "index": 1}]


def test_geneval_and_dpg_files_are_read(tmp_path: Path):
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text('{"tag": "single_object", "include": [], "prompt": "a photo of a bench"}\n' * 3)
    geneval = load_prompts(prompts_cfg("prompts=geneval", f"prompts.path={metadata}", "prompts.limit=2"))
    assert [(item["index"], item["prompt"]) for item in geneval] == [(0, "a photo of a bench"), (1, "a photo of a bench")]

    dpg_folder = tmp_path / "dpg"
    dpg_folder.mkdir()
    (dpg_folder / "b.txt").write_text("a second prompt\n")
    (dpg_folder / "a.txt").write_text("a first prompt\n")
    dpg = load_prompts(prompts_cfg("prompts=dpg", f"prompts.path={dpg_folder}"))
    assert [(item["index"], item["prompt"]) for item in dpg] == [(0, "a first prompt"), (1, "a second prompt")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prompts=geneval"], "prompts.path is not set"),
        (["prompts=geneval", "prompts.path=no/such/file.jsonl"], "prompts.path='no/such/file.jsonl' does not exist"),
        (["prompts=dpg", "prompts.path=no/such/folder"], "prompts.path='no/such/folder' does not exist"),
        (["prompts.path=no/such/suite.jsonl"], "prompts.path='no/such/suite.jsonl' does not exist"),
        (["prompts=list"], "prompts.texts is not set"),
        (["prompts.limit=0"], "prompts.limit"),
    ],
)
def test_prompt_mistakes_name_the_key(overrides: list[str], message: str):
    with pytest.raises(UserError, match=re.escape(message)):
        load_prompts(prompts_cfg(*overrides))
