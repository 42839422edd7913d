"""STAR (text-to-image VAR): the official names and shapes, the cross-scale RoPE, the cached sampler against the
block-causal training pass, the cross-attention row rule, every policy with its MACs, strict loading of the
release's nested checkpoint, and the CLIP text encoder."""

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from accel.macs import count_macs
from accel.policies import build_policy
from accel.sampler import SamplingConfig, generate
from errors import UserError
from models.checkpoint import CheckpointError, load_strict, read_state_dict
from models.infinity import SelfAttention
from models.pipeline import TextToImageModel
from models.star import STAR, STARConfig, rope_coordinates, star_rope
from models.text_encoder import CLIPTextEncoder, CLIPTextTokens, RandomCLIPFeatures
from models.vqvae import VQVAE, VQVAEConfig

from helpers import POLICIES, FlopCount, ScaleRecorder

LISTING = Path(__file__).parent / "fixtures" / "star_state_dict_keys.txt"
CONF = Path(__file__).resolve().parents[1] / "conf" / "accel"
PATCH_NUMS = (1, 2, 3, 4, 6, 8)
TEXT_CHANNELS = 16
PROMPTS = ["a red cube", "two blue spheres on a table", "a cat"]


def sections() -> dict[str, dict[str, tuple[tuple[int, ...], bool]]]:
    """The listing's sections by letter: key -> (shape, is a buffer)."""
    found: dict[str, dict] = {}
    current = None
    for line in LISTING.read_text().splitlines():
        if heading := re.match(r"######## (\w)\. ", line):
            current = found.setdefault(heading.group(1), {})
        elif current is not None and line.strip() and not line.startswith("#"):
            key, shape, _dtype, *flags = line.split("\t")
            current[key] = (tuple(int(n) for n in shape.strip("()").split(",") if n.strip()), flags == ["buffer"])
    return found


def parameter_count(name: str) -> int:
    return int(re.search(rf"{name} ([\d,]+)", LISTING.read_text()).group(1).replace(",", ""))


def built(transformer: STAR) -> dict[str, tuple[tuple[int, ...], bool]]:
    parameters = dict(transformer.named_parameters())
    return {name: (tuple(t.shape), name not in parameters) for name, t in transformer.state_dict().items()}


def small_star(ca_source: str = "per_prompt", text_encoder=None) -> TextToImageModel:
    torch.manual_seed(0)
    config = STARConfig(depth=2, embed_dim=32, num_heads=2, text_channels=TEXT_CHANNELS, codebook_size=64,
                        token_channels=8, patch_nums=PATCH_NUMS, ca_source=ca_source)
    transformer = STAR(config)
    transformer.init_weights()
    torch.nn.init.normal_(transformer.head_logits.weight, std=0.3)  # sharp, text-dependent logits
    for block in transformer.blocks:  # a cross-attention that matters, so that the row rule shows in the logits
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.2)
    vae = VQVAE(VQVAEConfig(codebook_size=64, codebook_dim=8, base_ch=8, ch_mult=(1, 2), encoder_blocks=1,
                            decoder_blocks=1, norm_groups=4, patch_nums=PATCH_NUMS))
    encoder = text_encoder or RandomCLIPFeatures(TEXT_CHANNELS)
    return TextToImageModel(f"star_small_{ca_source}", transformer.eval(), vae.eval(), encoder, config.schedule,
                            rope_grid=config.schedule[-1], device=torch.device("cpu"))


@pytest.fixture(scope="module")
def model() -> TextToImageModel:
    return small_star()


# --- names, shapes, configs -----------------------------------------------------------------------------------


def test_official_names_and_shapes_of_star_256_d16():
    expected = sections()["B"]
    assert len(expected) == 313
    with torch.device("meta"):
        transformer = STAR(STARConfig.release(256, 16))
    assert built(transformer) == expected
    assert sum(p.numel() for p in transformer.parameters()) == parameter_count("d16-256") == 274_934_272


@pytest.mark.parametrize(("resolution", "scales", "params"), [(256, 10, "d30-256 and d30-512"),
                                                              (512, 10, "d30-256 and d30-512"),
                                                              (1024, 14, "d30-1024")])
def test_official_names_and_shapes_of_star_d30(resolution, scales, params):
    listed = sections()
    block0 = {key: value for key, value in listed["C"].items() if key.startswith("blocks.0.")}
    expected = {key: value for key, value in listed["C"].items() if not key.startswith("blocks.")}
    for i in range(30):
        expected |= {key.replace("blocks.0.", f"blocks.{i}.", 1): value for key, value in block0.items()}
    if resolution == 1024:
        expected |= listed["D"]
    assert len(expected) == 579 and expected["lvl_embed.weight"][0] == (scales, 1920)
    with torch.device("meta"):
        transformer = STAR(STARConfig.release(resolution, 30))
    assert built(transformer) == expected
    assert sum(p.numel() for p in transformer.parameters()) == parameter_count(params)


