import logging

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from errors import UserError
from models.text_encoder import T5TextEncoder, TextEncoderError, TextTokens, WordTextEncoderConfig, WordTextEncoder

WORDS = ["a", "red", "blue", "cube", "sphere", "left", "of", "the", "café"]
LONG_PROMPT = "a red cube left of the blue sphere"  # 8 words + end of sequence


def assert_well_formed(tokens: TextTokens, channels: int, lengths: list[int]) -> None:
    assert tokens.lengths.tolist() == lengths
    assert tokens.features.shape == (len(lengths), max(lengths), channels)
    assert tokens.features.dtype == torch.float32
    for row, length in enumerate(lengths):
        assert (tokens.features[row, length:] == 0).all()
        assert (tokens.features[row, :length].abs().sum(-1) > 0).all()


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny random T5 encoder with a word-level tokenizer.json, saved the way Hugging Face folders are."""
    folder = tmp_path_factory.mktemp("tiny-t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: 3 + i for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1
    )
    T5EncoderModel(config).save_pretrained(folder)
    return folder


def test_t5_encodes_padded_batches(t5_folder):
    encoder = T5TextEncoder(t5_folder)
    assert (encoder.channels, encoder.max_length) == (16, 512)
    tokens = encoder.encode(["a red cube", "", "Café über Straße ✓", LONG_PROMPT])
    assert_well_formed(tokens, 16, [4, 1, 5, 9])
    alone = encoder.encode(["a red cube"])
    torch.testing.assert_close(alone.features[0], tokens.features[0, :4], atol=1e-5, rtol=0)


def test_t5_truncates_long_prompts_with_a_warning(t5_folder, caplog):
    encoder = T5TextEncoder(t5_folder, max_length=4)
    with caplog.at_level(logging.WARNING, logger="models.text_encoder"):
        tokens = encoder.encode([LONG_PROMPT, "red"])
    assert tokens.lengths.tolist() == [4, 2]
    assert "a red cube left" in caplog.text and "9 to 4" in caplog.text


def test_t5_folder_errors_name_folder_key_and_files(t5_folder, tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*config.json") as err:
        T5TextEncoder(tmp_path / "flan-t5-xl")
    assert str(tmp_path / "flan-t5-xl") in str(err.value) and "model.text_encoder.path" in str(err.value)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((t5_folder / name).read_bytes())
    with pytest.raises(TextEncoderError, match=r"lacks model weights;.*model.safetensors"):
        T5TextEncoder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "model.safetensors").write_bytes((t5_folder / "model.safetensors").read_bytes())
    with pytest.raises(TextEncoderError, match=r"lacks tokenizer;.*tokenizer.json or spiece.model"):
        T5TextEncoder(tmp_path)


CONFIG = WordTextEncoderConfig(width=16, depth=2, heads=2, max_length=6)


def word_encoder() -> WordTextEncoder:
    torch.manual_seed(0)
    return WordTextEncoder(WORDS, CONFIG).eval()


def test_word_tokenizer_splits_on_non_letters_and_maps_unknown_words():
    token_ids, lengths = word_encoder().tokenize(["Red-cube, 3 blue!", "", "Café ÜBER"])
    red, cube, blue, cafe = (3 + WORDS.index(w) for w in ("red", "cube", "blue", "café"))
    assert token_ids.tolist() == [[red, cube, blue, 1], [1, 0, 0, 0], [cafe, 2, 1, 0]]
    assert lengths.tolist() == [4, 1, 3]


def test_unknown_words_and_prompts_the_model_reads_nothing_of_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="models.text_encoder"):
        word_encoder().tokenize(["a red cube"])
    assert not caplog.text  # every word known: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="models.text_encoder"):
        word_encoder().tokenize(["purple dodecahedrons", "", "a red cone and a cone and a blue sphere"])
    assert "'purple dodecahedrons' has no word this text encoder knows" in caplog.text
    assert "prompt '' is empty, so the model sees no text" in caplog.text
    assert "'a red cone and a cone and a blue sphere' has words this text encoder does not know" in caplog.text
    assert "unknown token: and, cone." in caplog.text  # each unknown word named, once


def test_word_encoder_pads_with_zeros_and_is_batch_independent():
    encoder = word_encoder()
    tokens = encoder.encode(["a red cube", "", "über alles"])
    assert_well_formed(tokens, 16, [4, 1, 3])
    alone = encoder.encode(["a red cube"])
    torch.testing.assert_close(alone.features[0], tokens.features[0], atol=1e-5, rtol=0)


def test_word_encoder_truncates_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="models.text_encoder"):
        token_ids, lengths = word_encoder().tokenize([LONG_PROMPT])
    assert lengths.tolist() == [6] and token_ids[0, -1] == 1  # end of sequence kept
    assert "9 to 6" in caplog.text and LONG_PROMPT in caplog.text


def test_word_encoder_trains_and_keeps_stable_names():
    encoder = word_encoder().train()
    encoder.encode(["a red cube"]).features.sum().backward()
    assert encoder.token_embed.weight.grad is not None
    names = set(encoder.state_dict())
    assert {"token_embed.weight", "position_embed.weight", "norm.weight", "encoder.layers.1.linear2.bias"} <= names


@pytest.mark.parametrize(
    ("vocabulary", "message"),
    [(["Red"], "'Red' can never match"), (["red-cube"], "can never match"), (["a", "a"], r"more than once: \['a'\]")],
)
def test_bad_vocabulary_is_refused(vocabulary, message):
    with pytest.raises(TextEncoderError, match=message):
        WordTextEncoder(vocabulary, CONFIG)
