"""The probe's measurements: frequency bands, power spectra, energy ranks, and the per-scale trace of a real
sampler run (a small random model of the real classes)."""

import math

import numpy as np
import pytest
import torch

from accel.sampler import SamplingConfig, generate
from analysis.metrics import GMSD, SSIM, ShapesEvalPass
from analysis.probe import ProbeConfig, RankChoice, RunningMeans, ScaleTrace, measure, rank_summary
from analysis.ranks import aggregate_rank, energy_ranks, singular_values
from analysis.rows import band_key, chunk_rank_key, rank_key
from analysis.spectra import band_change, band_labels, radial_power_spectrum
from errors import UserError

from helpers import CONFIG_64PX, small_model

PROMPTS = [
    {"index": 3, "prompt": "a photo of a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]},
    {"index": 7, "prompt": "a photo of two blue squares", "tag": "counting", "include": [{"class": "square", "count": 2}]},
]


def gray_image(levels: torch.Tensor) -> torch.Tensor:
    """(W,) gray levels in 0..255, repeated down 64 rows, as one uint8 RGB image (1, 64, W, 3)."""
    return levels.round().to(torch.uint8)[None, None, :, None].expand(1, 64, len(levels), 3)


FLAT = gray_image(torch.full((64,), 128.0))
SLOW_WAVE = gray_image(128 + 64 * torch.cos(2 * math.pi * torch.arange(64) / 64))  # 1 cycle per image
STRIPES = gray_image(128 + 64 * torch.tensor([1.0, -1.0]).repeat(32))  # the Nyquist frequency


def test_band_change_puts_each_change_in_its_band():
    edges = [0.25, 0.5]
    assert band_labels(edges) == ["0-0.25", "0.25-0.5", "0.5+"]
    assert band_change(FLAT, FLAT, edges).tolist() == [[0.0, 0.0, 0.0]]
    low, middle, high = band_change(FLAT, SLOW_WAVE, edges)[0]
    assert low > 0 and middle < 1e-2 * low and high < 1e-2 * low
    low, middle, high = band_change(FLAT, STRIPES, edges)[0]
    assert high > 0 and low < 1e-2 * high and middle < 1e-2 * high


@pytest.mark.parametrize("edges", [[], [0.5, 0.25], [0.0, 0.5], [0.5, 2.0]])
def test_bad_band_edges_are_refused_by_the_probe_config(edges):
    with pytest.raises(UserError, match="probe.band_edges"):
        ProbeConfig(band_edges=edges)


def test_power_spectrum_of_flat_and_striped_images():
    flat = radial_power_spectrum(FLAT)
    assert flat.shape == (1, 33) and flat[0, 0] > 0 and flat[0, 1:].abs().max() < 1e-9
    stripes = radial_power_spectrum(STRIPES)
    assert stripes[0, 1:].argmax() == 31  # radius 32 (the Nyquist frequency), after the DC term


def test_energy_ranks_of_a_matrix_with_known_singular_values():
    u, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    sigma = torch.tensor([3.0, 2.0, 1.0, 0, 0, 0, 0, 0])  # energy shares 9/14, 13/14, 14/14
    features = (u[:, :8] * sigma) @ v.T
    values = singular_values(features[None])
    assert values[0, :3].tolist() == pytest.approx([3.0, 2.0, 1.0], abs=1e-5)
    assert energy_ranks(values, [0.6, 0.9, 0.95, 1.0]).tolist() == [[1, 2, 3, 3]]
    assert energy_ranks(torch.zeros(1, 4), [0.5, 1.0]).tolist() == [[0, 0]]  # no energy: rank 0


def test_ranks_aggregate_to_the_rounded_up_mean_or_the_90th_percentile():
    assert aggregate_rank([1, 2], "mean") == 2
    assert aggregate_rank([3] * 9 + [7], "p90") == 7
    assert aggregate_rank([3] * 19 + [7], "p90") == 3
    with pytest.raises(ValueError, match="median"):
        aggregate_rank([1], "median")


def test_running_means_average_over_every_added_vector():
    means = RunningMeans()
    means.add("a", torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    means.add("a", torch.tensor([[5.0, 6.0]]))
    assert means.mean("a") == [3.0, 4.0]


@pytest.fixture(scope="module")
def model_64px():
    return small_model(CONFIG_64PX)


SAMPLING = SamplingConfig(cfg=3.0, tau=1.0, top_p=0.0)


def test_the_trace_decodes_every_scale_at_full_resolution_and_ends_at_the_final_image(model_64px):
    trace = ScaleTrace(model_64px.vae, rank_blocks=[1])
    generate(model_64px, [p["prompt"] for p in PROMPTS], SAMPLING, seed=5, observers=[trace], decode=False)
    final = generate(model_64px, [p["prompt"] for p in PROMPTS], SAMPLING, seed=5).images
    assert len(trace.partial_images) == len(model_64px.schedule)
    assert all(images.shape == (2, 64, 64, 3) for images in trace.partial_images)
    assert torch.equal(trace.partial_images[-1], final)
    assert not torch.equal(trace.partial_images[0], final)
    # One singular-value vector per prompt (conditional rows only, though CFG runs 2 rows per prompt).
    assert [sorted(v) for v in trace.singular_values] == [["block1", "inputs"]] * 5
    assert trace.singular_values[-1]["inputs"].shape == (2, 64)  # min(M = 256 tokens, d = 64 channels)


def test_measure_gives_one_row_per_prompt_and_scale_with_every_measurement(model_64px):
    trace = ScaleTrace(model_64px.vae, rank_blocks=[0], chunk_starts=[0, 1])  # as if 2 chunks of 1 block
    generate(model_64px, [p["prompt"] for p in PROMPTS], SAMPLING, seed=5, observers=[trace], decode=False)
    config = ProbeConfig(rank_energies=[0.9, 0.99], rank_blocks=[0], band_edges=[0.3], chunk_rank_energies=[0.5, 0.96])
    spectra = RunningMeans()
    rows = measure(trace, PROMPTS, {"ssim": SSIM(), "gmsd": GMSD(), "shapes_eval": ShapesEvalPass()}, config, spectra)

    assert [(row["index"], row["scale"]) for row in rows] == [(i, k) for i in (3, 7) for k in range(5)]
    # The first scale is the whole latent so far; later scales add less of it, whatever the model.
    assert all(row["update_ratio"] == pytest.approx(1.0) for row in rows if row["scale"] == 0)
    assert all(0 < row["update_ratio"] for row in rows)
    last = [row for row in rows if row["scale"] == 4]
    assert all(row["ssim"] == pytest.approx(1.0, abs=1e-5) and row["gmsd"] == pytest.approx(0.0, abs=1e-6) for row in last)
    for row in rows:
        assert row["shapes_eval"] in (0.0, 1.0) and row["tokens"] == row["grid"][0] * row["grid"][1]
        assert {band_key("0-0.3"), band_key("0.3+")} <= row.keys()
        for source in ("inputs", "block0"):
            assert 1 <= row[rank_key(source, 0.9)] <= row[rank_key(source, 0.99)] <= min(row["tokens"], 64)
            assert row[rank_key(source, 0.99, fraction=True)] == row[rank_key(source, 0.99)] / row["tokens"]
        low, high = row[chunk_rank_key(0.5)], row[chunk_rank_key(0.96)]  # per chunk: rank / min(M, d)
        assert len(low) == len(high) == 2 and all(0 <= a <= b <= 1 for a, b in zip(low, high))
        if row["tokens"] == 1:  # one token, centred: a matrix of zeros has rank 0, not a full rank
            assert low == high == [0.0, 0.0]
    assert len(spectra.mean("power_spectrum/4")) == 33 and len(spectra.mean("cumulative_energy/block0/4")) == 64

    summary = rank_summary(rows, RankChoice(source="block0", energy=0.99, aggregate="p90"), model_64px.schedule, [0.5, 0.96])
    assert summary["per_scale"][0] == 1 and len(summary["per_scale"]) == 5
    assert summary["fraction"][-1] == summary["per_scale"][-1] / 256
    at_96 = summary["chunk_ranks"]["ratio"]["0.96"]
    assert sorted(at_96) == ["0", "1", "2", "3", "4"] and len(at_96["4"]) == 2
    assert at_96["4"][0] == pytest.approx(np.mean([row[chunk_rank_key(0.96)][0] for row in last]))
    with pytest.raises(UserError, match="no rank was measured for source 'block1'"):
        rank_summary(rows, RankChoice(source="block1"), model_64px.schedule, [0.96])


def test_rank_blocks_count_from_the_end_and_must_exist():
    assert ProbeConfig(rank_blocks=[0, -1]).blocks(depth=6) == [0, 5]
    with pytest.raises(UserError, match=r"probe.rank_blocks=\[7\]"):
        ProbeConfig(rank_blocks=[7]).blocks(depth=6)
