"""tinyvlm.processor against transformers' PIL CLIP image processor, after the reference pad-to-square.

In transformers 5.23 `CLIPImageProcessor` falls back to `CLIPImageProcessorPil` when torchvision is missing
(it is, here); we import the PIL class directly so the reference is the Pillow bicubic path the real model used.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from tinyvlm.errors import ImageError
from tinyvlm.processor import CLIP_MEAN, CLIP_STD, PAD_COLOR, expand_to_square, load_image, preprocess

if TYPE_CHECKING:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

BACKEND_FREE = True  # no model runs here: kernels, files and text only

TOL = 1e-5  # max abs difference of normalised pixels


@pytest.fixture(scope="module")
def reference() -> CLIPImageProcessorPil:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

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
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

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


# ----------------------------------------------------------------------------------------------------------
# Hostile and unusual images: each bad one is one ImageError; each odd mode a sensible RGB image.


def _noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _rgb(image: object) -> np.ndarray:
    img = load_image(image)  # type: ignore[arg-type]
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)  # (H, W, 3)


def _save(img: Image.Image, path: Path, **save: object) -> Path:
    img.save(path, **save)  # type: ignore[arg-type]
    return path


def _file_and_object(img: Image.Image, path: Path, **save: object) -> list[np.ndarray]:
    """`img` saved to `path`, read back by path and as a lazily opened PIL image: the two must agree."""
    with Image.open(_save(img, path, **save)) as lazy:
        both = [_rgb(path), _rgb(lazy)]
    assert np.array_equal(both[0], both[1])
    return both


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path: Path, fmt: str) -> None:
    whole = tmp_path / f"whole.{fmt.lower()}"
    _noise(64, 48).save(whole, fmt)
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    _one_line_error(cut, str(cut), "not a readable image")
    with Image.open(cut) as lazy:
        _one_line_error(lazy, "PIL image", "not a readable image")
    header_only = tmp_path / f"header.{fmt.lower()}"
    header_only.write_bytes(data[:40])
    _one_line_error(header_only, str(header_only), "not a readable image")


def test_empty_and_non_image_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _one_line_error(empty, str(empty), "not a readable image")
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _one_line_error(noise, str(noise), "not a readable image")
    script = tmp_path / "photo.gif"
    script.write_text("#!/bin/sh\necho not an image\n")
    _one_line_error(script, str(script), "not a readable image")
    eps = tmp_path / "page.eps"  # a valid EPS: Pillow would run Ghostscript to decode it
    Image.new("RGB", (8, 8)).save(eps, "EPS")
    _one_line_error(eps, str(eps), "EPS", "Ghostscript")


def test_not_regular_files(tmp_path: Path) -> None:
    _one_line_error(tmp_path, str(tmp_path), "not a regular file")
    if hasattr(os, "mkfifo"):  # opening a FIFO with no writer would block forever: refused before any open
        fifo = tmp_path / "pipe.png"
        os.mkfifo(fifo)
        _one_line_error(fifo, str(fifo), "not a regular file")
    odd = tmp_path / "two\nlines.png"
    odd.write_text("x")
    _one_line_error(odd, "two\\nlines.png", "not a readable image")  # still one line


def test_pixel_limit_both_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow warns between 1x and 2x MAX_IMAGE_PIXELS and raises above 2x; tinyvlm refuses both, whatever the
    warning filters, and names the pixel count and the limit."""
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(path)  # 1600 pixels
    filters = list(warnings.filters)
    for limit in (1000, 600):  # the warning range, then the error range
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        for action in ("always", "ignore", "error"):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter(action)  # type: ignore[call-overload]
                _one_line_error(path, str(path), "1600 pixels", f"limit is {limit}", "MAX_IMAGE_PIXELS")
            assert not seen  # Pillow's DecompressionBombWarning does not escape
        _one_line_error(Image.new("RGB", (40, 40)), "PIL image", "(40x40) has 1600 pixels", f"limit is {limit}")
    assert warnings.filters == filters  # our catch_warnings left the global filters as they were
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1600)  # at the limit: accepted
    assert load_image(path).size == (40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit
    assert load_image(path).size == (40, 40)


@pytest.mark.parametrize("side", [10_000, 14_000])  # 1.12x and 2.19x the default limit
def test_pixel_limit_default(tmp_path: Path, side: int) -> None:
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)
    assert path.stat().st_size < 100_000  # small on disk, 12.5-25 MB of 1-bit pixels, 300-600 MB as RGB
    _one_line_error(path, str(path), f"{side * side} pixels", "limit is 89478485")