def test_release_configs():
    config = STARConfig.release(1024, 30)
    assert (config.embed_dim, config.num_heads, config.head_dim, config.num_tokens) == (1920, 30, 64, 9451)
    assert config.patch_nums == (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64) and config.block_chunks == 1
    assert STARConfig.release(512, 30).num_tokens == 2240 and STARConfig.release(256, 16).num_tokens == 680
    assert STARConfig.release(256, 16).branches == ("sa", "ca", "ffn")
    with pytest.raises(ValueError, match="star_256_d16, star_256_d30, star_512_d30, star_1024_d30"):
        STARConfig.release(1024, 16)
    with pytest.raises(ValueError, match="ca_source"):
        STARConfig(ca_source="row0")


# --- RoPE -----------------------------------------------------------------------------------------------------


def test_rope_spans_every_scale_corner_to_corner():
    xs, ys = rope_coordinates((5, 5), 64.0)
    assert xs[:5].tolist() == [0, 16, 32, 48, 64] and xs[5:10].tolist() == [0, 16, 32, 48, 64]
    assert ys[::5].tolist() == [0, 16, 32, 48, 64] and ys[:5].tolist() == [0] * 5
    assert rope_coordinates((1, 1), 64.0) == (torch.zeros(1), torch.zeros(1))
    assert rope_coordinates((16, 16), 64.0)[0][[0, 1, 15]].tolist() == pytest.approx([0, 64 / 15, 64])


def test_rope_rotates_the_first_half_of_pairs_by_the_column_at_theta_powers():
    rope = star_rope((5, 5), head_dim=64, norm=64.0, theta=1e4)
    assert rope.cos.shape == (1, 1, 25, 32)
    frequencies = 1e4 ** (-torch.arange(16, dtype=torch.float64) / 16)
    column, row = (torch.arange(25) % 5).double() * 16, (torch.arange(25) // 5).double() * 16
    angles = torch.cat((column[:, None] * frequencies, row[:, None] * frequencies), dim=1)
    torch.testing.assert_close(rope.cos[0, 0].double(), angles.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rope.sin[0, 0].double(), angles.sin(), atol=1e-5, rtol=0)
    # The rotation is the official complex one: dims (2i, 2i+1) as a + ib, times e^(i angle).
    x = torch.randn(2, 3, 25, 64)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 25, 32, 2)) * torch.polar(
        torch.ones(25, 32), angles.float())).flatten(-2)
    torch.testing.assert_close(rope.rotate(x), expected, atol=1e-5, rtol=0)
    single = star_rope((1, 1), 64, 64.0, 1e4)
    assert torch.equal(single.rotate(x[:, :, :1]), x[:, :, :1])


def test_rope_before_the_norm_as_the_official_code_equals_ours_to_fp32_rounding():
    """The official self-attention rotates q, k and then L2-normalises and scales them; Infinity's (reused) normalises
    first. A rotation keeps the norm, so they agree to rounding."""
    torch.manual_seed(0)
    attention = SelfAttention(128, 2)
    for parameter in (attention.q_bias, attention.v_bias, attention.scale_mul_1H11):
        torch.nn.init.normal_(parameter)
    x, rope = torch.randn(2, 25, 128), star_rope((5, 5), 64, 64.0, 1e4)
    ours = attention(x, rope, None, 0, None)
    bias = torch.cat((attention.q_bias, attention.zero_k_bias, attention.v_bias))
    q, k, v = F.linear(x, attention.mat_qkv.weight, bias).view(2, 25, 3, 2, 64).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = rope.rotate(q), rope.rotate(k)
    q = F.normalize(q, dim=-1) * attention.scale_mul_1H11.clamp(max=torch.log(torch.tensor(100.0))).exp()
    out = F.scaled_dot_product_attention(q, F.normalize(k, dim=-1), v, scale=1.0)
    official = attention.proj(out.transpose(1, 2).reshape(2, 25, 128))
    assert (ours - official).abs().max() <= 2e-6


def test_the_model_rope_ignores_the_rope_grid(model):
    transformer = model.transformer
    assert torch.equal(transformer.rope((4, 4), (8, 8)).cos, transformer.rope((4, 4), (4, 4)).cos)
    assert torch.equal(transformer.rope((4, 4), (8, 8)).cos, star_rope((4, 4), 16, 64.0, 1e4).cos)


