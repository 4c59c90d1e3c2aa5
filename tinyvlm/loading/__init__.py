"""`load()`: a model directory, a Hugging Face id in the local cache, or a GGUF file -> a ready VLM.

    hf.py    directories (pytorch_model.bin, safetensors, tinyvlm's quantized file) and cached ids
    gguf.py  llama.cpp's LLM .gguf, with its mmproj image encoder
    hub.py   the Hugging Face cache, without huggingface_hub or network
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from tinyvlm import backends
from tinyvlm.errors import TinyVLMError
from tinyvlm.loading import download
from tinyvlm.loading.gguf import is_gguf, load_gguf
from tinyvlm.loading.hf import load_dir
from tinyvlm.quantize import Progress, check_quant
from tinyvlm.vlm import VLM


def load(path_or_repo_id: str | Path, *, quant: str | None = None,
         backend: str | backends.Backend | None = None,
         threads: int | None = None, vision_tower: str | Path | None = None, progress: Progress | bool | None = None,
         mmproj: str | Path | None = None, decode_activations: str | None = None,
         vision_weights: str | None = None, offline: bool | None = None) -> VLM:
    """Load a MobileVLM (V1 or V2), a text-only MobileLLaMA / LLaMA checkpoint, or a llama.cpp GGUF LLM.

    `path_or_repo_id`: a directory, an id such as `mtgv/MobileVLM_V2-1.7B` found in the Hugging Face cache, or an
    LLM GGUF file. `quant`: "int4" or "int8" quantizes the LLM's linear layers while loading (tinyvlm.quantize);
    a file written by `python -m tinyvlm quantize` is already quantized. `backend`: "numpy", "numba" or "cuda"
    (default: $TINYVLM_BACKEND, else numba when it can be imported), or a backend object made with its own settings
    (then threads, decode_activations and vision_weights must be left unset); `threads`: its thread count.
    `vision_tower`: a CLIP directory or id to use instead of the one the config names. `progress`: True for a console
    bar on stderr, or a callback(done, total). `mmproj`: with an LLM GGUF file, llama.cpp's image encoder file of
    the same model.
    `decode_activations`: "int8" (default, or $TINYVLM_DECODE_ACTIVATIONS) quantizes one token's activations before
    each quantized matrix, for integer dot products; "float32" keeps them in float. `vision_weights`: "float32"
    (default, or $TINYVLM_VISION_WEIGHTS) or "int8", the vision tower's linear weights as q8_0 blocks (a quarter of
    the memory; its error against float32: tests/test_vision_int8.py).
    An id that is not in the cache is downloaded first, with huggingface_hub, into the cache (only the files
    tinyvlm reads; a V1 model's CLIP tower too), unless `offline` (default: $HF_HUB_OFFLINE) says not to touch the
    network.
    A backend that compiles its kernels compiles them here (or loads them from its cache), not at the first answer.
    """
    check_quant(quant)
    if isinstance(backend, backends.Backend):
        if (threads, decode_activations, vision_weights) != (None, None, None):
            raise TinyVLMError("threads, decode_activations and vision_weights are the backend's own settings: "
                               "give them to the backend object, not to load()")
        bk = backend
    else:
        bk = backends.make(backend, threads, decode_activations, vision_weights)
    report: Progress | None = console_progress if progress is True else (progress or None)
    if is_gguf(path_or_repo_id):
        vlm = load_gguf(path_or_repo_id, quant, bk, report, mmproj)
    elif mmproj is not None:
        raise TinyVLMError(f"{path_or_repo_id}: not an LLM GGUF file; mmproj={mmproj} goes only with one "
                           "(llama.cpp's pair: LLM .gguf + mmproj .gguf)")
    else:
        vlm = load_dir(path_or_repo_id, quant, bk, report, vision_tower, fetch=not download.offline(offline))
    if bk.compiles:
        _warm_up(vlm, progress is True)
    return vlm


def console_progress(done: int, total: int) -> None:
    """A loading bar on stderr, ending with a newline at done == total."""
    width = 30
    filled = width * min(done, total) // max(total, 1)
    end = "\n" if done == total else ""
    print(f"\rloading weights [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr)


def _warm_up(vlm: VLM, show: bool) -> None:
    """Compile the backend's kernels (or load them from its cache) by running each once, behind a console line."""
    if show:
        print("compiling kernels (first run only; later runs read numba's cache) ...", end="", file=sys.stderr,
              flush=True)
    t0 = time.perf_counter()
    vlm.warm_up()
    if show:
        print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr)
