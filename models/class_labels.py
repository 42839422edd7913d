"""ImageNet classes as the prompts of class-conditional models (VAR): a prompt is a class index or a class name.

The 1,000 names are torchvision's (the ImageNet weight metadata it ships, readable offline), in class-index
order, so "207", "golden retriever" and "Golden Retriever" are the same prompt. The names are also the text the
stage probe's semantic metrics (CLIP) compare the images with.
"""

from __future__ import annotations

import difflib
from functools import cache

import torch
from torch import Tensor
from torchvision.models import ResNet50_Weights

from errors import UserError


@cache
def imagenet_class_names() -> tuple[str, ...]:
    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


class ImageNetClassLabels:
    """The prompt encoder of a class-conditional model: prompts -> class indices (B,) int64."""

    def __init__(self, num_classes: int = 1000):
        names = imagenet_class_names()
        if num_classes != len(names):
            raise UserError(f"a model of {num_classes} classes has no ImageNet names; ImageNet has {len(names)}")
        self.num_classes = num_classes
        self._index_of_name = {name.lower(): index for index, name in enumerate(names)}

    def encode(self, prompts: list[str]) -> Tensor:
        return torch.tensor([self.class_index(prompt) for prompt in prompts], dtype=torch.long)

    def class_index(self, prompt: str) -> int:
        text = prompt.strip()
        if text.isdigit():
            if int(text) >= self.num_classes:
                raise UserError(f"prompt {prompt!r}: class index {text} is outside 0..{self.num_classes - 1}")
            return int(text)
        if (index := self._index_of_name.get(text.lower())) is not None:
            return index
        close = difflib.get_close_matches(text.lower(), self._index_of_name, n=3)
        hint = f"; did you mean {', '.join(repr(name) for name in close)}?" if close else ""
        raise UserError(f"prompt {prompt!r} is neither an ImageNet class index (0-999) nor a class name{hint}")
