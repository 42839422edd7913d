"""experiment=device_benchmark on the CPU, small: the same code that measures Infinity-2B on a GPU."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from accel.policies import build_policy
from accel.sampler import SamplingConfig, generate
from experiments.device_benchmark import bf16_logit_difference
from models.infinity import InfinityConfig

from helpers import ScaleRecorder, read_rows, run_py, small_config, small_model, write_small_checkpoint


def test_the_device_benchmark_writes_its_table_on_the_cpu(tmp_path: Path):
    checkpoint = write_small_checkpoint(tmp_path / "checkpoint")
    run_py(
        "experiment=device_benchmark", "model=tiny", f"model.checkpoint_dir={checkpoint}", "device=cpu", "logger=none",
        f"paths.output_root={tmp_path}", "device_benchmark.batch_sizes=[1,2]", "device_benchmark.warmup=1",
        "device_benchmark.methods=[{label: cfg_drop, accel: cfg_drop}, {label: skipvar, accel: skipvar}]",
        "device_benchmark.precision_check.transformer.embed_dim=64", "device_benchmark.precision_check.schedule=[[1,1],[2,2],[4,4]]",
    )
    (run_dir,) = tmp_path.glob("device_benchmark/*/")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["device"] == "CPU"
    rows = [(row["batch_size"], row["method"]) for row in summary["methods"]]
    assert rows == [(b, m) for b in (1, 2) for m in ("baseline", "cfg_drop", "skipvar")]
    for row in summary["methods"]:
        assert row["latency_min_s"] <= row["latency_s"] <= row["latency_max_s"] and row["tflops"] > 0
        assert row["peak_share"] is None and row["host_syncs"] is None  # GPU-only columns
    assert [r["method"] for r in read_rows(run_dir) if r["kind"] == "method"] == [m for _, m in rows]
    assert (run_dir / "tables" / "device_benchmark.csv").is_file() and (run_dir / "profile.txt").read_text()
    assert 0 < summary["bf16_vs_fp32_logits"]["max_abs_over_std"] < 0.1


def test_bf16_blocks_move_the_logits_a_little_and_fp32_not_at_all():
    config = InfinityConfig(depth=2, embed_dim=64, num_heads=4, text_channels=32, text_maxlen=16, bits_per_token=8,
                            block_chunks=1)
    difference = bf16_logit_difference(config, [(1, 1), (2, 2), (3, 3)], torch.device("cpu"))
    assert 0 < difference["max_abs_over_std"] < 0.1 and difference["mean_abs"] <= difference["max_abs"]


@pytest.mark.parametrize("accel", ["none", "stagevar"])
def test_fused_attention_equals_the_explicit_math(accel):
    # PyTorch's MATH backend is softmax(q k^T) v written out; the default picks a fused kernel where it can.
    model = small_model(small_config([1, 2, 4, 6], depth=2), confident=False)  # logits of order 1
    policy = build_policy(OmegaConf.load(Path(__file__).parents[1] / "conf" / "accel" / f"{accel}.yaml"), model)
    sampling, prompts = SamplingConfig(cfg=3.0, tau=1.0), ["a red cube", "two blue spheres"]
    fused, math = ScaleRecorder(), ScaleRecorder()
    first = generate(model, prompts, sampling, seed=0, policy=policy, observers=[fused], decode=False)
    with sdpa_kernel([SDPBackend.MATH]):  # the same bits in, so every scale sees the same inputs
        generate(model, prompts, sampling, seed=0, policy=policy, observers=[math], decode=False, forced_codes=first.codes)
    differences = [float((a.logits - b.logits).abs().max()) for a, b in zip(fused.records, math.records)]
    assert 0 < max(differences) <= 1e-5  # other kernels (not bitwise equal), the same math
