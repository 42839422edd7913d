"""What several test files share: small random models of the real classes, a scale observer, and running
run.py in-process on a small checkpoint."""

import json
import os
import sys
from pathlib import Path
from unittest.mock import patch

import torch
from torch.utils.flop_counter import FlopCounterMode

import run
from evals.shapes_world import VOCABULARY
from models.checkpoint import save_safetensors
from models.pipeline import TextToImageModel, tiny_from_config


def small_config(
    schedule: list, *, depth: int = 2, embed_dim: int = 64, num_heads: int = 4, text_channels: int = 32,
    bits: int = 8, vae_base_ch: int = 16, vae_ch_mult: tuple[int, ...] = (1, 2), norm_groups: int = 8,
    **transformer_extra,
) -> dict:
    """A tiny-checkpoint config.json of a small model: the tiny model's classes at test sizes.

    The image is 2**(len(vae_ch_mult) - 1) pixels per cell of the schedule's last grid.
    """
    return {
        "schedule": schedule,
        "transformer": {"depth": depth, "embed_dim": embed_dim, "num_heads": num_heads, "text_channels": text_channels,
                        "text_maxlen": 16, "bits_per_token": bits, "block_chunks": 1, **transformer_extra},
        "vae": {"codebook_dim": bits, "base_ch": vae_base_ch, "ch_mult": list(vae_ch_mult), "encoder_blocks": 1,
                "decoder_blocks": 1, "norm_groups": norm_groups},
        "text_encoder": {"width": text_channels, "depth": 1, "heads": 2, "max_length": 16},
        "vocabulary": VOCABULARY,
    }


def small_model(config: dict, confident: bool = True) -> TextToImageModel:
    """A seeded random model; `confident`: a head with large weights, so logits are sharp and depend on the
    prompt (as a trained model's), and a changed computation shows in the sampled bits."""
    torch.manual_seed(0)
    model = tiny_from_config(config, "small", torch.device("cpu"))
    if confident:
        torch.nn.init.normal_(model.transformer.head.weight, std=0.5)
    return model


CONFIG_64PX = small_config([1, 2, 4, 8, 16], vae_base_ch=8, vae_ch_mult=(1, 2, 2))  # 64 x 64 images, 5 scales


class FlopCount:
    """PyTorch's FLOP counter around a transformer's block loop and head, what accel/macs.py counts (2 FLOPs per
    MAC); `total` grows with every call while the monkeypatch lasts."""

    def __init__(self, transformer: torch.nn.Module, monkeypatch):
        self.total = 0
        monkeypatch.setattr(transformer, "run_blocks", self._counting(transformer.run_blocks))
        head = transformer.head_logits
        if isinstance(head, torch.nn.Module):  # STAR: the head is the official `head_logits` module
            monkeypatch.setattr(head, "forward", self._counting(head.forward))
        else:
            monkeypatch.setattr(transformer, "head_logits", self._counting(head))

    def _counting(self, method):
        def counted(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                result = method(*args, **kwargs)
            self.total += counter.get_total_flops()
            return result

        return counted


# Every accel option, with settings that act within a small 6-scale schedule (the codebook families' tests).
POLICIES = [
    ("none", {}),
    ("cfg_drop", {"refinement_start": -2}),
    ("stagevar", {"rank_ratio": 0.3}),
    ("stagevar", {"rank_ratio": 0.2, "sketch": "gaussian", "indices": "topk_norm", "keep_branch": "cond"}),
    ("stagevar_released", {}),
    ("fastvar", {"cache_scale": 2, "prune_scales": [3, 4], "prune_ratios": [0.4, 0.5], "skip_last": 1}),
    ("skipvar", {"skip_last": 1, "cond_only_last": 3}),
]


class ScaleRecorder:
    """A sampler observer that keeps every scale's record."""

    capture_blocks = ()

    def __init__(self):
        self.records = []

    def on_scale(self, record) -> None:
        self.records.append(record)


# ----------------------------------------------------------------------------------------------------------
# Experiments through run.py, on a small checkpoint

CHECKPOINT_CONFIG = small_config(  # 32 x 32 images in 4 scales
    [1, 2, 4, 8], embed_dim=32, num_heads=2, text_channels=16, bits=4, vae_base_ch=8, vae_ch_mult=(1, 2, 2),
    norm_groups=4,
)


def write_small_checkpoint(folder: Path) -> Path:
    """A random model in the tiny checkpoint layout, for model.checkpoint_dir."""
    torch.manual_seed(0)
    model = tiny_from_config(CHECKPOINT_CONFIG, "small", torch.device("cpu"))
    model.transformer.init_weights()
    for part in ("transformer", "vae", "text_encoder"):
        save_safetensors(getattr(model, part).state_dict(), folder / f"{part}.safetensors", {})
    (folder / "config.json").write_text(json.dumps(CHECKPOINT_CONFIG))
    return folder


def quick_overrides(checkpoint: Path, output_root: Path) -> list[str]:
    """Four prompts, two per batch, one cheap metric: seconds per experiment."""
    return [f"model.checkpoint_dir={checkpoint}", f"paths.output_root={output_root}", "model.batch_size=2",
            "prompts.limit=4", "metrics.names=[ssim]", "logger=none"]


def run_py(*arguments: str) -> None:
    """`python run.py <arguments>` in this process (torch is loaded already), on one thread.

    One thread: small models run faster on it, and do not fight the other tests for the cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    main_module = {"HYDRA_MAIN_MODULE": "__main__"}  # Hydra finds conf/ beside run.py only when it is __main__
    try:
        with patch.object(sys, "argv", ["run.py", *arguments]), patch.dict(os.environ, main_module):
            run.main()
    finally:
        torch.set_num_threads(threads)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
