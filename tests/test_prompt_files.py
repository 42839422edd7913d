import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from errors import UserError
from evals.prompt_files import PromptFileError, export_geneval_layout, read_dpg_prompts, read_geneval_metadata
from evals.shapes_world import make_suite


def test_geneval_metadata_round_trip_skips_blank_lines(tmp_path):
    metadatas = make_suite(num_per_category=2)
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(m) for m in metadatas[:3]) + "\n\n  \n" + json.dumps(metadatas[3]) + "\n")
    assert read_geneval_metadata(path) == metadatas[:4]


@pytest.mark.parametrize(
    "bad_line, complaint",
    [
        ('{"prompt": "a photo of a cat", "tag": ', "not valid JSON"),
        ('["a photo of a cat"]', "expected a JSON object"),
        ('{"prompt": "a photo of a cat"}', "'tag'"),
    ],
)
def test_malformed_geneval_line_is_named(tmp_path, bad_line, complaint):
    path = tmp_path / "evaluation_metadata.jsonl"
    good = json.dumps({"tag": "single_object", "prompt": "a photo of a dog"})
    path.write_text(f"{good}\n\n{bad_line}\n")
    with pytest.raises(ValueError) as raised:
        read_geneval_metadata(path)
    message = str(raised.value)
    assert str(path) in message and "line 3" in message and complaint in message
    assert isinstance(raised.value, UserError)  # run.py prints it without a traceback


def test_missing_geneval_file_is_named(tmp_path):
    with pytest.raises(PromptFileError, match="nowhere.jsonl"):
        read_geneval_metadata(tmp_path / "nowhere.jsonl")


def test_dpg_folder_reading(tmp_path):
    (tmp_path / "whale.txt").write_text("A whale sings under a red moon.\n")
    (tmp_path / "apple.txt").write_text("  Three apples on a wooden table.  ")
    (tmp_path / "notes.md").write_text("not a prompt")
    assert read_dpg_prompts(tmp_path) == [
        {"id": "apple", "prompt": "Three apples on a wooden table."},
        {"id": "whale", "prompt": "A whale sings under a red moon."},
    ]


def test_dpg_missing_or_empty_folder_is_named(tmp_path):
    with pytest.raises(PromptFileError, match="absent"):
        read_dpg_prompts(tmp_path / "absent")
    with pytest.raises(PromptFileError, match=re.escape(str(tmp_path))):
        read_dpg_prompts(tmp_path)
    (tmp_path / "blank.txt").write_text("\n")
    with pytest.raises(PromptFileError, match="blank.txt"):
        read_dpg_prompts(tmp_path)


def test_export_follows_geneval_layout(tmp_path):
    metadatas = make_suite(num_per_category=1)[:2]
    uint8_image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    model_output = torch.from_numpy(uint8_image).permute(2, 0, 1).float() / 255 * 2 - 1
    export_geneval_layout(tmp_path, metadatas, [[uint8_image, model_output], [uint8_image]])

    # What GenEval's evaluate_images.py expects: digit-named folders, metadata.jsonl, samples/<digits>.png.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000", "00001"]
    assert sorted(p.name for p in (tmp_path / "00000" / "samples").iterdir()) == ["00000.png", "00001.png"]
    for index, metadata in enumerate(metadatas):
        with open(tmp_path / f"{index:05d}" / "metadata.jsonl") as file:
            assert json.load(file) == metadata
    for sample in ("00000.png", "00001.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "00000" / "samples" / sample)), uint8_image)


def test_export_needs_one_image_list_per_prompt(tmp_path):
    with pytest.raises(ValueError, match="one list per prompt"):
        export_geneval_layout(tmp_path, make_suite(num_per_category=1)[:2], [[]])
