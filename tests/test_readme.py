"""The README's Python example runs exactly as written, and .ci/run runs the README's test command."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fake_hf_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face cache entry for repo_id whose snapshot holds model_dir's files."""
    org, name = repo_id.split("/")
    entry = root / f"models--{org}--{name}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    for f in model_dir.iterdir():
        (snap / f.name).symlink_to(f)
    return root


def test_readme_python_example_runs(checkpoints, shared_data, tmp_path):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    repo_id = re.search(r'tinyvlm\.load\("([^"]+)"\)', block).group(1)
    cache = fake_hf_cache(tmp_path / "hub", repo_id, checkpoints["v2"].path)
    shutil.copy(shared_data / "images" / "test-1.jpeg", tmp_path / "photo.jpg")
    env = {**os.environ, "HF_HUB_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 0


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Run the tests.*?```bash\n(.*?)\n```", README, re.S).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines()


def test_readme_starts_with_install_and_chat():
    first = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert first[0].startswith("pip install")
    assert first[1] == "python -m tinyvlm chat examples/newspaper.jpg"  # tests/test_download.py runs it
    assert (ROOT / "examples" / "newspaper.jpg").is_file()


def test_readme_json_example_runs(checkpoints, tmp_path):
    """The block of "JSON answers", run as written (in the repo root, for examples/newspaper.jpg) against the tiny
    checkpoint placed in a cache under the id it names: its answer parses."""
    section = README[README.index("## JSON answers"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    repo_id = re.search(r'tinyvlm\.load\("([^"]+)"\)', block).group(1)
    cache = fake_hf_cache(tmp_path / "hub", repo_id, checkpoints["v2"].path)
    env = {**os.environ, "HF_HUB_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", block], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("{'scene': ")