def test_padded_and_resized_images_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long thin image is within the limit, but its padded square or resized copy would not be."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    arr = np.zeros((2, 40, 3), np.uint8)  # 80 pixels
    with pytest.raises(ImageError, match=r"padded square \(40x40\) has 1600 pixels"):
        preprocess(arr)
    with pytest.raises(ImageError, match=r"resized image \(400x20\) has 8000 pixels"):
        preprocess(arr, image_size=20, aspect="plain")
    assert preprocess(arr, image_size=4, aspect="plain").shape == (3, 4, 4)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red
    img.paste((0, 128, 255, 64), (8, 0, 16, 8))  # Pillow's CMYK -> RGB: (191, 95, 0)
    path = tmp_path / "cmyk.jpg"
    for rgb in _file_and_object(img, path, quality=100):
        assert np.abs(rgb[:, :8] - (255, 0, 0)).max() <= 2
        assert np.abs(rgb[:, 8:] - (191, 95, 0)).max() <= 2
    assert Image.open(path).mode == "CMYK"


def test_16_and_32_bit_grey(tmp_path: Path) -> None:
    values = np.array([[0, 0x00FF, 0x8000, 0xFFFF]] * 2, np.uint16)  # 2 rows: the smallest image
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).convert("RGB").getpixel((2, 0)) == (255, 255, 255)  # Pillow clips: 0x8000 turns white
    expected = [0, 0, 128, 255]  # v >> 8
    for rgb in _file_and_object(Image.fromarray(values), path):
        assert rgb.shape == (2, 4, 3) and list(rgb[0, :, 0]) == expected and (rgb == rgb[..., :1]).all()
    for fmt, mode in [("PPM", "I"), ("TIFF", "I;16")]:  # Pillow opens a 16-bit PGM as "I"
        file = tmp_path / f"deep.{fmt.lower()}"
        for rgb in _file_and_object(Image.fromarray(values), file, format=fmt):
            assert list(rgb[0, :, 0]) == expected
        assert Image.open(file).mode == mode
    big_endian = Image.frombytes("I;16B", (4, 2), values.astype(">u2").tobytes())  # .convert("I;16B") clips too
    assert list(_rgb(big_endian)[0, :, 0]) == expected
    wide = np.array([[2**31 - 1, 2**30, -5, 70_000, 0x8000]] * 2, np.int32)  # holds more than 16 bits: signed 32-bit
    assert list(_rgb(Image.fromarray(wide))[0, :, 0]) == [255, 128, 0, 0, 0]


def test_palette_images(tmp_path: Path) -> None:
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    img.putpixel((1, 0), 1)
    img.putpixel((2, 0), 2)
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency" warning
        for rgb in _file_and_object(img, tmp_path / "plain.png"):
            assert [tuple(p) for p in rgb[0]] == expected
        for transparency in (1, b"\xff\x00\xff"):  # one index, or a tRNS alpha per palette entry
            clear = img.copy()
            clear.info["transparency"] = transparency
            assert [tuple(p) for p in _rgb(clear)[0]] == expected  # alpha dropped: the palette colour stays
            for rgb in _file_and_object(clear, tmp_path / "clear.png"):
                assert [tuple(p) for p in rgb[0]] == expected
        for rgb in _file_and_object(img, tmp_path / "clear.gif", transparency=1):
            assert [tuple(p) for p in rgb[0]] == expected