# --- the sampler against teacher forcing -------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [SamplingConfig(cfg=1.0, tau=1.0, top_k=0, top_p=0.0),  # no CFG rows
                                      SamplingConfig(cfg=3.0, cfg_ramp=True, tau=1.0, top_k=0, top_p=0.0)])
def test_cached_sampler_logits_equal_the_block_causal_training_pass(model, sampling):
    recorder = ScaleRecorder()
    generate(model, PROMPTS, sampling, seed=0, observers=[recorder], decode=False)
    codes = [record.codes for record in recorder.records]
    guided = sampling.guides(len(model.schedule))
    assert recorder.records[1].inputs.shape[0] == (2 if guided else 1) * len(PROMPTS)
    with torch.no_grad():
        inputs = model.vae.teacher_forcing_inputs(codes, model.schedule)
        condition = model.transformer.condition(model.text_encoder.encode(PROMPTS), with_null=guided)
        full = model.transformer(inputs.repeat(2 if guided else 1, 1, 1), condition)
    if guided:
        B, starts = len(PROMPTS), [0]
        for h, w in model.schedule:
            starts.append(starts[-1] + h * w)
        scales = [slice(start, end) for start, end in zip(starts, starts[1:])]
        full = torch.cat([cond * full[:B, scale] + null * full[B:, scale]
                          for (cond, null), scale in zip(sampling.guidance(len(model.schedule)), scales)], dim=1)
    cached = torch.cat([record.logits for record in recorder.records], dim=1)
    assert cached.shape == full.shape == (len(PROMPTS), 1 + 4 + 9 + 16 + 36 + 64, 64)
    assert (cached - full).abs().max() <= 1e-4


# --- the cross-attention row rule --------------------------------------------------------------------------------


def branch_outputs(transformer: STAR, condition, x, grid):
    """Every residual branch's output in block 0, as a router sees it."""
    outputs = {}

    def record(name, layer, tokens, rope, branch):
        outputs[name] = branch(tokens, rope)
        return outputs[name]

    transformer.blocks[0](x, condition, transformer.rope(grid, grid), None, record)
    return outputs


def own_row_twin(model: TextToImageModel) -> STAR:
    twin = STAR(dataclasses.replace(model.transformer.config, ca_source="own_row"))
    twin.load_state_dict(model.transformer.state_dict())
    return twin.eval()


def test_at_batch_1_with_cfg_the_null_row_takes_the_prompt_rows_cross_attention(model):
    encoded = model.text_encoder.encode(["a red cube"])
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        ours = branch_outputs(model.transformer, model.transformer.condition(encoded, with_null=True), x, (3, 3))
        twin = own_row_twin(model)
        per_row = branch_outputs(twin, twin.condition(encoded, with_null=True), x, (3, 3))
    assert torch.equal(ours["ca"][1], ours["ca"][0])  # the official block's cross_attn(...)[0]
    torch.testing.assert_close(ours["ca"][0], per_row["ca"][0], atol=1e-6, rtol=0)  # the prompt row's own
    assert (per_row["ca"][1] - per_row["ca"][0]).abs().max() > 1e-2  # what the null row's own would have been


def test_after_a_cfg_branch_is_dropped_null_rows_cross_attend_to_their_prompts(model):
    transformer = model.transformer
    encoded = model.text_encoder.encode(PROMPTS[:2])
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        condition = transformer.condition(encoded, with_null=True)
        prompts, nulls = condition.rows(slice(0, 2)), condition.rows(slice(2, 4))
        torch.testing.assert_close(branch_outputs(transformer, nulls, x, (2, 2))["ca"],
                                   branch_outputs(transformer, prompts, x, (2, 2))["ca"], atol=1e-6, rtol=0)
        null_start, prompt_start = transformer.start_tokens(nulls), transformer.start_tokens(prompts)
        assert torch.equal(null_start[0], null_start[1])  # both CLIP("")'s pooled vector
        assert (null_start - prompt_start).abs().max() > 1e-3
        twin = own_row_twin(model)
        twin_condition = twin.condition(encoded, with_null=True)
        assert (branch_outputs(twin, twin_condition.rows(slice(2, 4)), x, (2, 2))["ca"]
                - branch_outputs(twin, twin_condition.rows(slice(0, 2)), x, (2, 2))["ca"]).abs().max() > 1e-2
        # A tensor index keeps a source that stays, in its new place.
        assert condition.rows(torch.tensor([3, 1])).ca_source == (1, 1)


STAR_GUIDANCE = SamplingConfig(cfg=4.5, cfg_ramp=True, tau=1.0, top_k=0, top_p=0.0)  # sample.py's cfg, no filter


