"""Model resolution against fake Hugging Face cache trees (the layout huggingface_hub writes), offline."""
from __future__ import annotations

from pathlib import Path

import pytest

from tinyvlm.errors import ModelNotFound, WeightsError
from tinyvlm.loading.hub import find_cached_models, hub_cache_dir, resolve_model

BACKEND_FREE = True  # no model runs here: kernels, files and text only

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CACHE_VARS = ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in CACHE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def make_entry(cache: Path, model_id: str, commits: tuple[str, ...] = (COMMIT,), ref: str | None = COMMIT) -> Path:
    repo = cache / ("models--" + model_id.replace("/", "--"))
    for commit in commits:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    if ref is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(ref)  # huggingface_hub writes no newline
    return repo


def test_existing_directory_returned_as_is(tmp_path: Path) -> None:
    local = tmp_path / "mtgv" / "MobileVLM_V2-1.7B"
    local.mkdir(parents=True)
    make_entry(tmp_path / "home" / ".cache" / "huggingface" / "hub", "mtgv/MobileVLM_V2-1.7B")
    assert resolve_model(local) == local
    assert resolve_model("mtgv/MobileVLM_V2-1.7B") == Path("mtgv/MobileVLM_V2-1.7B")  # local dir wins over the cache


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hub_cache_dir() == tmp_path / "hfhome" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert hub_cache_dir() == tmp_path / "hubcache"


@pytest.mark.parametrize("var, cache", [
    ("HF_HUB_CACHE", "custom"),
    ("HF_HOME", "custom/hub"),
    ("XDG_CACHE_HOME", "custom/huggingface/hub"),
    (None, "home/.cache/huggingface/hub"),
])
def test_resolve_from_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, var: str | None, cache: str) -> None:
    if var is not None:
        monkeypatch.setenv(var, str(tmp_path / "custom"))
    repo = make_entry(tmp_path / cache, "mtgv/MobileVLM_V2-1.7B")
    assert resolve_model("mtgv/MobileVLM_V2-1.7B") == repo / "snapshots" / COMMIT


def test_refs_main_picks_among_snapshots(tmp_path: Path) -> None:
    cache = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    old = "f" * 40
    repo = make_entry(cache, "mtgv/MobileVLM-1.7B", commits=(old, COMMIT), ref=COMMIT)
    assert resolve_model("mtgv/MobileVLM-1.7B") == repo / "snapshots" / COMMIT


def test_single_snapshot_without_refs(tmp_path: Path) -> None:
    cache = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    repo = make_entry(cache, "mtgv/MobileVLM-3B", ref=None)
    assert resolve_model("mtgv/MobileVLM-3B") == repo / "snapshots" / COMMIT

    make_entry(cache, "mtgv/MobileVLM_V2-3B", commits=(COMMIT, "e" * 40), ref=None)
    with pytest.raises(ModelNotFound, match="refs/main is missing and .*snapshots holds 2 snapshots"):
        resolve_model("mtgv/MobileVLM_V2-3B")


def test_not_found_message(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_model("mtgv/MobileVLM_V2-1.7B")
    message = str(info.value)
    entry = tmp_path / "home" / ".cache" / "huggingface" / "hub" / "models--mtgv--MobileVLM_V2-1.7B"
    assert "'mtgv/MobileVLM_V2-1.7B'" in message and str(entry) in message
    assert "huggingface-cli download mtgv/MobileVLM_V2-1.7B" in message and "local directory" in message


def test_broken_entries(tmp_path: Path) -> None:
    cache = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    make_entry(cache, "mtgv/MobileVLM_V2-7B", ref="a" * 40)  # refs/main names a snapshot that is not there
    with pytest.raises(ModelNotFound, match="names commit 'a{40}', but .* is missing"):
        resolve_model("mtgv/MobileVLM_V2-7B")

    with pytest.raises(ModelNotFound, match="no model directory"):
        resolve_model("./not/here/")
    with pytest.raises(ModelNotFound, match="no model directory"):
        resolve_model(Path("org/name"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match="not a GGUF file or a known weight format .first bytes: none: the file"):
        resolve_model("weights.bin")
    (tmp_path / "model.gguf").write_bytes(b"GGUX\x03\x00\x00\x00")  # a GGUF whose magic is corrupted
    with pytest.raises(WeightsError, match=r"model.gguf: not a GGUF file or a known weight format \(first bytes: "
                                           r"47 47 55 58 03 00 00 00 \(b'GGUX\\x03"):
        resolve_model("model.gguf")
    torch_bin = tmp_path / "pytorch_model.bin"
    torch_bin.write_bytes(b"PK\x03\x04" + bytes(30))
    with pytest.raises(ModelNotFound, match="is a PyTorch zip file; pass the model directory that holds it"):
        resolve_model(torch_bin)


def test_find_cached_models(tmp_path: Path) -> None:
    assert find_cached_models() == []  # no cache directory at all
    cache = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    ids = ("mtgv/MobileVLM_V2-3B", "mtgv/MobileVLM-1.7B", "openai/clip-vit-large-patch14-336", "someone/mobilevlm-gguf")
    for model_id in ids:
        make_entry(cache, model_id)
    (cache / "models--mtgv--MobileVLM_V2-7B" / "blobs").mkdir(parents=True)  # an interrupted download: no snapshot
    (cache / "datasets--mtgv--MobileVLM-data" / "snapshots" / COMMIT).mkdir(parents=True)
    assert find_cached_models() == ["mtgv/MobileVLM-1.7B", "mtgv/MobileVLM_V2-3B", "someone/mobilevlm-gguf"]
    assert find_cached_models("clip") == ["openai/clip-vit-large-patch14-336"]


def test_agrees_with_huggingface_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # huggingface_hub (installed with transformers) is the reference for the cache layout, offline
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hubcache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    make_entry(cache, "mtgv/MobileVLM_V2-1.7B", commits=("b" * 40, COMMIT), ref=COMMIT)
    want = snapshot_download("mtgv/MobileVLM_V2-1.7B", cache_dir=cache, local_files_only=True)
    assert resolve_model("mtgv/MobileVLM_V2-1.7B") == Path(want)


def test_complete_snapshots(tmp_path: Path) -> None:
    """What a download cut short can leave is never complete: weights missing, a shard missing, the index missing."""
    import json

    from tinyvlm.loading.hub import complete

    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "config.json").write_text("{}")
    assert not complete(snap)  # no tokenizer, no weights
    (snap / "tokenizer.model").write_bytes(b"x")
    assert not complete(snap)
    (snap / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert not complete(snap)  # one shard of two
    (snap / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert not complete(snap)  # both shards, but not the index they are read through
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00003-of-00002.safetensors"}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    assert not complete(snap)  # the index names a file that is not there
    index["weight_map"]["b"] = "model-00002-of-00002.safetensors"
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    assert complete(snap)
    (snap / "model-00002-of-00002.safetensors").unlink()
    (snap / "model-00002-of-00002.safetensors").symlink_to(tmp_path / "missing-blob")  # a dangling link
    assert not complete(snap)
    tower = tmp_path / "tower"
    tower.mkdir()
    (tower / "config.json").write_text("{}")
    (tower / "pytorch_model.bin").write_bytes(b"x")
    assert complete(tower, tower=True) and not complete(tower)  # a tower needs no tokenizer
