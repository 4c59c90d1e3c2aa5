"""`python -m tinyvlm batch INPUT --prompt "..." --out results.jsonl`: one question about each of many images.

INPUT is a folder (searched recursively for image files by extension), a text file of image paths (one a line;
blank lines and lines starting with # are skipped; relative paths are relative to the file), or a JSONL file
whose lines are objects with `image` and an optional `prompt` (relative to the file too).

The output gets one JSON line per image: {"image", "prompt", "answer", "tokens", "seconds", "error"}. An image
that cannot be read gets its line with the error and no answer, and the batch goes on. A rerun skips every
(image, prompt) pair already in the output, so an interrupted batch resumes where it stopped. Each line is
written whole with one write() on a file opened for appending, then flushed to the disk; a line that a kill cut
short (no newline at the end of the file) is dropped when the next run opens the output.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyvlm.errors import TinyVLMError
from tinyvlm.limits import shown

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_LIST_BYTES = 1 << 30  # the largest text or JSONL input read
FIELDS = ("image", "prompt", "answer", "tokens", "seconds", "error")  # of an output line


@dataclass(frozen=True)
class Item:
    image: str  # as written into the output (the path as found)
    prompt: str


def items(source: str | Path, prompt: str | None) -> list[Item]:
    """The (image, prompt) pairs of INPUT, in a stable order; `prompt` is the default where a line has none."""
    src = Path(source)
    if src.is_dir():
        if prompt is None:
            raise TinyVLMError("a folder of images needs --prompt")
        found = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        return [Item(str(p), prompt) for p in found]
    if not src.is_file():
        raise TinyVLMError(f"{shown(str(src))}: no such folder or file; expected a folder of images, a text file of "
                           "paths or a JSONL file")
    if src.stat().st_size > MAX_LIST_BYTES:
        raise TinyVLMError(f"{src}: larger than {MAX_LIST_BYTES >> 30} GiB; split it")
    text = src.read_text(encoding="utf-8", errors="replace")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if src.suffix.lower() == ".jsonl":
            out.append(_json_item(line, f"{src}:{n}", src.parent, prompt))
        elif prompt is None:
            raise TinyVLMError(f"{src}: a list of paths needs --prompt")
        else:
            out.append(Item(_relative(line, src.parent), prompt))
    return out


def _relative(path: str, base: Path) -> str:
    return path if Path(path).is_absolute() else str(base / path)


def _json_item(line: str, where: str, base: Path, default: str | None) -> Item:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise TinyVLMError(f"{where}: not a JSON object ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise TinyVLMError(f'{where}: expected an object with "image" (a path) and an optional "prompt"')
    prompt = obj.get("prompt", default)
    if not isinstance(prompt, str):
        raise TinyVLMError(f"{where}: no prompt on this line and no --prompt")
    return Item(_relative(obj["image"], base), prompt)


def response_format(json_object: bool, schema_file: str | None) -> dict[str, Any] | None:
    """--json / --json-schema FILE as a response_format (checked here, before any model loads)."""
    from tinyvlm.json_grammar import response_schema
    from tinyvlm.limits import read_json_file

    if schema_file is not None:
        schema = read_json_file(Path(schema_file), TinyVLMError)
        fmt: dict[str, Any] | None = {"type": "json_schema", "json_schema": {"schema": schema}}
    else:
        fmt = {"type": "json_object"} if json_object else None
    if fmt is not None:
        response_schema(fmt)
    return fmt


def done_items(out: Path) -> set[tuple[str, str]]:
    """The (image, prompt) pairs already answered in `out`; a last line without its newline is cut off first."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(out, "r+b") as f:  # a kill mid-line: drop the partial line so the file stays valid JSONL
            f.truncate(len(whole))
    done = set()
    for n, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            obj = json.loads(line)
            done.add((obj["image"], obj["prompt"]))
        except (ValueError, KeyError, TypeError):
            raise TinyVLMError(f"{out}:{n}: not a line this command wrote; pass a new --out") from None
    return done


class Writer:
    """Appends whole lines: one write() each, on a file opened with O_APPEND, then fsync."""

    def __init__(self, out: Path) -> None:
        self.fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        written = 0
        while written < len(data):
            written += os.write(self.fd, data[written:])
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def answerer(vlm: Any, generation: dict[str, Any]) -> Callable[[Item], tuple[str, int]]:
    """An item -> (answer, tokens) function of a loaded model; `generation`: VLM.generate's keyword arguments."""
    def answer(item: Item) -> tuple[str, int]:
        return vlm.generate(item.prompt, image=item.image, **generation), vlm.stats.answer_tokens
    return answer


def record(answer: Callable[[Item], tuple[str, int]], item: Item) -> dict[str, Any]:
    """The output line of one item: its answer, or the error that an unreadable image or a prompt too long gave."""
    t0 = time.perf_counter()
    line: dict[str, Any] = {"image": item.image, "prompt": item.prompt, "answer": None, "tokens": 0,
                            "seconds": 0.0, "error": None}
    try:
        line["answer"], line["tokens"] = answer(item)
    except TinyVLMError as e:  # its line says so, and the batch goes on
        line["error"] = str(e)
    line["seconds"] = round(time.perf_counter() - t0, 3)
    return line


def run(answer: Callable[[Item], tuple[str, int]], todo: list[Item], writer: Writer,
        progress: Callable[[int, int, float], None] | None = None) -> dict[str, int]:
    """Answer each item, writing its line as soon as it is done; counts of answered and failed."""
    counts = {"answered": 0, "failed": 0}
    start = time.perf_counter()
    for i, item in enumerate(todo):
        line = record(answer, item)
        counts["failed" if line["error"] else "answered"] += 1
        writer.write(line)
        if progress is not None:
            progress(i + 1, len(todo), time.perf_counter() - start)
    return counts


def console_progress(done: int, total: int, elapsed: float) -> None:
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    width = 30
    bar = "#" * (width * done // max(total, 1))
    print(f"\r[{bar:<{width}}] {done}/{total} {rate:.2f} images/s ETA {eta:.0f} s", end="" if done < total else "\n",
          file=sys.stderr, flush=True)


def pending(all_items: list[Item], out: Path) -> Iterator[Item]:
    done = done_items(out)
    return (item for item in all_items if (item.image, item.prompt) not in done)