def guided_logits(model: TextToImageModel, prompts: list[str], codes, policy=None) -> list[torch.Tensor]:
    recorder = ScaleRecorder()
    sampling = STAR_GUIDANCE
    generate(model, prompts, sampling, seed=1, policy=policy, observers=[recorder], decode=False, forced_codes=codes)
    return [record.logits for record in recorder.records]


@pytest.mark.parametrize("ca_source", ["per_prompt", "own_row"])
@pytest.mark.parametrize("accel", [None, "cfg_drop"])
def test_a_batch_of_prompts_gives_each_prompts_batch_1_logits(ca_source, accel):
    model = small_star(ca_source)
    policy = None if accel is None else build_policy(
        OmegaConf.merge(OmegaConf.load(CONF / f"{accel}.yaml"), {"refinement_start": -2}), model)
    prompts = PROMPTS[:2]
    codes = [torch.randint(0, 64, (2, pn, pn), generator=torch.Generator().manual_seed(k))
             for k, pn in enumerate(PATCH_NUMS)]
    batch = guided_logits(model, prompts, codes, policy)
    # fp32 rounding of each row's logits (about 1e-6 here, batch shapes change it) grows with the guidance weights,
    # up to 5.5 and -4.5 at the last scale: 1e-5 per unit of weight.
    tolerances = [1e-5 * (abs(cond) + abs(null)) for cond, null in STAR_GUIDANCE.guidance(len(PATCH_NUMS))]
    for b, prompt in enumerate(prompts):
        alone = guided_logits(model, [prompt], [c[b : b + 1] for c in codes], policy)
        for k, tolerance in enumerate(tolerances):
            assert (batch[k][b] - alone[k][0]).abs().max() <= tolerance


def test_own_row_cross_attention_changes_the_guided_logits():
    codes = [torch.randint(0, 64, (1, pn, pn), generator=torch.Generator().manual_seed(k))
             for k, pn in enumerate(PATCH_NUMS)]
    ours = guided_logits(small_star("per_prompt"), PROMPTS[:1], codes)
    per_row = guided_logits(small_star("own_row"), PROMPTS[:1], codes)
    assert torch.equal(ours[0], per_row[0])  # no guidance at the first scale (ramp), and the prompt rows agree
    assert (ours[-1] - per_row[-1]).abs().max() > 1e-2


# --- policies and MACs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "overrides"), POLICIES)
def test_every_policy_runs_on_star_and_its_macs_equal_the_flop_counter(model, monkeypatch, name, overrides):
    policy = build_policy(OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), overrides), model)
    flops = FlopCount(model.transformer, monkeypatch)
    with sdpa_kernel(SDPBackend.MATH):
        result = generate(model, PROMPTS, SamplingConfig(cfg=4.5, cfg_ramp=True, tau=1.0), seed=0, policy=policy)
    assert result.images.shape == (3, 16, 16, 3)
    text_length = model.text_length(PROMPTS)
    assert text_length == 77
    macs = count_macs(model.transformer.config, model.schedule, policy, batch_size=3, text_length=text_length)
    assert 2 * macs.total == flops.total


def test_text_kv_projection_is_counted_at_every_scale():
    config = STARConfig.release(256, 16)
    text = config.branch_macs("ca", tokens=1, kv_length=1, text_length=77)
    no_text = config.branch_macs("ca", tokens=1, kv_length=1, text_length=0)
    assert text - no_text == 2 * 1024 * 1024 * 77 + 2 * 1024 * 77  # the text's K/V, then QK^T and AV over it
    assert config.scale_macs(256) == 4096 * 1024 * 256


# --- loading -----------------------------------------------------------------------------------------------------


def test_strict_loading_of_the_release_checkpoint_layout(tmp_path):
    source = small_star().transformer
    weights = source.state_dict()
    path = tmp_path / "star_rope_small-ar-ckpt.pth"
    torch.save({"epoch": 1, "iter": 2, "trainer": {"var_wo_ddp": weights, "var_opt": {}}}, path)
    target = small_star().transformer
    torch.nn.init.zeros_(target.head_logits.weight)
    load_strict(target, read_state_dict(path, key="trainer.var_wo_ddp"), source=str(path))
    assert all(torch.equal(tensor, weights[name]) for name, tensor in target.state_dict().items())
    truncated = {name: tensor for name, tensor in weights.items() if name != "blocks.1.cross_attn.mat_kv.weight"}
    with pytest.raises(CheckpointError, match=r"blocks\.1\.cross_attn\.mat_kv\.weight"):
        load_strict(target, truncated, source=str(path))