def test_alpha_is_dropped(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 0))  # fully transparent: the colour underneath is kept
    la = Image.new("LA", (3, 2), (77, 0))
    pa = Image.new("PA", (3, 2), (1, 0))
    pa.putpalette([0, 0, 0, 5, 6, 7])
    for img, pixel in [(rgba, (10, 20, 30)), (la, (77, 77, 77)), (pa, (5, 6, 7))]:
        assert (_rgb(img) == pixel).all(), img.mode
    for img, pixel in [(rgba, (10, 20, 30)), (la, (77, 77, 77))]:
        for rgb in _file_and_object(img, tmp_path / f"{img.mode}.png"):
            assert (rgb == pixel).all()


def test_one_bit_and_float(tmp_path: Path) -> None:
    bits = Image.new("1", (3, 2), 0)
    bits.putpixel((1, 1), 1)
    for rgb in _file_and_object(bits, tmp_path / "bits.png"):
        assert rgb[1, 1].tolist() == [255, 255, 255] and rgb.sum() == 3 * 255
    floats = Image.fromarray(np.array([[-3.0, 0.0, 100.0, 255.0, 300.0]] * 2, np.float32))  # "F": read as 0..255
    for rgb in _file_and_object(floats, tmp_path / "floats.tiff"):
        assert rgb[0, :, 0].tolist() == [0, 0, 100, 255, 255] and (rgb == rgb[..., :1]).all()


def _with_exif(img: Image.Image, path: Path, orientation: int, **save: object) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(img, path, exif=exif.tobytes(), **save)


def test_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    img.putpixel((0, 0), (255, 0, 0))  # stored top-left
    path = _with_exif(img, tmp_path / "six.png", 6)  # 6: rotate 90 degrees clockwise to view
    with Image.open(path) as lazy:
        both = [_rgb(path), _rgb(lazy)]
    for rgb in both:
        assert rgb.shape == (4, 2, 3)  # width and height swapped
        assert rgb[0, 1].tolist() == [255, 0, 0] and rgb[0, 0].tolist() == [0, 0, 255]  # now top-right
    for orientation in range(1, 9):  # the same as PIL.ImageOps.exif_transpose, which transformers calls
        path = _with_exif(img, tmp_path / f"o{orientation}.png", orientation)
        assert np.array_equal(_rgb(path), np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))
    block = Image.new("RGB", (16, 8), (0, 0, 255))
    block.paste((255, 0, 0), (0, 0, 8, 8))
    rgb = _rgb(_with_exif(block, tmp_path / "six.jpg", 6, quality=100, subsampling=0))
    assert rgb.shape == (16, 8, 3)  # the red block, stored on the left, is now on top
    assert np.abs(rgb[:8] - (255, 0, 0)).max() <= 8 and np.abs(rgb[8:] - (0, 0, 255)).max() <= 8


GARBAGE_EXIF = [
    b"garbage!" * 10,
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01" * 40,  # claims 65535 entries in 40 bytes
    b"II*\x00\xf0\xff\xff\x7f",  # first IFD far beyond the block
]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_malformed_exif_is_ignored(tmp_path: Path, fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    img = Image.new("RGB", (4, 2), (9, 9, 9))
    weird = Image.Exif()
    weird[0x0112] = 9  # not an orientation
    blocks = [*GARBAGE_EXIF, weird.tobytes()]
    for i, exif in enumerate(blocks):
        path = _save(img, tmp_path / f"e{i}.{fmt.lower()}", format=fmt, exif=exif)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Image.open of a JPEG already reads the EXIF block, and warns
            lazy = Image.open(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # load_image neither raises nor warns about the EXIF block
            for rgb in [_rgb(path), _rgb(lazy)]:
                assert rgb.shape == (2, 4, 3) and (rgb == 9).all()  # as stored


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_use_the_first_frame(tmp_path: Path, fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (8, 6), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / f"anim.{fmt.lower()}"
    save = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, **save)
    with Image.open(path) as anim:
        assert getattr(anim, "n_frames", 1) == 3
    for rgb in [_rgb(path), _rgb(Image.open(path))]:
        assert (rgb == (255, 0, 0)).all()
