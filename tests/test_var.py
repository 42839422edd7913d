"""Class-conditional VAR: the official names and shapes, the math of the cached sampler against the block-causal
training pass, the CFG ramp, class prompts, strict loading, and every policy through the one scale loop."""

import hashlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from accel.macs import count_macs
from accel.policies import build_policy
from accel.sampler import Continuations, SamplingConfig, generate
from analysis.probe import ScaleTrace
from errors import UserError
from models.checkpoint import CheckpointError, load_strict
from models.class_labels import ImageNetClassLabels
from models.pipeline import TextToImageModel
from models.var import VAR, VARConfig
from models.vqvae import VQVAE, VQVAEConfig

from helpers import POLICIES, FlopCount, ScaleRecorder
from listings import listing_section

LISTING = Path(__file__).parent / "fixtures" / "var_state_dict_keys.txt"
CONF = Path(__file__).resolve().parents[1] / "conf" / "accel"
PATCH_NUMS = (1, 2, 3, 4, 6, 8)
CLASSES = ["golden retriever", "7", "tench"]


def listing(section: str) -> tuple[dict[str, tuple[int, ...]], int]:
    entries, params = listing_section(LISTING, section)
    return {key: shape for key, (shape, _) in entries.items()}, params


def small_var(shared_aln: bool = False) -> TextToImageModel:
    torch.manual_seed(0)
    config = VARConfig(depth=3, embed_dim=48, num_heads=3, codebook_size=64, token_channels=8, patch_nums=PATCH_NUMS,
                       shared_aln=shared_aln)
    transformer = VAR(config)
    transformer.init_weights()
    torch.nn.init.normal_(transformer.head.weight, std=0.3)  # sharp logits
    torch.nn.init.normal_(transformer.class_emb.weight, std=1.0)  # an AdaLN that depends on the class
    vae = VQVAE(VQVAEConfig(codebook_size=64, codebook_dim=8, base_ch=8, ch_mult=(1, 2), encoder_blocks=1,
                            decoder_blocks=1, norm_groups=4, patch_nums=PATCH_NUMS))
    return TextToImageModel("var_small", transformer.eval(), vae.eval(), ImageNetClassLabels(), config.schedule,
                            rope_grid=config.schedule[-1], device=torch.device("cpu"))


@pytest.fixture(scope="module")
def model() -> TextToImageModel:
    return small_var()


def test_official_names_and_shapes_of_var_d16():
    expected, params = listing("VAR-d16 transformer")
    with torch.device("meta"):
        transformer = VAR(VARConfig.of_depth(16))
    built = {name: tuple(tensor.shape) for name, tensor in transformer.state_dict().items()}
    assert built == expected
    assert sum(p.numel() for p in transformer.parameters()) == params


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_released_widths(depth):
    config = VARConfig.of_depth(depth)
    assert (config.embed_dim, config.num_heads, config.mlp_hidden, config.num_tokens) == (64 * depth, depth, 256 * depth, 680)


def test_d36_is_512_px_with_shared_adaln():
    config = VARConfig.of_depth(36)
    assert config.shared_aln and config.patch_nums[-1] == 32 and config.embed_dim == 2304
    with torch.device("meta"):
        names = VAR(config).state_dict().keys()
    assert "shared_ada_lin.1.weight" in names and "blocks.0.ada_gss" in names and "blocks.0.ada_lin.1.weight" not in names


def test_block_causal_mask_and_token_scales():
    transformer = small_var().transformer
    scale_of_token = transformer.lvl_1L[0]
    assert scale_of_token.tolist()[:6] == [0, 1, 1, 1, 1, 2]
    mask = transformer.attn_bias_for_masking[0, 0]
    assert mask[0, 1] == -torch.inf and mask[1, 0] == 0 and mask[1, 4] == 0 and mask[4, 5] == -torch.inf


@pytest.mark.parametrize("shared_aln", [False, True])
def test_cached_sampler_logits_equal_the_block_causal_training_pass(shared_aln):
    model = small_var(shared_aln)
    recorder = ScaleRecorder()
    sampling = SamplingConfig(cfg=1.0, tau=1.0, top_k=0, top_p=0.0)
    generate(model, CLASSES, sampling, seed=0, observers=[recorder], decode=False)
    codes = [record.codes for record in recorder.records]
    with torch.no_grad():
        inputs = model.vae.teacher_forcing_inputs(codes, model.schedule)
        condition = model.transformer.condition(model.text_encoder.encode(CLASSES), with_null=False)
        full = model.transformer(inputs, condition)
    cached = torch.cat([record.logits for record in recorder.records], dim=1)
    assert (cached - full).abs().max() <= 1e-4


