import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from errors import UserError
from models.bsq_vae import BSQVAE, BSQVAEConfig, vae_checkpoint_name
from models.checkpoint import CheckpointError, check_matches, load_strict, read_state_dict, save_safetensors


class Small(nn.Module):
    """Parameters, persistent buffers (one int64), a non-persistent buffer, and an aliased submodule."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.head = nn.Linear(4, 2)
        self.head_alias = self.head


def small(seed: int) -> Small:
    torch.manual_seed(seed)
    module = Small()
    module.norm.running_mean.normal_()
    return module


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def write_sharded(folder: Path, state_dict: dict, suffix: str) -> None:
    names = sorted(state_dict)
    shards = {f"model-0000{i}-of-00002{suffix}": names[i - 1 :: 2] for i in (1, 2)}
    for shard, shard_names in shards.items():
        part = {name: state_dict[name].clone() for name in shard_names}
        if suffix == ".safetensors":
            save_safetensors(part, folder / shard, {"format": "pt"})
        else:
            torch.save(part, folder / shard)
    index = {"metadata": {}, "weight_map": {name: shard for shard, ns in shards.items() for name in ns}}
    (folder / f"model{suffix}.index.json").write_text(json.dumps(index))


LAYOUTS = ["pth", "safetensors", "sharded-safetensors", "sharded-bin", "index-file"]


def write_in(layout: str, folder: Path, state_dict: dict) -> Path:
    """`state_dict` saved in one of the LAYOUTS; the path to read it from."""
    if layout == "pth":
        path = folder / "model.pth"
        torch.save(state_dict, path)
    elif layout == "safetensors":
        path = folder / "model.safetensors"
        save_safetensors(state_dict, path, {"step": "3"})
    else:
        path = folder / "shards"
        path.mkdir()
        write_sharded(path, state_dict, ".bin" if layout == "sharded-bin" else ".safetensors")
        if layout == "index-file":
            path = next(path.glob("*.index.json"))
    return path


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_in_every_format(tmp_path, layout):
    source, target = small(0), small(1)
    path = write_in(layout, tmp_path, source.state_dict())
    load_strict(target, read_state_dict(path), source=str(path))
    assert_same_tensors(source, target)
    assert target.head is target.head_alias


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_header_gives_the_names_and_shapes_without_the_data(tmp_path, layout):
    state_dict = small(0).state_dict()
    header = read_state_dict(write_in(layout, tmp_path, state_dict), header_only=True)
    assert {name: value.shape for name, value in header.items()} == {name: v.shape for name, v in state_dict.items()}
    assert all(value.is_meta for value in header.values())
    with torch.device("meta"):
        skeleton = Small()
    check_matches(skeleton, header, source="model")  # what a run checks before it starts
    header["linear.weight"] = torch.empty(4, 5, device="meta")
    with pytest.raises(CheckpointError, match=r"wrong shape: linear.weight: checkpoint \(4, 5\) vs module \(4, 3\)"):
        check_matches(skeleton, header, source="model")


def test_save_safetensors_keeps_metadata(tmp_path):
    path = tmp_path / "sub" / "model.safetensors"
    save_safetensors(small(0).state_dict(), path, {"config": "{}", "step": "7"})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"config": "{}", "step": "7"}


def test_nested_and_dotted_keys(tmp_path):
    source, target = small(0), small(1)
    path = tmp_path / "ar-ckpt.pth"
    torch.save({"epoch": 3, "trainer": {"gpt_fsdp": source.state_dict(), "gpt_fsdp_opt": {}}}, path)
    load_strict(target, read_state_dict(path, key="trainer.gpt_fsdp"), source=str(path))
    assert_same_tensors(source, target)
    with pytest.raises(CheckpointError, match=r"no entry 'vae'.*found: epoch, trainer"):
        read_state_dict(path, key="vae")
    with pytest.raises(CheckpointError, match=r"epoch \(int\).*pass `key`"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match=r"no entry 'x' on the way to key 'epoch.x'; found: int"):
        read_state_dict(path, key="epoch.x")


def test_missing_file_names_path_and_config_key(tmp_path):
    path = tmp_path / "nowhere" / "infinity_vae_d32reg.pth"
    with pytest.raises(UserError) as err:
        read_state_dict(path, config_key="model.vae.path")
    assert str(path) in str(err.value) and "model.vae.path" in str(err.value)


@pytest.mark.parametrize("header_only", [False, True])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_refused(tmp_path, suffix, header_only):
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_safetensors(small(0).state_dict(), path, {})
    else:
        torch.save(small(0).state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 10])  # only the end of the data is lost
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read checkpoint {path} (set by config key `m.f`)")):
        read_state_dict(path, config_key="m.f", header_only=header_only)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"just some notes\n", "cannot read checkpoint"),
        ([1, 2, 3], "expected a dict of tensors, found list"),
        ({"args": argparse.Namespace(lr=1.0)}, "pickled Python objects.*argparse.Namespace"),
    ],
)
def test_foreign_files_are_refused(tmp_path, content, message):
    path = tmp_path / "model.pth"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)


def test_shard_listed_in_index_but_absent(tmp_path):
    write_sharded(tmp_path, small(0).state_dict(), ".safetensors")
    next(tmp_path.glob("model-00002*")).unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("linear.bias"), r"1 missing: linear.bias \(4,\)"),
        (lambda sd: sd.update({"extra.weight": torch.zeros(5)}), r"1 unexpected: extra.weight \(5,\)"),
        (
            lambda sd: sd.update({"linear.weight": torch.zeros(4, 5)}),
            r"wrong shape: linear.weight: checkpoint \(4, 5\) vs module \(4, 3\)",
        ),
        (lambda sd: sd.pop("norm.num_batches_tracked"), "missing: norm.num_batches_tracked"),
    ],
)
def test_mismatches_are_refused_and_nothing_is_loaded(edit, message):
    state_dict = small(0).state_dict()
    edit(state_dict)
    target, untouched = small(1), small(1)
    with pytest.raises(CheckpointError, match=message) as err:
        load_strict(target, state_dict, source="bad.pth")
    assert str(err.value).startswith("bad.pth ")
    assert_same_tensors(target, untouched)


def test_ignored_names_may_be_absent_on_either_side():
    source, target = small(0), small(1)
    state_dict = source.state_dict()
    state_dict["head.zero_k_bias"] = torch.zeros(2)
    del state_dict["norm.running_var"]
    load_strict(target, state_dict, source="x.pth", ignore=("*.zero_k_bias", "norm.running_*"))
    assert torch.equal(target.norm.running_mean, source.norm.running_mean)  # ignored but present: loaded
    assert torch.equal(target.norm.running_var, torch.ones(4))  # ignored and absent: kept


def test_one_name_of_an_alias_is_enough():
    source, target = small(0), small(1)
    state_dict = {k: v for k, v in source.state_dict().items() if not k.startswith("head_alias.")}
    load_strict(target, state_dict, source="x.pth")
    assert torch.equal(target.head_alias.weight, source.head.weight)


def test_meta_module_is_materialised_in_its_own_dtype():
    source = small(0).double()
    with torch.device("meta"):
        target = Small()
    load_strict(target, source.state_dict(), source="x.pth")
    assert target.linear.weight.dtype == torch.float32 and not target.linear.weight.is_meta
    assert target.norm.num_batches_tracked.dtype == torch.int64
    torch.testing.assert_close(target.linear.weight, source.linear.weight.float())
    assert target.head is target.head_alias


def test_values_are_cast_into_the_module_dtype():
    source, target = small(0).half(), small(1)
    load_strict(target, source.state_dict(), source="x.pth")
    assert target.linear.weight.dtype == torch.float32
    assert torch.equal(target.linear.weight, source.linear.weight.float())


def test_rename_collision_is_refused():
    state_dict = small(0).state_dict()
    with pytest.raises(CheckpointError, match="two checkpoint tensors map to the module name 'linear.weight'"):
        load_strict(small(1), state_dict, source="x.pth", rename=lambda name: name.replace("bias", "weight"))


TINY_VAE = BSQVAEConfig(codebook_dim=4, base_ch=8, ch_mult=(1, 2), norm_groups=4)


@pytest.mark.parametrize("spelling", ["wrapped", "plain"])
def test_vae_loads_from_both_spellings(tmp_path, spelling):
    torch.manual_seed(0)
    source = BSQVAE(TINY_VAE)
    state_dict = source.state_dict()
    if spelling == "plain":  # the VQGAN spelling, under ckpt['vae'] as in the official file
        state_dict = {re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v for k, v in state_dict.items()}
        assert "encoder.conv_in.weight" in state_dict and "encoder.down.0.downsample.conv.weight" in state_dict
        path, key = tmp_path / "vae.pth", "vae"
        torch.save({"vae": state_dict}, path)
    else:
        path, key = tmp_path / "vae.safetensors", None
        save_safetensors(state_dict, path, {})
    target = BSQVAE(TINY_VAE)
    load_strict(target, read_state_dict(path, key=key), source=str(path), rename=vae_checkpoint_name)
    assert_same_tensors(source, target)
