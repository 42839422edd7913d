"""device_benchmark: the prepared GPU measurement of Infinity-2B (random weights, 1024 x 1024, bf16) and its
acceleration policies, in one command (scripts/device_benchmark.sh) that fits in a few minutes on one H200.

Per batch size (1 and 4): experiments/accel_common.py's interleaved timing of the baseline and every method
(latency min/median/max, speedup with its range, peak memory, analytic MAC speedup), plus
- achieved transformer TFLOP/s: 2 x the transformer's analytic MACs over the end-to-end median latency (the VAE
  decode and text encoding are in the time but not in the MACs, so this understates the blocks' own rate), and
  its share of the GPU's dense bf16 peak;
- host syncs: CUDA's sync debug mode counts the host waiting for the GPU during one generation (the final
  copy of the images to the host is one).
Then, once: the bf16-vs-fp32 difference of the logits of a small random Infinity (teacher-forced, the same
inputs), and a profile of one baseline generation at batch 1 (top operators by device time).

On the CPU (model=tiny in the tests) everything runs the same; the TFLOP/s share and the sync count are left out.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from accel.policies import build_policy
from accel.sampler import generate
from errors import UserError
from experiments.accel_common import (
    BASELINE,
    ComparisonSettings,
    Method,
    accel_option,
    check_policies,
    check_timing,
    measure_speed,
    methods_from,
)
from experiments.config_checks import check_model, number, whole
from experiments.generate import sampling_config
from experiments.recorder import RunRecorder
from models.class_labels import ImageNetClassLabels
from models.infinity import Infinity, InfinityConfig
from models.pipeline import build_model

log = logging.getLogger(__name__)

TEXT_PROMPT = "a photo of a red apple on a wooden table next to a blue cup"  # a short GenEval-like prompt
CLASS_PROMPT = "golden retriever"  # class-conditional models (VAR) read ImageNet classes
# Dense (non-sparse) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def check(cfg: DictConfig) -> None:
    check_model(cfg)
    settings = cfg.device_benchmark
    if not settings.batch_sizes:
        raise UserError("device_benchmark.batch_sizes=[] measures nothing: give at least one, e.g. [1, 4]")
    for i, batch_size in enumerate(settings.batch_sizes):
        whole(f"device_benchmark.batch_sizes[{i}]", batch_size, minimum=1)
    check_timing(cfg, "device_benchmark")
    if settings.peak_bf16_tflops is not None:
        number("device_benchmark.peak_bf16_tflops", settings.peak_bf16_tflops, 0, float("inf"), low_open=True)
    check_policies(cfg, methods_from(settings.methods))
    key = "device_benchmark.precision_check.transformer"
    try:
        InfinityConfig(**settings.precision_check.transformer)
    except TypeError as error:  # a key InfinityConfig does not have
        raise UserError(f"{key}: {error}") from None
    except ValueError as error:  # "<field>=<value> must ..."
        raise UserError(f"{key}.{error}") from None


def run(cfg: DictConfig, recorder: RunRecorder) -> dict:
    settings = cfg.device_benchmark
    model = build_model(cfg.model, cfg.device)
    device = model.device
    peak = peak_tflops(device, settings.peak_bf16_tflops)
    sampling = sampling_config(cfg.model)
    methods = [Method(BASELINE, accel_option("none")), *methods_from(settings.methods)]
    policies = {method.label: build_policy(method.accel, model) for method in methods}
    timing = ComparisonSettings.from_block(settings)
    log.info("%s on %s (%s), %s px, methods %s", cfg.model.name, device, device_name(device), model.image_size,
             ", ".join(policies))

    prompt = CLASS_PROMPT if isinstance(model.text_encoder, ImageNetClassLabels) else TEXT_PROMPT
    rows = []
    for batch_size in settings.batch_sizes:
        prompts = [prompt] * batch_size
        for row in measure_speed(model, policies, prompts, sampling, cfg.seed, timing, recorder):
            policy = policies[row["method"]]
            tflops = 2 * row["gmacs"] * 1e9 / row["latency_s"] / 1e12
            row.update(
                batch_size=batch_size, tflops=tflops, peak_share=None if peak is None else tflops / peak,
                host_syncs=host_syncs(lambda: generate(model, prompts, sampling, cfg.seed, policy), device),
            )
            recorder.log({"kind": "method", **row})
            rows.append(row)

    columns = ["batch", "method", "latency (s)", "latency min-max", "speedup", "speedup min-max", "verdict",
               "MAC speedup", "TFLOP/s", "of bf16 peak", "peak memory (MiB)", "host syncs"]
    table = recorder.log_table("device_benchmark", columns, [
        [row["batch_size"], row["method"], row["latency_s"], f"{row['latency_min_s']:.3f}-{row['latency_max_s']:.3f}",
         row["speedup"], f"{row['speedup_min']:.2f}-{row['speedup_max']:.2f}", row["speedup_verdict"],
         row["mac_speedup"], row["tflops"], "-" if row["peak_share"] is None else f"{row['peak_share']:.1%}",
         "-" if row["peak_memory_mib"] is None else round(row["peak_memory_mib"]),
         "-" if row["host_syncs"] is None else row["host_syncs"]]
        for row in rows
    ])
    log.info(f"{cfg.model.name} on {device_name(device)}, median of {timing.repeats} interleaved repeats:\n{table}")

    precision = bf16_logit_difference(InfinityConfig(**settings.precision_check.transformer),
                                      [tuple(grid) for grid in settings.precision_check.schedule], device)
    log.info("bf16 blocks vs fp32, small Infinity (%s): max |logit difference| %.3g, %.3g of the logits' std",
             settings.precision_check.transformer, precision["max_abs"], precision["max_abs_over_std"])
    profile = None
    if settings.profile:
        profile = profile_generation(lambda: generate(model, [prompt], sampling, cfg.seed), device)
        (recorder.run_dir / "profile.txt").write_text(profile + "\n")
        log.info("one baseline generation at batch 1, top operators:\n%s", profile)
    return {
        "model": cfg.model.name, "device": device_name(device), "image_size": list(model.image_size),
        "peak_bf16_tflops": peak, "methods": rows, "bf16_vs_fp32_logits": precision,
        "profile": None if profile is None else "profile.txt",
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """The GPU's dense bf16 peak: as configured, else from the table by device name; None on the CPU."""
    if configured is not None or device.type != "cuda":
        return configured
    name = device_name(device)
    found = [peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name]
    if not found:
        log.warning("no bf16 peak known for %s: set device_benchmark.peak_bf16_tflops for the share column", name)
    return found[0] if found else None


