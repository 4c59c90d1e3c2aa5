"""Model resolution: a local directory, or a model id found in the Hugging Face cache (downloaded into it first
when it is not there and the caller allows it: loading/download.py).

Reads the cache layout that huggingface_hub writes (its "Manage cache" guide) without importing it and without
network access:

    <cache>/models--{org}--{name}/refs/main            the commit hash the main branch pointed to
    <cache>/models--{org}--{name}/snapshots/<commit>/   the files of that commit (symlinks into blobs/)

<cache> is $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tinyvlm.errors import ModelNotFound, WeightsError
from tinyvlm.limits import short, shown
from tinyvlm.weights.store import file_kind, first_bytes

# An id is "org/name" (or a bare "name"): letters, digits, '-', '_' and '.', one slash at most.
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory, from the same environment variables huggingface_hub reads."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


class NotCached(ModelNotFound):
    """A model id with no complete snapshot in the cache."""


def resolve_model(path_or_id: str | Path, fetch: bool = False, tower: bool = False, whole: bool = False) -> Path:
    """An existing directory as is; otherwise the cached snapshot of the model id `org/name`. With `fetch`, an id
    whose snapshot is missing or incomplete (`complete`) is downloaded first (download.fetch; `tower`: a CLIP
    tower's config and one weight file); with `whole` alone, an incomplete snapshot is refused."""
    try:
        try:
            path = _resolve(path_or_id)
            if hub_cache_dir() not in path.parents or not (fetch or whole) or complete(path, tower):
                return path
            if not fetch:
                raise NotCached(f"model {path_or_id!r}: the cached snapshot {path} is incomplete (a download cut "
                                "short?); run again with the network to finish it")
        except NotCached:
            if not fetch:
                raise
        from tinyvlm.loading.download import fetch as download

        download(str(path_or_id), tower)
        path = _resolve(path_or_id)
        if not complete(path, tower):
            raise NotCached(f"model {path_or_id!r}: the download left {path} without its config or weights")
        return path
    except (OSError, RuntimeError, ValueError) as e:  # a name too long, "~nosuchuser", a NUL byte, no permission
        raise ModelNotFound(f"{short(str(path_or_id))}: cannot be a model directory or id ({short(str(e))})") from None


def complete(snapshot: Path, tower: bool = False) -> bool:
    """Whether a snapshot holds config.json, a tokenizer (unless `tower`) and whole weights: a sharded checkpoint's
    index and every shard (by their -NNNNN-of-NNNNN names and by the index), else one safetensors or .bin file. A
    download cut short leaves some of these out (huggingface_hub links a file in only once it is whole). The small
    tokenizer side files (tokenizer_config.json, ...) are not checked: a repo need not have them."""
    from tinyvlm.loading.download import weight_files

    if not (snapshot / "config.json").is_file():
        return False
    if not tower and not any((snapshot / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return False
    names = [p.name for p in snapshot.iterdir() if p.is_file()]  # is_file follows the links into blobs/
    weights = weight_files(names)
    if not weights:
        return False
    for name in weights:
        shard = _SHARD.search(name)
        if shard and any(_SHARD.sub(f"-{i:0{len(shard[1])}d}-of-{shard[2]}", name) not in names
                         for i in range(1, int(shard[2]) + 1)):
            return False
    index = next((n for n in weights if n.endswith(".index.json")), None)
    if index is None and any("-of-" in n for n in weights):
        return False  # shards are read through their index
    if index is not None:
        try:
            needed = set(json.loads((snapshot / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all(isinstance(n, str) and (snapshot / n).is_file() for n in needed)
    return True


_SHARD = re.compile(r"-(\d+)-of-(\d+)")


def _resolve(path_or_id: str | Path) -> Path:
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    how = f"download it with `huggingface-cli download {path_or_id}` or pass a local directory"
    if path.is_file():
        kind = file_kind(path)
        if kind is None:
            raise WeightsError(f"{path}: not a GGUF file or a known weight format (first bytes: {first_bytes(path)}); "
                               "pass a GGUF file or a model directory (holding config.json and the weights)")
        raise ModelNotFound(f"{path} is a {kind} file; pass the model directory that holds it with config.json")
    if path.exists():
        raise ModelNotFound(f"{path} is not a directory; pass the model directory (holding config.json and the "
                            "weights)")
    if isinstance(path_or_id, Path) or not _MODEL_ID.fullmatch(path_or_id):
        raise ModelNotFound(f"no model directory {shown(str(path))}; pass a directory holding config.json and the "
                            "weights")
    repo = hub_cache_dir() / ("models--" + path_or_id.replace("/", "--"))
    if not repo.is_dir():
        raise NotCached(f"model {path_or_id!r} not found: no directory {path} and no cache entry {repo}; {how}")
    return _snapshot(path_or_id, repo, how)


def _snapshot(model_id: str, repo: Path, how: str) -> Path:
    """The snapshot refs/main points to, or the only snapshot when refs/main is absent."""
    ref = repo / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        snapshot = repo / "snapshots" / commit
        if commit and "/" not in commit and snapshot.is_dir():
            return snapshot
        raise NotCached(f"model {model_id!r}: {ref} names commit {short(commit)}, but {snapshot} is missing; {how}")
    snapshots = _snapshots(repo)
    if len(snapshots) == 1:
        return snapshots[0]
    found = f"{len(snapshots)} snapshots" if snapshots else "no snapshot"
    raise NotCached(f"model {model_id!r}: {ref} is missing and {repo / 'snapshots'} holds {found}; {how}")


def _snapshots(repo: Path) -> list[Path]:
    snapshots = repo / "snapshots"
    return sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []


def find_cached_models(name_filter: str = "MobileVLM") -> list[str]:
    """Sorted ids of cached models that have a snapshot and whose id contains `name_filter` (any case)."""
    cache = hub_cache_dir()
    if not cache.is_dir():
        return []
    ids = []
    for repo in cache.glob("models--*"):
        model_id = repo.name[len("models--") :].replace("--", "/", 1)
        if name_filter.lower() in model_id.lower() and _snapshots(repo):
            ids.append(model_id)
    return sorted(ids)
