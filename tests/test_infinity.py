"""The Infinity transformer: official names / shapes / sizes, RoPE details, and cached == full-sequence math."""

from pathlib import Path

import pytest
import torch

from models.infinity import Infinity, InfinityConfig, KVCache, grid_positions
from models.schedules import full_template, infinity_schedule

LISTING = Path(__file__).parent / "fixtures" / "infinity_state_dict_keys.txt"


def official_listing(section: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape from the listing of the official modules (kept as a fixture)."""
    entries, inside = {}, False
    for line in LISTING.read_text().splitlines():
        if line.startswith("## "):
            inside = section in line
        elif inside and line.strip():
            key, rest = line.split(" (", 1)
            entries[key] = tuple(int(v) for v in rest.split(")")[0].split(",") if v.strip())
    return entries


def meta_model(config: InfinityConfig) -> Infinity:
    with torch.device("meta"):
        return Infinity(config)


def test_infinity_2b_matches_official_names_shapes_and_size():
    model = meta_model(InfinityConfig.infinity_2b())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_listing("Infinity-2B")
    assert sum(p.numel() for p in model.parameters()) == 2_204_564_032


def test_infinity_8b_matches_official_names_shapes_and_size():
    model = meta_model(InfinityConfig.infinity_8b())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    listed = official_listing("Infinity-8B")  # non-block keys and block 0; the other blocks repeat it
    block0 = {k: v for k, v in listed.items() if k.startswith("block_chunks.0.module.0.")}
    expected = {k: v for k, v in listed.items() if not k.startswith("block_chunks.")}
    for i in range(40):
        prefix = f"block_chunks.{i // 5}.module.{i % 5}."
        expected.update({prefix + k.removeprefix("block_chunks.0.module.0."): v for k, v in block0.items()})
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == 8_375_791_824


def test_rope_positions_are_normalised_to_the_final_grid_with_half_to_even_rounding():
    ys, xs = grid_positions((6, 6), (64, 64))
    assert ys.view(6, 6)[:, 0].tolist() == [0, 11, 21, 32, 43, 53]
    assert torch.equal(xs.view(6, 6)[0], ys.view(6, 6)[:, 0])
    ys, _ = grid_positions((2, 4), (45, 90))  # 0.5 template: 1 * 45 / 2 = 22.5 -> 22 (half to even)
    assert ys.tolist() == [0, 0, 0, 0, 22, 22, 22, 22]


def test_schedules_follow_the_official_templates():
    assert infinity_schedule(1.0, "0.06M") == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]
    assert len(infinity_schedule(1.0, "1M")) == 13 and full_template(1.0)[-1] == (64, 64)
    assert full_template(2.0)[-1] == (90, 45)  # tall images use the transposed wide template
    assert full_template(0.52)[-1] == (45, 90)  # nearest template


# The official template list is 1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0,
# 0.333, and the first nearest in that order wins: on an exact tie the ratio nearer 1:1 (listed first).
@pytest.mark.parametrize(
    ("h_div_w", "tied", "final_grid"),
    [
        (0.45, (0.4, 0.5), (45, 90)),  # the 0.5 template
        (0.5355, (0.5, 0.571), (48, 84)),  # 0.571
        (0.775, (0.75, 0.8), (56, 70)),  # 0.8
        (0.9, (0.8, 1.0), (64, 64)),  # 1.0
    ],
)
def test_an_exact_tie_between_templates_goes_to_the_one_the_official_list_has_first(h_div_w, tied, final_grid):
    assert abs(tied[0] - h_div_w) == abs(tied[1] - h_div_w)  # a tie in float64, as the official argmin sees it
    assert full_template(h_div_w)[-1] == final_grid


def small_config() -> InfinityConfig:
    return InfinityConfig(depth=4, embed_dim=64, num_heads=4, text_channels=32, text_maxlen=16,
                          bits_per_token=8, block_chunks=2)


@pytest.fixture
def small_model() -> Infinity:
    torch.manual_seed(0)
    model = Infinity(small_config())
    model.init_weights()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a zero head would make every logit equal
    return model.eval()


def test_kv_cached_scales_equal_the_block_causal_full_sequence(small_model):
    schedule, rope_grid = [(1, 1), (2, 2), (3, 3), (4, 4)], (4, 4)
    torch.manual_seed(1)
    features, lengths = torch.randn(2, 5, 32), torch.tensor([5, 3])
    text = small_model.encode_text(features, lengths, with_null=True)
    inputs = torch.randn(4, sum(h * w for h, w in schedule[1:]), 8)
    with torch.no_grad():
        full = small_model(inputs, text, schedule, rope_grid)
        cache, cached, start = KVCache(4, capacity=30), [], 0
        for k, grid in enumerate(schedule):
            if k == 0:
                tokens = small_model.start_tokens(text)
            else:
                n = grid[0] * grid[1]
                tokens, start = small_model.embed_tokens(inputs[:, start : start + n]), start + n
            hidden, _ = small_model.run_blocks(
                small_model.add_level(tokens, k), small_model.blocks, text, small_model.rope(grid, rope_grid), cache
            )
            cached.append(small_model.head_logits(hidden, text))
    assert torch.allclose(torch.cat(cached, dim=1), full, atol=1e-4, rtol=0)
    assert cache.lengths() == [30] * 4


class ConcatenatingKVCache(KVCache):
    """The reference: a new tensor per scale, everything cached so far concatenated with the new k, v."""

    def __init__(self, depth: int):
        super().__init__(depth, capacity=0)

    def extend(self, layer, k, v):
        old_k, old_v = self.keys[layer], self.values[layer]
        self.keys[layer] = k if old_k is None else torch.cat((old_k, k), dim=2)
        self.values[layer] = v if old_v is None else torch.cat((old_v, v), dim=2)
        self.filled[layer] = self.keys[layer].shape[2]
        return self.keys[layer], self.values[layer]


def test_the_preallocated_kv_cache_gives_the_logits_of_the_concatenating_one(small_model):
    schedule, rope_grid = [(1, 1), (2, 2), (3, 3)], (3, 3)
    torch.manual_seed(2)
    full_text = small_model.encode_text(torch.randn(2, 5, 32), torch.tensor([5, 2]), with_null=True)
    scale_tokens = [small_model.start_tokens(full_text)] + [torch.randn(4, h * w, 64) for h, w in schedule[1:]]
    logits = []
    for cache in (KVCache(4, capacity=14), ConcatenatingKVCache(4)):
        text = full_text
        with torch.no_grad():
            for k, (grid, tokens) in enumerate(zip(schedule, scale_tokens)):
                if k == 2:  # CFG dropped: the null-text rows go on
                    cache.keep_rows(slice(2, 4))
                    text, tokens = text.rows(slice(2, 4)), tokens[2:]
                hidden, _ = small_model.run_blocks(
                    small_model.add_level(tokens, k), small_model.blocks, text, small_model.rope(grid, rope_grid), cache
                )
            logits.append(small_model.head_logits(hidden, text))
    assert torch.equal(logits[0], logits[1])


def test_a_full_kv_cache_says_so(small_model):
    cache = KVCache(1, capacity=3)
    cache.extend(0, torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="KV cache of 3 tokens is full"):
        cache.extend(0, torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))


def test_null_text_rows_use_the_learned_null_embedding(small_model):
    features, lengths = torch.randn(1, 4, 32), torch.tensor([2])
    with_null = small_model.encode_text(features, lengths, with_null=True)
    cond_only = small_model.encode_text(features, lengths, with_null=False)
    assert torch.allclose(with_null.pooled[:1], cond_only.pooled)
    other_prompt = small_model.encode_text(torch.randn(1, 4, 32), lengths, with_null=True)
    assert torch.allclose(with_null.pooled[1:], other_prompt.pooled[1:])  # the null row ignores the prompt
    assert not torch.allclose(with_null.pooled[1:], with_null.pooled[:1])


def test_an_official_style_checkpoint_loads_strictly_with_or_without_zero_k_bias(tmp_path, small_model):
    from errors import UserError
    from models.checkpoint import load_strict, read_state_dict

    weights = {k: v.clone() for k, v in small_model.state_dict().items() if not k.endswith("zero_k_bias")}
    torch.save(weights, tmp_path / "infinity_small.pth")
    fresh = Infinity(small_config())
    load_strict(fresh, read_state_dict(tmp_path / "infinity_small.pth"), source="infinity_small.pth",
                ignore=("*.zero_k_bias",))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), small_model.state_dict().values()))

    del weights["block_chunks.1.module.0.ffn.fc2.bias"]
    with pytest.raises(UserError, match="block_chunks.1.module.0.ffn.fc2.bias"):
        load_strict(Infinity(small_config()), weights, source="broken.pth", ignore=("*.zero_k_bias",))
