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
    from tinyvlm.chat import Chat
    from tinyvlm.loading import load
    from tinyvlm.vlm import VLM


def __getattr__(name: str) -> Any:
    if name == "load":
        from tinyvlm.loading import load

        return load
    if name == "VLM":
        from tinyvlm.vlm import VLM

        return VLM
    if name == "Chat":
        from tinyvlm.chat import Chat

        return Chat
    raise AttributeError(f"module 'tinyvlm' has no attribute {name!r}")
