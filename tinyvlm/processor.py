"""Image loading and CLIP preprocessing for MobileVLM.

Follows the official path of mobilevlm.md section 4.1: decode to RGB, pad to a square with the CLIP mean colour
(`image_aspect_ratio = pad`), then what transformers' CLIPImageProcessor does for openai/clip-vit-large-patch14-336:
PIL bicubic resize of the short side, centre crop, rescale by 1/255, per-channel mean/std normalisation, CHW layout.
The resize goes through Pillow on purpose: its fixed-point bicubic is what the reference runs.

Images come from strangers, like model files: every bad one raises one `ImageError`, a single line that names the
file (or "PIL image", or the array's shape) and what was wrong. The rules, for files and PIL images alike:

* Size. An image of more than `PIL.Image.MAX_IMAGE_PIXELS` pixels (89,478,485 by default, about 9459 x 9459) is
  refused before it is decoded, also between 1x and 2x that limit, where Pillow itself only warns. So is any image
  built from it on the way (the padded square, the image resized to `image_size` on its short side), which bounds
  the memory an extreme aspect ratio would take. Set `PIL.Image.MAX_IMAGE_PIXELS` to change the limit.
* Decoding. Truncated, empty, unidentified and unreadable files, and whatever else a decoder raises, are "not a
  readable image"; only regular files are opened (a FIFO would block), and EPS is refused (Pillow decodes it by
  running Ghostscript). Of an animated image (GIF, APNG, WebP) or a multi-page one, the first frame is used.
* Orientation. The EXIF Orientation tag is applied (the transposes of `PIL.ImageOps.exif_transpose`, which
  transformers' `load_image` calls), on the converted copy so that a hostile EXIF block is only read, never
  rewritten. A malformed EXIF block is ignored: the image is used as stored.
* Colour, as the reference (`.convert("RGB")` in MobileVLM and in transformers): alpha is dropped, not composited
  (the colour under a transparent pixel is kept); 1-bit, grey, palette, CMYK, YCbCr and float ("F": values read as
  0..255, clipped) use Pillow's conversion; palette images with transparency go through RGBA (the same pixels,
  without Pillow's "Palette images with Transparency" warning). One exception: 16- and 32-bit integer grey ("I;16*",
  "I"), which Pillow's conversion clips to 0..255 so that a 16-bit photo turns white, are scaled to 8 bits by
  their type's range: v >> 8 for 16 bits, max(v, 0) >> 23 for signed 32 bits. "I" is 32 bits but often holds
  16-bit data (Pillow opens 16-bit PGM as "I", and 16-bit PNG before Pillow 10.3): read as 16-bit when every value
  fits 0..65535.

Arrays are taken as they are: (H, W, 3) uint8 RGB, nothing else.
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from tinyvlm.config import CLIP_MEAN, CLIP_STD
from tinyvlm.errors import ImageError
# expand2square fills with the mean colour in 0..255, truncated: (122, 116, 104).
PAD_COLOR = (122, 116, 104)

_MIN_SIDE = 2
_TRANSPOSE = {  # EXIF Orientation -> the transpose that makes the image upright (as PIL.ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_BOMB = (Image.DecompressionBombWarning, Image.DecompressionBombError)


def _error(message: str) -> ImageError:
    """An ImageError whose message is one line, even when a file name or a decoder's message holds line breaks."""
    return ImageError(message.replace("\r", "\\r").replace("\n", "\\n"))


def _too_large(name: str, what: str, pixels: int | str) -> ImageError:
    return _error(f"{name}: {what} has {pixels} pixels, too large: the limit is {Image.MAX_IMAGE_PIXELS} "
                  f"(PIL.Image.MAX_IMAGE_PIXELS; more could be a decompression bomb)")


