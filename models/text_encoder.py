"""Text encoders for Infinity's text path: per-token features plus the number of valid tokens per prompt.

- `T5TextEncoder`: the frozen flan-t5-xl encoder of Infinity-2B/8B, from a local folder.
- `WordTextEncoder`: a small trainable word-level encoder for the tiny default model; its weights are
  saved with that model.

Both pad to the longest prompt of the batch and zero the padding; the end-of-sequence token always
counts, so an empty prompt has length 1.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, T5EncoderModel

from errors import UserError

logger = logging.getLogger(__name__)

T5_PATH_CONFIG_KEY = "model.text_encoder.path"
T5_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


class TextEncoderError(UserError):
    """A text encoder folder or vocabulary is missing or unusable."""


@dataclass
class TextTokens:
    features: Tensor  # (B, L, channels) float, zero after each prompt's length
    lengths: Tensor  # (B,) long, valid tokens per prompt, >= 1


def _warn_truncated(prompt: str, num_tokens: int, max_length: int) -> None:
    logger.warning("prompt truncated from %d to %d tokens: %r", num_tokens, max_length, prompt[:100])


def _zero_padding(features: Tensor, lengths: Tensor) -> Tensor:
    valid = torch.arange(features.shape[1], device=features.device) < lengths[:, None]
    return features.masked_fill(~valid[..., None], 0.0)


class T5TextEncoder:
    """Frozen T5 encoder (flan-t5-xl for Infinity) loaded from a local folder; fp16 on CUDA, fp32 elsewhere."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", max_length: int = 512):
        folder = Path(path)
        _check_t5_folder(folder)
        self.device = torch.device(device)
        self.max_length = max_length
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32  # Infinity runs T5 in fp16
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, ImportError) as err:
            raise TextEncoderError(
                f"cannot load the T5 encoder from {folder} (config key `{T5_PATH_CONFIG_KEY}`): {err}"
            ) from err
        self.model.to(self.device).eval().requires_grad_(False)
        self.channels: int = self.model.config.d_model

    @torch.no_grad()  # not inference_mode: the features may feed a model that is being trained
    def encode(self, prompts: list[str]) -> TextTokens:
        for prompt, ids in zip(prompts, self.tokenizer(prompts)["input_ids"]):
            if len(ids) > self.max_length:
                _warn_truncated(prompt, len(ids), self.max_length)
        batch = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        lengths = batch["attention_mask"].sum(1)
        return TextTokens(features=_zero_padding(hidden.float(), lengths), lengths=lengths)


def _check_t5_folder(folder: Path) -> None:
    expected = (
        f"config.json, model weights (one of {', '.join(T5_WEIGHT_FILES)}) and a tokenizer "
        f"({' or '.join(T5_TOKENIZER_FILES)})"
    )
    where = f"T5 encoder folder {folder} (config key `{T5_PATH_CONFIG_KEY}`)"
    if not folder.is_dir():
        raise TextEncoderError(f"{where} does not exist; it should hold {expected}")
    required = {"config.json": ("config.json",), "model weights": T5_WEIGHT_FILES, "tokenizer": T5_TOKENIZER_FILES}
    missing = [what for what, names in required.items() if not any((folder / name).is_file() for name in names)]
    if missing:
        raise TextEncoderError(f"{where} lacks {', '.join(missing)}; it should hold {expected}")


@dataclass
class WordTextEncoderConfig:
    width: int = 64
    depth: int = 2
    heads: int = 4
    max_length: int = 32  # tokens, end-of-sequence included


PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_FIRST_WORD_ID = 3
_WORD = re.compile(r"[^\W\d_]+")  # a run of letters, in any script