def test_cfg_ramp_is_vars_guidance():
    weights = SamplingConfig(cfg=1.5, cfg_ramp=True).guidance(10)
    assert weights[0] == (1.0, -0.0) and weights[-1] == (2.5, -1.5)
    assert weights[3] == (1 + 1.5 * 3 / 9, -(1.5 * 3 / 9))
    assert SamplingConfig(cfg=0.0, cfg_ramp=True).guides(10) is False
    with pytest.raises(ValueError, match="one cfg value"):
        SamplingConfig(cfg=[1.0, 2.0], cfg_ramp=True).guidance(2)


def test_guidance_changes_the_images_and_the_class_matters(model):
    sampling = SamplingConfig(cfg=4.0, cfg_ramp=True, tau=1.0, top_k=900, top_p=0.96)
    first = generate(model, ["golden retriever", "tench"], sampling, seed=3)
    again = generate(model, ["golden retriever", "tench"], sampling, seed=3)
    other = generate(model, ["tench", "tench"], sampling, seed=3)
    assert torch.equal(first.images, again.images)
    assert first.images.shape == (2, 16, 16, 3) and first.codes[-1].shape == (2, 8, 8)
    assert not torch.equal(first.codes[-1][0], other.codes[-1][0])


def test_class_prompts_take_indices_and_names():
    labels = ImageNetClassLabels()
    assert labels.encode(["207", "Golden Retriever", " tench "]).tolist() == [207, 207, 0]
    with pytest.raises(UserError, match="did you mean 'golden retriever'"):
        labels.encode(["golden retreiver"])
    with pytest.raises(UserError, match="outside 0..999"):
        labels.encode(["1000"])


def test_strict_loading_names_the_first_bad_tensor(tmp_path):
    source = small_var().transformer
    path = tmp_path / "var_small.pth"
    weights = source.state_dict()
    torch.save(weights, path)
    target = small_var().transformer
    torch.nn.init.zeros_(target.head.weight)
    load_strict(target, torch.load(path), source=str(path))
    assert torch.equal(target.head.weight, source.head.weight)
    truncated = {name: tensor for name, tensor in weights.items() if name != "blocks.1.attn.mat_qkv.weight"}
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.mat_qkv\.weight"):
        load_strict(target, truncated, source=str(path))


@pytest.mark.parametrize(("name", "overrides"), POLICIES)
def test_every_policy_runs_on_var_and_its_macs_equal_the_flop_counter(model, monkeypatch, name, overrides):
    policy = build_policy(OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), overrides), model)
    flops = FlopCount(model.transformer, monkeypatch)
    with sdpa_kernel(SDPBackend.MATH):
        result = generate(model, CLASSES, SamplingConfig(cfg=1.5, cfg_ramp=True, tau=1.0), seed=0, policy=policy)
    assert result.images.shape == (3, 16, 16, 3)
    macs = count_macs(model.transformer.config, model.schedule, policy, batch_size=3, text_length=0)
    assert 2 * macs.total == flops.total


def test_the_stage_probe_trace_and_continuations_run_on_var(model):
    sampling = SamplingConfig(cfg=1.5, cfg_ramp=True, tau=1.0, top_k=900, top_p=0.96)
    trace = ScaleTrace(model.vae, rank_blocks=[1], chunk_starts=[0])
    forks = Continuations(after=[2, 4], seeds=[None, 11])
    result = generate(model, CLASSES, sampling, seed=5, observers=[trace], continuations=forks)
    assert len(trace.partial_images) == len(model.schedule) and torch.equal(trace.partial_images[-1], result.images)
    assert not torch.equal(trace.partial_images[1], result.images)
    # A fork with the run's own generator state finishes as the run did; another seed changes the image.
    for scale in (2, 4):
        same, other = result.continuations[scale]
        assert torch.equal(same, result.images) and not torch.equal(other, result.images)


def test_a_fixed_seed_reproduces_the_greedy_codes_of_a_seeded_random_var():
    # Pins the whole path (class AdaLN, attention, head, phi, area inputs, the CFG ramp): a change to any of them
    # moves the codes. Greedy (top-k 1) and coarse scales only, so no near-tie depends on the CPU's vector width.
    result = generate(small_var(), CLASSES, SamplingConfig(cfg=1.5, cfg_ramp=True, tau=1.0, top_k=1, top_p=0.0),
                      seed=0, decode=False)
    codes = torch.cat([scale_codes.flatten() for scale_codes in result.codes[:4]])
    assert codes[:8].tolist() == [36, 17, 58, 30, 50, 63, 50, 30]
    assert hashlib.sha256(codes.numpy().astype("int64").tobytes()).hexdigest() == (
        "ead958e5eefe772e8f4240f3a1e8ed97d5a80ea2624ecfc7d0b5df1250d8dae6")