def _check_pixels(name: str, what: str, w: int, h: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise _too_large(name, f"{what} ({w}x{h})", w * h)


def _orientation(img: Image.Image) -> int:
    """The EXIF Orientation of `img` (1..8), or 1 (as stored) when there is none or the EXIF block is malformed."""
    try:
        value = img.getexif().get(0x0112, 1)  # 0x0112: Orientation
    except Exception:  # garbage EXIF raises SyntaxError, struct.error, ...: ignored, as the rules say
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image of any Pillow mode -> RGB, by the colour rules of the module docstring."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        a = np.asarray(img)  # (H, W) uint16 (any byte order) or int32
        shift = 8 if a.dtype.itemsize == 2 or (a.min(initial=0) >= 0 and a.max(initial=0) <= 0xFFFF) else 23
        return Image.fromarray((np.maximum(a, 0) >> shift).astype(np.uint8)).convert("RGB")  # (H, W) L -> RGB
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _decode(name: str, img: Image.Image) -> Image.Image:
    """An opened (perhaps not yet decoded) image -> an upright RGB copy."""
    _check_pixels(name, "the image", *img.size)
    if img.format == "EPS":
        raise _error(f"{name}: EPS is refused (Pillow decodes it by running Ghostscript); expected a raster image")
    img.load()  # PIL decodes lazily: force it here so truncated files fail inside the caller's try
    _check_pixels(name, "the decoded image", *img.size)
    orientation = _orientation(img)
    rgb = _to_rgb(img)
    return rgb.transpose(_TRANSPOSE[orientation]) if orientation != 1 else rgb


def _read(name: str, source: Path | Image.Image | bytes) -> Image.Image:
    """Decode a file or a PIL image with the rules of the module docstring; every failure is one ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused from 1x the limit, not 2x
            warnings.filterwarnings("ignore", "(Possibly )?Corrupt EXIF data")  # what Pillow skips, we ignore
            if isinstance(source, Image.Image):
                return _decode(name, source)
            if isinstance(source, bytes):
                with Image.open(io.BytesIO(source)) as img:
                    return _decode(name, img)
            if not source.is_file():
                problem = "not a regular file" if source.exists() else "no such file"
                raise _error(f"{name}: {problem} (expected an image file)")
            with Image.open(source) as img:
                return _decode(name, img)
    except ImageError:
        raise
    except _BOMB as e:  # raised by Image.open, which knows the size only in its message
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(name, "the image", found.group(1) if found else "more") from None
    except Exception as e:  # decoders of untrusted bytes raise OSError, SyntaxError, ValueError, EOFError, ...
        raise _error(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageError(f"image array has shape {arr.shape} and dtype {arr.dtype}; expected (H, W, 3) uint8 RGB")
    return Image.fromarray(np.ascontiguousarray(arr))


def _load(image: str | Path | Image.Image | np.ndarray | bytes) -> tuple[str, Image.Image]:
    """(name for messages, RGB image) of a file path, a PIL image, an (H, W, 3) uint8 array, or a file's bytes."""
    if isinstance(image, (str, Path)):
        name = str(image)
        img = _read(name, Path(image))
    elif isinstance(image, Image.Image):
        name = "PIL image"
        img = _read(name, image)
    elif isinstance(image, (bytes, bytearray)):
        name = "image data"
        img = _read(name, bytes(image))
    elif isinstance(image, np.ndarray):
        name = f"image array {image.shape}"
        img = _from_array(image)
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; expected a path, PIL image or numpy array")
    w, h = img.size
    if w < _MIN_SIDE or h < _MIN_SIDE:
        raise _error(f"{name}: size {w}x{h} (width x height) is too small; expected both sides >= {_MIN_SIDE} pixels")
    return name, img


def load_image(image: str | Path | Image.Image | np.ndarray | bytes) -> Image.Image:
    """Return `image` as an upright RGB PIL image: a file path, a PIL image, an (H, W, 3) uint8 array, or the
    bytes of an image file."""
    return _load(image)[1]


def expand_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Pad the short side with `fill` so the image is centred on a square canvas (floor division)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _resize_short_side(img: Image.Image, size: int, name: str = "image") -> Image.Image:
    w, h = img.size
    short, long = min(w, h), max(w, h)
    long_new = int(size * long / short)  # truncated, as transformers computes it
    new = (size, long_new) if w <= h else (long_new, size)
    _check_pixels(name, "the resized image", *new)
    return img.resize(new, Image.Resampling.BICUBIC)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess(
    image: str | Path | Image.Image | np.ndarray, image_size: int = 336, aspect: str = "pad"
) -> np.ndarray:
    """Image -> float32 pixels [3, image_size, image_size], normalised for CLIP.

    aspect "pad" pads to a square first (MobileVLM's `image_aspect_ratio`); anything else is plain CLIP
    preprocessing (resize the short side, centre crop).
    """
    name, img = _load(image)
    if aspect == "pad":
        side = max(img.size)
        _check_pixels(name, "the padded square", side, side)
        img = expand_to_square(img)
    img = _center_crop(_resize_short_side(img, image_size, name), image_size)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    x = (x - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)