# --- the CLIP text encoder ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIP text model and a character-level BPE tokenizer, saved as a diffusers-style folder."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {**{c: i for i, c in enumerate(letters)}, **{f"{c}</w>": 26 + i for i, c in enumerate(letters)}}
    vocab |= {"re": 52, "red</w>": 53, "<|startoftext|>": 54, "<|endoftext|>": 55}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=TEXT_CHANNELS, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=54, eos_token_id=55, pad_token_id=55)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def clip(clip_folder) -> CLIPTextEncoder:
    return CLIPTextEncoder(clip_folder)


def test_clip_encodes_77_tokens_a_mask_and_the_pooled_end_of_text(clip):
    tokens = clip.encode(["a red cube", "", "cat"])
    assert isinstance(tokens, CLIPTextTokens) and clip.channels == TEXT_CHANNELS
    assert tokens.features.shape == (3, 77, TEXT_CHANNELS) and tokens.features.dtype == torch.float32
    assert tokens.pooled.shape == (3, TEXT_CHANNELS) and tokens.mask.shape == (3, 77)
    # start, a, red (one merged token), c, u, b, e, end; "" is start and end
    assert tokens.mask.sum(1).tolist() == tokens.lengths.tolist() == [8, 2, 5]
    assert tokens.mask[0, :8].all() and not tokens.mask[0, 8:].any()
    # No projection: the pooled output is the final hidden state at the end-of-text token.
    for row, length in enumerate(tokens.lengths.tolist()):
        torch.testing.assert_close(tokens.pooled[row], tokens.features[row, length - 1], atol=1e-6, rtol=0)
    assert tokens.null.mask.sum().item() == 2
    torch.testing.assert_close(tokens.null.pooled[0], tokens.pooled[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(clip.encode(["cat"]).features[0], tokens.features[2], atol=1e-5, rtol=0)


def test_clip_truncates_to_77_tokens_with_a_warning(clip, caplog):
    with caplog.at_level(logging.WARNING, logger="models.text_encoder"):
        tokens = clip.encode(["abcdefghij" * 10])
    assert tokens.lengths.tolist() == [77] and "102 to 77" in caplog.text


def test_a_missing_clip_folder_names_the_folder_and_the_config_key(tmp_path):
    with pytest.raises(UserError, match=r"nowhere.*model\.files\.text_encoder"):
        CLIPTextEncoder(tmp_path / "nowhere")
    (tmp_path / "half" / "tokenizer").mkdir(parents=True)
    with pytest.raises(UserError, match=r"half \(config key `model\.files\.text_encoder`\) lacks text_encoder/"):
        CLIPTextEncoder(tmp_path / "half")


def test_clip_drives_star_through_the_sampler(clip):
    model = small_star(text_encoder=clip)
    sampling = SamplingConfig(cfg=4.5, cfg_ramp=True, tau=1.0, top_k=600, top_p=0.8)
    first = generate(model, ["a red cube", "a cat"], sampling, seed=3)
    again = generate(model, ["a red cube", "a cat"], sampling, seed=3)
    assert first.images.shape == (2, 16, 16, 3) and torch.equal(first.images, again.images)
    assert model.text_length(["a cat"]) == 77


def test_random_clip_features_read_a_prompt_alike_in_any_batch():
    encoder = RandomCLIPFeatures(channels=8)
    tokens = encoder.encode(["a red cube", "a cat"])
    assert tokens.features.shape == (2, 77, 8) and tokens.lengths.tolist() == [5, 4]
    assert torch.equal(encoder.encode(["a cat"]).features[0], tokens.features[1])
    assert tokens.null.lengths.tolist() == [2]


def test_a_fixed_seed_reproduces_the_greedy_codes_of_a_seeded_random_star():
    # Pins the whole path (RoPE, cosine self- and cross-attention, the row rule, logit norm, phi, the CFG ramp).
    # Greedy (top-k 1) and coarse scales only, so no near-tie depends on the CPU's vector width.
    result = generate(small_star(), ["a red cube", "two cats"],
                      SamplingConfig(cfg=1.5, cfg_ramp=True, tau=1.0, top_k=1, top_p=0.0), seed=0, decode=False)
    codes = torch.cat([scale_codes.flatten() for scale_codes in result.codes[:4]])
    assert codes[:10].tolist() == [25, 25, 22, 58, 58, 58, 60, 60, 60, 60]
    assert hashlib.sha256(codes.numpy().astype("int64").tobytes()).hexdigest() == (
        "6d0e9a547d558844f5e076e4b4748043df7c1489d4d6089ab5f2608002329bab")
