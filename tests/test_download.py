"""Download on first use, for real over HTTP: a fake Hub on 127.0.0.1 (tests/fake_hub.py) serves the tiny
checkpoints, huggingface_hub fetches them into an empty cache, and `python -m tinyvlm chat` answers. HF_ENDPOINT is
read when huggingface_hub is imported, so each run is a subprocess with it in its environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub, Repo

BACKEND_FREE = True  # the subprocesses use the default backend
pytestmark = pytest.mark.torch  # the checkpoints are written through torch
DECOYS = {"flax_model.msgpack": b"not read", "tf_model.h5": b"not read", "README.md": b"# a model card",
          "training_args.bin": b"not read"}
V2_FILES = {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "pytorch_model.bin"}


@pytest.fixture(scope="module")
def repos(checkpoints) -> dict[str, Repo]:
    """The tiny V2 under two ids (one is the CLI's default model), the tiny V1 naming a CLIP repo on the same hub."""
    v2 = Repo.from_dir(checkpoints["v2"].path, **DECOYS)
    v1 = Repo.from_dir(checkpoints["v1"].path, **DECOYS)
    config = json.loads(v1.files["config.json"])
    clip_dir = Path(config["mm_vision_tower"])
    v1 = Repo({**v1.files, "config.json": json.dumps({**config, "mm_vision_tower": "org/clip-tiny"}).encode()})
    clip = Repo.from_dir(clip_dir, **{"pytorch_model.bin": b"a second copy, not read", **DECOYS})
    return {"org/MobileVLM_V2-tiny": v2, "mtgv/MobileVLM_V2-1.7B": v2, "org/MobileVLM-tiny": v1,
            "org/clip-tiny": clip, "org/gated-tiny": Repo(v2.files, gated=True)}


def chat(hub_url: str, cache: Path, photo: Path, *args: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TINYVLM_MODEL")}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN="",
               **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    return subprocess.run([sys.executable, "-m", "tinyvlm", "chat", str(photo), "-p", "What is in the image?",
                           "--max-tokens", "4", *args], capture_output=True, text=True, env=env, timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("tinyvlm: error: ")]
    assert len(errors) == 1, done.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def photo(shared_data) -> Path:
    return shared_data / "images" / "test-1.jpeg"


def test_first_run_downloads_what_is_read_then_runs_offline(repos, tmp_path, photo):
    with FakeHub(repos) as hub:
        done = chat(hub.url, tmp_path, photo, "--model", "org/MobileVLM_V2-tiny")
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip()
        assert hub.fetched() == V2_FILES  # no decoy, no CLIP repo (a V2 checkpoint carries its tower)
        asked = len(hub.requests)
        again = chat(hub.url, tmp_path, photo, "--model", "org/MobileVLM_V2-tiny", offline=True)
        assert again.returncode == 0 and again.stdout == done.stdout
        cached = chat(hub.url, tmp_path, photo, "--model", "org/MobileVLM_V2-tiny")
        assert cached.returncode == 0 and cached.stdout == done.stdout
        assert len(hub.requests) == asked  # a complete snapshot in the cache: no network either way


def test_without_a_model_the_default_is_downloaded(repos, tmp_path, photo):
    with FakeHub(repos) as hub:
        done = chat(hub.url, tmp_path, photo)
        assert done.returncode == 0, done.stderr[-2000:]
        assert hub.fetched() == V2_FILES
        assert all("mtgv/MobileVLM_V2-1.7B" in r for r in hub.requests)


def test_v1_fetches_the_clip_tower_it_names(repos, tmp_path, photo):
    with FakeHub(repos) as hub:
        done = chat(hub.url, tmp_path, photo, "--model", "org/MobileVLM-tiny")
        assert done.returncode == 0, done.stderr[-2000:]
        assert "not found" not in done.stderr  # the named tower was there: no fallback to the stored copy
        tower = {r.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests
                 if r.startswith("GET /org/clip-tiny/resolve/")}
        assert tower == {"config.json", "model.safetensors"}  # one weight file, safetensors first


@pytest.mark.parametrize("model, says", [
    ("org/no-such-model", "model 'org/no-such-model' is not on the Hugging Face Hub, or is private"),
    ("org/gated-tiny", "model 'org/gated-tiny' is gated on the Hugging Face Hub: accept its terms"),
])
def test_missing_and_gated_repos(repos, tmp_path, photo, model, says):
    with FakeHub(repos) as hub:
        assert says in one_error_line(chat(hub.url, tmp_path, photo, "--model", model))
    assert not list(tmp_path.rglob("snapshots/*/*"))  # nothing a later run could load


def test_no_network(tmp_path, photo):
    line = one_error_line(chat("http://127.0.0.1:9", tmp_path, photo, "--model", "org/MobileVLM_V2-tiny"))
    assert "could not download model 'org/MobileVLM_V2-tiny'" in line and "ConnectError" in line


def test_a_download_cut_mid_file_is_never_loaded_and_resumes(repos, tmp_path, photo):
    with FakeHub(repos) as hub:
        hub.cut.add("pytorch_model.bin")
        line = one_error_line(chat(hub.url, tmp_path, photo, "--model", "org/MobileVLM_V2-tiny"))
        assert "could not download model 'org/MobileVLM_V2-tiny'" in line
        offline = one_error_line(chat(hub.url, tmp_path, photo, "--model", "org/MobileVLM_V2-tiny", offline=True))
        assert "model 'org/MobileVLM_V2-tiny': the cached snapshot" in offline and "is incomplete" in offline
        hub.cut.clear()
        done = chat(hub.url, tmp_path, photo, "--model", "org/MobileVLM_V2-tiny")
        assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_offline_never_touches_the_network(repos, tmp_path, photo, how):
    with FakeHub(repos) as hub:
        args = ("--model", "org/MobileVLM_V2-tiny", *(("--offline",) if how == "flag" else ()))
        line = one_error_line(chat(hub.url, tmp_path, photo, *args, offline=how == "environment"))
        assert "model 'org/MobileVLM_V2-tiny' not found" in line
        default = one_error_line(chat(hub.url, tmp_path, photo, offline=True))
        assert "no model given and none found (offline)" in default
        assert hub.requests == []


def test_the_readme_chat_command_runs_on_an_empty_cache(repos, tmp_path):
    """The README's second command, as written, in the repo root: it downloads the default model (served here under
    its real id), then answers the question typed into the interactive chat."""
    import re
    import shlex

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    command = shlex.split(re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()[1])
    assert command[:4] == ["python", "-m", "tinyvlm", "chat"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TINYVLM_MODEL")}
    with FakeHub(repos) as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path), HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN="")
        done = subprocess.run([sys.executable, *command[1:], "--max-tokens", "4"], capture_output=True, text=True,
                              input="What is in the image?\n/exit\n", env=env, cwd=root, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert hub.fetched() == V2_FILES and all("mtgv/MobileVLM_V2-1.7B" in r for r in hub.requests)
    assert done.stdout.count(">>> ") == 2 and done.stdout.split(">>> ")[1].strip()  # an answer, then the exit
