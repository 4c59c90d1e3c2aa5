"""`python -m tinyvlm batch` (tinyvlm/batch.py) on the tiny V2 checkpoint: inputs of every kind, an unreadable
image, resuming, and a kill in the middle that leaves valid JSONL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tinyvlm

BACKEND_FREE = True  # the subprocesses use the default backend
pytestmark = pytest.mark.torch  # the checkpoint is written through torch
PROMPT = "What is in the image?"


def photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def batch(model: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    tokens = [] if "--max-tokens" in args else ["--max-tokens", "4"]
    return subprocess.run([sys.executable, "-m", "tinyvlm", "batch", *args, "--model", str(model), *tokens],
                          capture_output=True, text=True, env=env, timeout=timeout)


def lines(out: Path) -> list[dict]:
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_a_folder_with_an_unreadable_image_then_resume(checkpoints, tmp_path):
    model = checkpoints["v2"].path
    folder = tmp_path / "images"
    good = [photo(folder / "a.png", 1), photo(folder / "sub" / "b.jpg", 2)]
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image file by its name: skipped")
    out = tmp_path / "out.jsonl"
    done = batch(model, str(folder), "--prompt", PROMPT, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "images/s" in done.stderr and "2 answered, 1 failed" in done.stderr
    records = {Path(r["image"]).name: r for r in lines(out)}
    assert set(records) == {"a.png", "b.jpg", "broken.jpg"}
    assert records["broken.jpg"]["answer"] is None and "not a readable image" in records["broken.jpg"]["error"]
    vlm = tinyvlm.load(model)
    for path in good:  # the same answer as the API gives, greedy
        record = records[path.name]
        assert record["error"] is None and record["prompt"] == PROMPT and 0 < record["tokens"] <= 4
        assert record["answer"] == vlm.generate(PROMPT, image=path, max_new_tokens=4)
    again = batch(model, str(folder), "--prompt", PROMPT, "--out", str(out))
    assert again.returncode == 0 and "nothing to do" in again.stderr and len(lines(out)) == 3
    photo(folder / "c.png", 3)
    more = batch(model, str(folder), "--prompt", PROMPT, "--out", str(out))
    assert more.returncode == 0 and "1 answered, 0 failed" in more.stderr
    assert [Path(r["image"]).name for r in lines(out)][-1] == "c.png"


def test_list_and_jsonl_inputs(checkpoints, tmp_path):
    model = checkpoints["v2"].path
    photo(tmp_path / "x.png", 4)
    photo(tmp_path / "y.png", 5)
    (tmp_path / "list.txt").write_text("# two images\nx.png\n\ny.png\n")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"image": "x.png", "prompt": "Describe it."}) + "\n"
                                         + json.dumps({"image": "y.png"}) + "\n")
    done = batch(model, str(tmp_path / "list.txt"), "--prompt", PROMPT, "--out", str(tmp_path / "a.jsonl"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [(Path(r["image"]).name, r["prompt"]) for r in lines(tmp_path / "a.jsonl")] == [("x.png", PROMPT),
                                                                                          ("y.png", PROMPT)]
    done = batch(model, str(tmp_path / "jobs.jsonl"), "--prompt", PROMPT, "--out", str(tmp_path / "b.jsonl"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["prompt"] for r in lines(tmp_path / "b.jsonl")] == ["Describe it.", PROMPT]


@pytest.mark.parametrize("make, args, says", [
    (lambda d: None, ["nowhere"], "no such folder or file"),
    (lambda d: (d / "imgs").mkdir(), ["imgs"], "a folder of images needs --prompt"),
    (lambda d: (d / "bad.jsonl").write_text("{not json\n"), ["bad.jsonl", "--prompt", "q"], "bad.jsonl:1: not a JSON"),
    (lambda d: (d / "out.jsonl").write_text("hello\n"), ["imgs2", "--prompt", "q"], "not a line this command wrote"),
])
def test_bad_input_is_one_line(checkpoints, tmp_path, make, args, says):
    make(tmp_path)
    photo(tmp_path / "imgs2" / "a.png", 6)
    args = [str(tmp_path / args[0]), *args[1:], "--out", str(tmp_path / "out.jsonl")]
    done = batch(checkpoints["v2"].path, *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("tinyvlm: error: ") and says in done.stderr


def test_a_kill_leaves_valid_jsonl_and_a_rerun_finishes(checkpoints, tmp_path):
    model = checkpoints["v2"].path
    folder = tmp_path / "many"
    for i in range(12):
        photo(folder / f"{i:02d}.png", 10 + i)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinyvlm", "batch", str(folder), "--prompt", PROMPT, "--out",
                             str(out), "--model", str(model), "--max-tokens", "8"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while (not out.exists() or out.read_bytes().count(b"\n") < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    first = lines(out)  # every line whole, however the kill fell
    assert 2 <= len(first) <= 12
    with open(out, "ab") as f:
        f.write(b'{"image": "cut short by a kill')  # what a kill in the middle of a write would leave
    done = batch(model, str(folder), "--prompt", PROMPT, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    final = lines(out)
    assert sorted(Path(r["image"]).name for r in final) == [f"{i:02d}.png" for i in range(12)]  # each exactly once
    assert final[:len(first)] == first


def test_json_schema_answers(checkpoints, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"kind": {"enum": ["photo", "drawing"]}, "objects": {
        "type": "array", "items": {"type": "string"}}}, "required": ["kind", "objects"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    for seed in range(3):
        photo(tmp_path / "imgs" / f"{seed}.png", 20 + seed)
    done = batch(checkpoints["v2"].path, str(tmp_path / "imgs"), "--prompt", PROMPT, "--out", str(tmp_path / "o.jsonl"),
                 "--json-schema", str(tmp_path / "schema.json"), "--max-tokens", "40")
    assert done.returncode == 0, done.stderr[-2000:]
    for record in lines(tmp_path / "o.jsonl"):
        jsonschema.validate(json.loads(record["answer"]), schema)
    (tmp_path / "bad.json").write_text(json.dumps({"type": "object", "properties": {"a": {"format": "date"}}}))
    bad = batch(checkpoints["v2"].path, str(tmp_path / "imgs"), "--prompt", PROMPT, "--out", str(tmp_path / "p.jsonl"),
                "--json-schema", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "'format' is not supported" in bad.stderr
