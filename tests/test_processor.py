"""tinyvlm.processor against transformers' PIL CLIP image processor, after the reference pad-to-square.

In transformers 5.23 `CLIPImageProcessor` falls back to `CLIPImageProcessorPil` when torchvision is missing
(it is, here); we import the PIL class directly so the reference is the Pillow bicubic path the real model used.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tinyvlm.errors import ImageError
from tinyvlm.processor import CLIP_MEAN, CLIP_STD, PAD_COLOR, expand_to_square, load_image, preprocess

BACKEND_FREE = True  # no model runs here: kernels, files and text only

TOL = 1e-5  # max abs difference of normalised pixels


@pytest.fixture(scope="module")
def reference() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        resample=3,
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def reference_pad(img: Image.Image) -> Image.Image:
    """expand2square from mobilevlm.md 4.1, written independently of tinyvlm."""
    w, h = img.size
    fill = tuple(int(m * 255) for m in (0.48145466, 0.4578275, 0.40821073))
    if w == h:
        return img
    if w > h:
        out = Image.new("RGB", (w, w), fill)
        out.paste(img, (0, (w - h) // 2))
    else:
        out = Image.new("RGB", (h, h), fill)
        out.paste(img, ((h - w) // 2, 0))
    return out


def reference_pixels(proc: CLIPImageProcessorPil, img: Image.Image, pad: bool) -> np.ndarray:
    rgb = img.convert("RGB")
    if pad:
        rgb = reference_pad(rgb)
    return proc(images=rgb, return_tensors="np")["pixel_values"][0]


def test_constants() -> None:
    assert PAD_COLOR == (122, 116, 104)
    assert CLIP_MEAN.dtype == CLIP_STD.dtype == np.float32


def test_real_photo(shared_data: Path, reference: CLIPImageProcessorPil) -> None:
    path = shared_data / "images" / "test-1.jpeg"
    ours = preprocess(path)
    ref = reference_pixels(reference, Image.open(path), pad=True)
    assert ours.shape == (3, 336, 336) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= TOL
    plain = preprocess(str(path), aspect="none")
    assert np.abs(plain - reference_pixels(reference, Image.open(path), pad=False)).max() <= TOL


SIZES = [(97, 301, 0), (413, 120, 1), (50, 51, 2), (640, 333, 3), (2, 9, 4), (336, 336, 5)]  # (h, w, seed)


@pytest.mark.parametrize("h, w, seed", SIZES)
@pytest.mark.parametrize("aspect", ["pad", "plain"])
def test_random_arrays(reference: CLIPImageProcessorPil, h: int, w: int, seed: int, aspect: str) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ours = preprocess(arr, aspect=aspect)
    ref = reference_pixels(reference, Image.fromarray(arr), pad=aspect == "pad")
    assert ours.shape == ref.shape == (3, 336, 336)
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_other_modes(reference: CLIPImageProcessorPil, mode: str) -> None:
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (123, 77, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA").convert(mode)
    ours = preprocess(img)
    ref = reference_pixels(reference, img, pad=True)
    assert np.abs(ours - ref).max() <= TOL


def test_other_image_sizes(reference: CLIPImageProcessorPil) -> None:
    arr = np.random.default_rng(8).integers(0, 256, (100, 41, 3), dtype=np.uint8)
    proc = CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3, do_center_crop=True
    )
    ref = proc(images=Image.fromarray(arr), return_tensors="np")["pixel_values"][0]
    assert np.abs(preprocess(arr, image_size=224, aspect="plain") - ref).max() <= TOL


def test_expand_to_square_is_centred() -> None:
    img = Image.new("RGB", (5, 2), (255, 0, 0))
    sq = np.asarray(expand_to_square(img))
    assert sq.shape == (5, 5, 3)
    rows = np.where((sq == (255, 0, 0)).all(axis=2).any(axis=1))[0]
    assert list(rows) == [1, 2]  # (5 - 2) // 2 = 1 pad row on top, 2 below
    assert tuple(sq[0, 0]) == PAD_COLOR
    tall = np.asarray(expand_to_square(Image.new("RGB", (1, 4), (0, 0, 255))))
    assert list(np.where((tall == (0, 0, 255)).all(axis=2).any(axis=0))[0]) == [1]


def test_load_image_returns_rgb(shared_data: Path) -> None:
    img = load_image(shared_data / "images" / "test-1.jpeg")
    assert img.mode == "RGB"
    assert load_image(Image.new("L", (3, 3))).mode == "RGB"


def _one_line_error(image: object, *words: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(image)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg


def test_bad_files(tmp_path: Path, shared_data: Path) -> None:
    _one_line_error(tmp_path / "missing.png", "missing.png", "no such file")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    _one_line_error(text, "notes.png", "not a readable image")
    _one_line_error(str(tmp_path), str(tmp_path))
    data = (shared_data / "images" / "test-1.jpeg").read_bytes()
    cut = tmp_path / "cut.jpeg"
    cut.write_bytes(data[: len(data) // 2])
    _one_line_error(cut, "cut.jpeg", "truncated")
    with Image.open(cut) as lazy:  # opened but not decoded: load_image must force the decode inside its try
        _one_line_error(lazy, "PIL image", "truncated")
    empty = tmp_path / "empty.jpeg"
    empty.write_bytes(b"")
    _one_line_error(empty, "empty.jpeg")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 8)).save(tiny)
    _one_line_error(tiny, "tiny.png", "1x8", "too small")


def test_bad_arrays_and_objects() -> None:
    _one_line_error(np.zeros((4, 5), np.uint8), "(4, 5)", "(H, W, 3) uint8")
    _one_line_error(np.zeros((4, 5, 4), np.uint8), "(4, 5, 4)")
    _one_line_error(np.zeros((4, 5, 3), np.float32), "float32")
    _one_line_error(np.zeros((0, 5, 3), np.uint8), "(0, 5, 3)", "too small")
    _one_line_error(np.zeros((8, 1, 3), np.uint8), "(8, 1, 3)", "too small")
    _one_line_error(Image.new("RGB", (0, 0)), "0x0", "too small")
    _one_line_error(12, "int")


def test_decompression_bombs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 1600 pixels > 2 x 600: an error in PIL
    _one_line_error(path, "big.png", "too large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels in (1000, 2000]: only a warning in PIL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _one_line_error(path, "big.png")
