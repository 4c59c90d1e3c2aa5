"""tinyvlm: MobileVLM (V1 and V2) in NumPy.

    vlm = tinyvlm.load("mtgv/MobileVLM_V2-1.7B")
    print(vlm.generate("What is in the image?", image="photo.jpg"))

The heavy parts are imported on first use, so `python -m tinyvlm --help` stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinyvlm.errors import TinyVLMError

__version__ = "0.1.0"
__all__ = ["load", "VLM", "Chat", "TinyVLMError", "__version__"]

if TYPE_CHECKING:
    from tinyvlm.loader import load
    from tinyvlm.vlm import VLM, Chat


def __getattr__(name: str) -> Any:
    if name == "load":
        from tinyvlm.loader import load

        return load
    if name in ("VLM", "Chat"):
        from tinyvlm import vlm

        return getattr(vlm, name)
    raise AttributeError(f"module 'tinyvlm' has no attribute {name!r}")
