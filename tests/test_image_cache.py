"""The image-embedding cache (tinyvlm/image_cache.py): a second question about the same image skips the vision
tower, through every path that encodes an image, and gets the same answer."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import tinyvlm
from tinyvlm.errors import TinyVLMError
from tinyvlm.image_cache import ImageCache

pytestmark = pytest.mark.torch  # the checkpoint is written through torch


@pytest.fixture(scope="module")
def vlm(checkpoints):
    return tinyvlm.load(checkpoints["v2"].path)


@pytest.fixture
def tower_runs(vlm, monkeypatch):
    """How many times the vision tower runs, counted from here."""
    runs = []
    features = vlm.vision.features
    monkeypatch.setattr(vlm.vision, "features", lambda pixels: runs.append(1) or features(pixels))
    vlm.image_cache = ImageCache(2)
    return runs


def photo(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8))


def test_same_pixels_skip_the_tower_and_give_the_same_answer(vlm, tower_runs, tmp_path):
    first = vlm.generate("What is in the image?", image=photo(0), max_new_tokens=6)
    path = tmp_path / "same.png"
    photo(0).save(path)  # the same picture through another path: a file
    again = vlm.generate("What is in the image?", image=str(path), max_new_tokens=6)
    assert len(tower_runs) == 1 and again == first
    assert vlm.image_cache.hits == 1 and vlm.image_cache.misses == 1
    vlm.image_cache = ImageCache(0)  # off: the tower runs every time
    assert vlm.generate("What is in the image?", image=photo(0), max_new_tokens=6) == first
    assert len(tower_runs) == 2


def test_chat_turns_and_image_command(vlm, tower_runs):
    chat = vlm.chat(image=photo(1))
    chat.send("Describe it.", max_new_tokens=3)
    chat = vlm.chat(image=photo(1))  # a new conversation about the same image (the CLI's /image)
    chat.send("And now?", max_new_tokens=3)
    assert len(tower_runs) == 1


def test_least_recently_used_is_evicted(vlm, tower_runs):
    for seed in (2, 3, 2, 4, 2, 3):  # size 2: 3 was the least recent when 4 came
        vlm.encode_image(photo(seed))
    assert len(tower_runs) == 4 and len(vlm.image_cache) == 2


def test_sizes():
    with pytest.raises(TinyVLMError, match="at least 0"):
        ImageCache(-1)
    with pytest.raises(TinyVLMError, match="at least 0"):
        ImageCache(True)