def host_syncs(call: Callable[[], object], device: torch.device) -> int | None:
    """How often the host waits for the GPU during `call` (CUDA's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


@torch.inference_mode()
def bf16_logit_difference(config: InfinityConfig, schedule: list[tuple[int, int]], device: torch.device) -> dict:
    """Teacher-forced logits of one random Infinity with fp32 blocks, then with bf16 blocks under bf16 autocast
    (the official inference numerics), on the same inputs: how far bf16 moves them."""
    torch.manual_seed(0)
    model = Infinity(config).to(device).eval()
    model.init_weights()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # init_weights zeroes the head: logits would all be 0
    features = torch.randn(2, 8, config.text_channels, device=device)
    text = model.encode_text(features, torch.tensor([8, 5], device=device), with_null=True)
    tokens = sum(h * w for h, w in schedule[1:])
    inputs = (torch.rand(4, tokens, config.bits_per_token, device=device) > 0.5).float() * 2 - 1
    reference = model(inputs, text, schedule, schedule[-1])
    model.blocks_to(torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        low = model(inputs, text, schedule, schedule[-1])
    difference = (low.float() - reference).abs()
    return {"max_abs": float(difference.max()), "mean_abs": float(difference.mean()),
            "max_abs_over_std": float(difference.max() / reference.std())}


def profile_generation(call: Callable[[], object], device: torch.device, rows: int = 15) -> str:
    """The top operators of one call by time on the device (self time on the CPU), as PyTorch's profiler lists them."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        call()
    sort_by = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)