class WordTextEncoder(nn.Module):
    """Word-level tokenizer over a fixed vocabulary plus a small pre-norm transformer encoder.

    Prompts are lower-cased and split on non-letters; unknown words become `UNK_ID`.
    """

    def __init__(self, vocabulary: Sequence[str], config: WordTextEncoderConfig):
        super().__init__()
        self.config = config
        self.word_ids = _word_ids(vocabulary)
        self.token_embed = nn.Embedding(_FIRST_WORD_ID + len(vocabulary), config.width)
        self.position_embed = nn.Embedding(config.max_length, config.width)
        layer = nn.TransformerEncoderLayer(
            config.width, config.heads, dim_feedforward=4 * config.width, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)

    @property
    def channels(self) -> int:
        return self.config.width

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """-> token ids (B, L) padded with PAD_ID, and lengths (B,) including the end-of-sequence token."""
        rows = []
        for prompt in prompts:
            words = _WORD.findall(prompt.lower())
            ids = [self.word_ids.get(word, UNK_ID) for word in words] + [EOS_ID]
            self._warn_unknown_words(prompt, words)
            if len(ids) > self.max_length:
                _warn_truncated(prompt, len(ids), self.max_length)
                ids = ids[: self.max_length - 1] + [EOS_ID]
            rows.append(torch.tensor(ids))
        token_ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD_ID)
        return token_ids, torch.tensor([len(row) for row in rows])

    def _warn_unknown_words(self, prompt: str, words: list[str]) -> None:
        """Say what the model will not read: every unknown word, and a prompt it reads nothing of."""
        unknown = sorted({word for word in words if word not in self.word_ids})
        known_words = ("The shapes world's words are colours, shapes, counts and relations "
                       "(e.g. 'a red circle left of a blue square').")
        if not words or len(unknown) == len(set(words)):
            what = "is empty" if not words else "has no word this text encoder knows"
            logger.warning("prompt %r %s, so the model sees no text: its image is unconditional. %s",
                           prompt[:100], what, known_words)
        elif unknown:
            logger.warning("prompt %r has words this text encoder does not know, which it reads as one unknown "
                           "token: %s. %s", prompt[:100], ", ".join(unknown), known_words)

    def forward(self, token_ids: Tensor, lengths: Tensor) -> Tensor:
        """(B, L) ids and (B,) lengths -> features (B, L, width), zero at padding."""
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        x = self.token_embed(token_ids) + self.position_embed(positions)
        x = self.encoder(x, src_key_padding_mask=positions >= lengths[:, None])
        return _zero_padding(self.norm(x), lengths)

    def encode(self, prompts: list[str]) -> TextTokens:
        device = self.token_embed.weight.device
        token_ids, lengths = self.tokenize(prompts)
        token_ids, lengths = token_ids.to(device), lengths.to(device)
        return TextTokens(features=self(token_ids, lengths), lengths=lengths)


def _word_ids(vocabulary: Sequence[str]) -> dict[str, int]:
    for word in vocabulary:
        if not _WORD.fullmatch(word) or word != word.lower():
            raise TextEncoderError(
                f"vocabulary word {word!r} can never match a prompt word: words are lower-case runs of letters"
            )
    duplicates = sorted(word for word, count in Counter(vocabulary).items() if count > 1)
    if duplicates:
        raise TextEncoderError(f"vocabulary words appear more than once: {duplicates}")
    return {word: _FIRST_WORD_ID + i for i, word in enumerate(vocabulary)}


# ----------------------------------------------------------------------------------------------------------
# CLIP, STAR's text tower (models/star.py)

CLIP_PATH_CONFIG_KEY = "model.files.text_encoder"
CLIP_SUBFOLDERS = ("tokenizer", "text_encoder")


CLIP_TOKENS = 77  # CLIP's context: STAR's prompts are padded to it


@dataclass
class CLIPTextTokens(TextTokens):
    """A CLIP text tower's reading of B prompts, as STAR's `condition` takes it.

    - features (B, T, C): `last_hidden_state` (after CLIP's final LayerNorm) at all T = 77 padded positions.
      Unlike the other encoders' TextTokens, the padding holds CLIP's own values, not zeros, as the official code
      passes them: STAR's cross-attention masks those positions out, so their values never count.
    - lengths (B,): valid tokens (start, words, end of text); `mask` (B, T) bool, True at them.
    - pooled (B, C): `pooler_output`, the final hidden state at the end-of-text token, with no projection.
    - null: the same for the empty prompt "" (one row; its mask has 2 ones), STAR's null text for CFG.
    """

    mask: Tensor
    pooled: Tensor
    null: CLIPTextTokens | None = None


