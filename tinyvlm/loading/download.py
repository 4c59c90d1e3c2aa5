"""Download on first use: a model id that is not complete in the Hugging Face cache is fetched with huggingface_hub
(installed with `tokenizers`), into that cache, with its progress bars, as mlx-vlm and transformers do.

Only what tinyvlm reads is fetched: the config, the tokenizer files and the weights (the safetensors files and
their index where the repo has them, else the PyTorch .bin files). A V1 model's CLIP tower (the repo its
`mm_vision_tower` names) is fetched the same way, but only its config and one weight file. Offline
(`HF_HUB_OFFLINE=1`, `--offline`, `load(..., offline=True)`) nothing touches the network.

A download that fails (no network, no such repo, a gated or private one, a connection cut mid-file) raises one
ModelNotFound line. huggingface_hub links a file into the snapshot only once it is whole, and `complete` (hub.py)
accepts a snapshot only when its config and every weight file are there, so what a failure leaves behind is never
loaded as a model: the next run online resumes the download.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from tinyvlm.errors import ModelNotFound
from tinyvlm.limits import shown

# Besides the weights, the files tinyvlm reads from a model repo (config.py, tokenizer.py).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json")
_SAFETENSORS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")  # what weights/store.py opens
_BIN = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")
_INDEX = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


def offline(flag: bool | None = None) -> bool:
    """The flag when given, else whether HF_HUB_OFFLINE is set to a true value (huggingface_hub's own rule)."""
    if flag is not None:
        return flag
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def weight_files(names: list[str], one: bool = False) -> list[str]:
    """The weight files tinyvlm would read out of a repo's top-level `names`: every safetensors shard and its index
    when there are any, else the PyTorch ones; with `one`, a single whole-model file (a CLIP tower's)."""
    top = [n for n in names if "/" not in n]
    for pattern, index in ((_SAFETENSORS, "model.safetensors.index.json"), (_BIN, "pytorch_model.bin.index.json")):
        found = sorted(n for n in top if pattern.fullmatch(n))
        if one:
            whole = [n for n in found if "-of-" not in n]
            if whole:
                return whole[:1]
        elif found:
            return found + ([index] if index in top else [])
    return []


def fetch(model_id: str, tower: bool = False) -> Path:
    """Download `model_id` (a model, or with `tower` a CLIP tower) into the Hugging Face cache; its snapshot."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        names = [s.rfilename for s in (HfApi().model_info(model_id).siblings or [])]
        weights = weight_files(names, one=tower)
        if not weights:
            raise ModelNotFound(f"model {model_id!r} on the Hugging Face Hub has no weight file tinyvlm reads "
                                f"(safetensors or pytorch_model .bin); its files: {shown(', '.join(names))}")
        wanted = ["config.json"] if tower else [n for n in names if n in MODEL_FILES]
        return Path(snapshot_download(model_id, allow_patterns=wanted + weights))
    except ModelNotFound:
        raise
    except Exception as e:  # huggingface_hub's and httpx's errors: one line, never a traceback
        raise ModelNotFound(_why(model_id, e)) from None


def _why(model_id: str, e: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    kind = type(e).__name__
    if isinstance(e, GatedRepoError):  # a kind of RepositoryNotFoundError: asked first
        return (f"model {model_id!r} is gated on the Hugging Face Hub: accept its terms on huggingface.co, then log in "
                "(`hf auth login`)")
    if isinstance(e, RepositoryNotFoundError):
        return (f"model {model_id!r} is not on the Hugging Face Hub, or is private (log in with `hf auth login` if "
                "it is yours)")
    text = str(e).strip()
    first = shown(text.splitlines()[0][:200] if text else kind)
    return (f"could not download model {model_id!r} from the Hugging Face Hub ({kind}: {first}); check the network, "
            "or run offline (HF_HUB_OFFLINE=1) with a model already in the cache")
