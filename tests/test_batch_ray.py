"""`batch --ray` (tinyvlm/batch_ray.py) on a local Ray cluster that the command starts and stops: the same answers
as the one-process batch for the same images, and the same resuming. Bounded in time by its subprocess timeout."""
from __future__ import annotations

import importlib.util
import os

import pytest

from tests.test_batch import PROMPT, batch, lines, photo

BACKEND_FREE = True
pytestmark = [pytest.mark.torch,  # the checkpoint is written through torch
              pytest.mark.skipif(importlib.util.find_spec("ray") is None and not os.environ.get("CI"),
                                 reason="ray is not installed (CI installs it)")]


def test_ray_gives_the_answers_of_one_process_and_resumes(checkpoints, tmp_path):
    model = checkpoints["v2"].path
    for i in range(4):
        photo(tmp_path / "imgs" / f"{i}.png", 30 + i)
    alone = batch(model, str(tmp_path / "imgs"), "--prompt", PROMPT, "--out", str(tmp_path / "alone.jsonl"))
    assert alone.returncode == 0, alone.stderr[-2000:]
    (tmp_path / "ray.jsonl").write_text(lines_text := (tmp_path / "alone.jsonl").read_text().splitlines()[0] + "\n")
    done = batch(model, str(tmp_path / "imgs"), "--prompt", PROMPT, "--out", str(tmp_path / "ray.jsonl"), "--ray",
                 "--ray-actors", "2", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 answered, 0 failed" in done.stderr and "(on Ray)" in done.stderr  # the first was already there
    on_ray = {(r["image"], r["prompt"]): r["answer"] for r in lines(tmp_path / "ray.jsonl")}
    assert on_ray == {(r["image"], r["prompt"]): r["answer"] for r in lines(tmp_path / "alone.jsonl")}
    assert (tmp_path / "ray.jsonl").read_text().startswith(lines_text)
