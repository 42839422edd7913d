"""Building models from their configs: clear errors for missing weights, and the tiny model's round trip."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import torch

from errors import UserError
from models.pipeline import build_model, check_model_weights

REPO = Path(__file__).resolve().parent.parent
CONF = str(REPO / "conf")


def model_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", [f"model={name}", "experiment=generate", *overrides]).model


@pytest.mark.parametrize("name, files", [
    ("infinity2b", ["infinity_2b_reg.pth", "infinity_vae_d32reg.pth", "flan-t5-xl"]),
    ("infinity8b", ["infinity_8b_weights", "infinity_vae_d56_f8_14_patchify.pth", "flan-t5-xl"]),
    ("var_d30", ["var_d30.pth", "vae_ch160v4096z32.pth"]),
    ("star_1024_d30", ["star_rope_d30_1024_drop_3-ar-ckpt-ep1-iter21000.pth", "vae_ch160v4096z32.pth", "CLIP"]),
])
def test_missing_official_weights_fail_fast_naming_every_file(tmp_path, name, files):
    with pytest.raises(UserError) as error:
        build_model(model_config(name, f"paths.weights_dir={tmp_path}"), "cpu")
    message = str(error.value)
    for file in files:
        assert str(tmp_path / file) in message
    assert "model.files.transformer" in message and "STAGEVAR_WEIGHTS_DIR" in message


def test_official_weights_are_checked_from_their_pickle_against_a_meta_model(tmp_path):
    # Infinity-2B's names and shapes, no tensor read: a foreign .pth is refused before any run folder exists.
    torch.save({"model.weight": torch.zeros(2)}, tmp_path / "infinity_2b_reg.pth")
    torch.save({"vae": {}}, tmp_path / "infinity_vae_d32reg.pth")
    (tmp_path / "flan-t5-xl").mkdir()
    with pytest.raises(UserError, match=r"infinity_2b_reg.pth \(model.files.transformer\) does not match Infinity "
                                        r"\(\d+ module tensors, 1 in the checkpoint\).*1 unexpected: model.weight"):
        check_model_weights(model_config("infinity2b", f"paths.weights_dir={tmp_path}"))


def test_var_and_star_files_are_checked_from_their_headers_naming_the_first_bad_tensor(tmp_path):
    from models.var import VAR, VARConfig

    with torch.device("meta"):
        official = VAR(VARConfig.of_depth(16)).state_dict()
    truncated = {name: torch.zeros(tensor.shape[:1]) for name, tensor in official.items() if name != "pos_start"}
    torch.save(truncated, tmp_path / "var_d16.pth")  # the right names (but one), shapes cut to save a 1 GB file
    torch.save({"encoder.conv_in.weight": torch.zeros(2)}, tmp_path / "vae_ch160v4096z32.pth")
    with pytest.raises(UserError, match=r"var_d16.pth \(model.files.transformer\) does not match VAR.*1 missing: "
                                        r"pos_start.*wrong shape: pos_1LC"):
        check_model_weights(model_config("var_d16", f"paths.weights_dir={tmp_path}"))
    # STAR's snapshot keeps its weights under trainer.var_wo_ddp: a flat file is refused naming the key.
    torch.save(truncated, tmp_path / "star_rope_d30_256-ar-ckpt-ep3-iter20000.pth")
    (tmp_path / "CLIP").mkdir()
    with pytest.raises(UserError, match=r"no entry 'trainer' on the way to key 'trainer.var_wo_ddp'"):
        check_model_weights(model_config("star_256_d30", f"paths.weights_dir={tmp_path}"))


def test_missing_tiny_checkpoint_names_the_files_and_how_to_get_them(tmp_path):
    with pytest.raises(UserError, match="train_tiny") as error:
        build_model(model_config("tiny", f"model.checkpoint_dir={tmp_path}"), "cpu")
    assert str(tmp_path / "transformer.safetensors") in str(error.value)


def test_unknown_resolution_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="model.pn"):
        build_model(model_config("infinity2b", "model.pn=2M", "model.random_init=true"), "cpu")


def test_a_tiny_model_file_can_be_pointed_at_elsewhere(tmp_path):
    moved = tmp_path / "elsewhere" / "my_transformer.safetensors"
    moved.parent.mkdir()
    moved.symlink_to(REPO / "checkpoints/tiny/transformer.safetensors")
    model = build_model(model_config("tiny", f"model.files.transformer={moved}"), "cpu")
    assert model.name == "tiny"
    with pytest.raises(UserError, match=f"model.files.transformer: {tmp_path / 'missing.safetensors'}"):
        build_model(model_config("tiny", f"model.files.transformer={tmp_path / 'missing.safetensors'}"), "cpu")