class CLIPTextEncoder:
    """STAR's frozen CLIP text model (SD-2.1's 1024-d OpenCLIP-ViT-H text tower in the release) from a local
    diffusers-style folder with `tokenizer/` and `text_encoder/` subfolders; fp32 on every device, as the official
    code. Prompts are padded to the tokenizer's 77 tokens and truncated (with a warning); "" is encoded once, as
    the null text every output carries."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        _check_clip_folder(folder)
        self.device = torch.device(device)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
            self.model = CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", local_files_only=True, dtype=torch.float32
            )
        except (OSError, ValueError, ImportError) as err:
            raise TextEncoderError(
                f"cannot load the CLIP text encoder from {folder} (config key `{CLIP_PATH_CONFIG_KEY}`): {err}"
            ) from err
        self.model.to(self.device).eval().requires_grad_(False)
        self.channels: int = self.model.config.hidden_size
        self.max_length: int = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        self._null: CLIPTextTokens | None = None

    @torch.no_grad()  # not inference_mode: the features may feed a model that is being trained
    def encode(self, prompts: list[str]) -> CLIPTextTokens:
        tokens = self._encode(prompts)
        if self._null is None:
            self._null = self._encode([""])
        tokens.null = self._null
        return tokens

    def _encode(self, prompts: list[str]) -> CLIPTextTokens:
        for prompt, ids in zip(prompts, self.tokenizer(prompts)["input_ids"]):
            if len(ids) > self.max_length:
                _warn_truncated(prompt, len(ids), self.max_length)
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        # The ids alone: CLIP is causal, so the valid tokens and the pooled end-of-text state never see the padding.
        output = self.model(input_ids=batch["input_ids"])
        mask = batch["attention_mask"].bool()
        return CLIPTextTokens(features=output.last_hidden_state.float(), lengths=mask.sum(1), mask=mask,
                              pooled=output.pooler_output.float())


def _check_clip_folder(folder: Path) -> None:
    expected = ("a diffusers-style folder with `tokenizer/` (vocab.json and merges.txt, or tokenizer.json) and "
                "`text_encoder/` (config.json and the weights), e.g. the STAR release's CLIP folder")
    where = f"CLIP text encoder folder {folder} (config key `{CLIP_PATH_CONFIG_KEY}`)"
    if not folder.is_dir():
        raise TextEncoderError(f"{where} does not exist; it should be {expected}")
    missing = [f"{name}/" for name in CLIP_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise TextEncoderError(f"{where} lacks {', '.join(missing)}; it should be {expected}")


class RandomCLIPFeatures:
    """Stand-in for CLIPTextEncoder when timing without CLIP weights: random features, NOT an encoding.

    Per prompt, features (77, channels), a pooled vector and a mask of one token per word plus the start and end
    tokens (capped at 77), drawn from a generator seeded by the prompt's text, so that a prompt reads the same in any
    batch; "" gives the null text (2 valid tokens), as CLIP's.
    """

    def __init__(self, channels: int = 1024, max_length: int = CLIP_TOKENS):
        self.channels = channels
        self.max_length = max_length

    def encode(self, prompts: list[str]) -> CLIPTextTokens:
        tokens = self._encode(prompts)
        tokens.null = self._encode([""])
        return tokens

    def _encode(self, prompts: list[str]) -> CLIPTextTokens:
        import zlib  # a stable hash of the prompt (Python's hash() is salted per process)

        features, pooled = [], []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode("utf-8")))
            features.append(torch.randn(self.max_length, self.channels, generator=generator))
            pooled.append(torch.randn(self.channels, generator=generator))
        lengths = torch.tensor([min(len(prompt.split()) + 2, self.max_length) for prompt in prompts])
        mask = torch.arange(self.max_length)[None, :] < lengths[:, None]
        return CLIPTextTokens(features=torch.stack(features), lengths=lengths, mask=mask, pooled=torch.stack(pooled))
