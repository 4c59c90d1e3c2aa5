"""Image loading and CLIP preprocessing for MobileVLM.

Follows the official path of mobilevlm.md section 4.1: decode to RGB, pad to a square with the CLIP mean colour
(`image_aspect_ratio = pad`), then what transformers' CLIPImageProcessor does for openai/clip-vit-large-patch14-336:
PIL bicubic resize of the short side, centre crop, rescale by 1/255, per-channel mean/std normalisation, CHW layout.
The resize goes through Pillow on purpose: its fixed-point bicubic is what the reference runs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tinyvlm.config import CLIP_MEAN, CLIP_STD
from tinyvlm.errors import ImageError
# expand2square fills with the mean colour in 0..255, truncated: (122, 116, 104).
PAD_COLOR = (122, 116, 104)

_MIN_SIDE = 2


def _open_file(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: no such file (expected an image file)")
    try:
        with Image.open(path) as img:
            img.load()  # PIL decodes lazily: force it here so truncated files fail inside the try
            return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        # DecompressionBombWarning only arrives here when warnings are turned into errors (-W error).
        raise ImageError(f"{path}: not a readable image ({e})") from None


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageError(f"image array has shape {arr.shape} and dtype {arr.dtype}; expected (H, W, 3) uint8 RGB")
    return Image.fromarray(np.ascontiguousarray(arr))


def load_image(image: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """Return `image` as an RGB PIL image: a file path, a PIL image, or an (H, W, 3) uint8 array."""
    if isinstance(image, (str, Path)):
        name = str(image)
        img = _open_file(Path(image))
    elif isinstance(image, Image.Image):
        name = "PIL image"
        try:
            image.load()
            img = image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: cannot be decoded as RGB ({e})") from None
    elif isinstance(image, np.ndarray):
        name = f"image array {image.shape}"
        img = _from_array(image)
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; expected a path, PIL image or numpy array")
    w, h = img.size
    if w < _MIN_SIDE or h < _MIN_SIDE:
        raise ImageError(
            f"{name}: size {w}x{h} (width x height) is too small; expected both sides >= {_MIN_SIDE} pixels"
        )
    return img


def expand_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Pad the short side with `fill` so the image is centred on a square canvas (floor division)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _resize_short_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    short, long = min(w, h), max(w, h)
    long_new = int(size * long / short)  # truncated, as transformers computes it
    new = (size, long_new) if w <= h else (long_new, size)
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
    img = load_image(image)
    if aspect == "pad":
        img = expand_to_square(img)
    img = _center_crop(_resize_short_side(img, image_size), image_size)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    x = (x - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)
