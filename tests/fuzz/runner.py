"""Run fuzz cases in a child process with caps, and classify what happened.

A long-lived worker (`python -m tests.fuzz.runner worker`) caps its address space (RLIMIT_AS, 4 GiB unless
$TINYVLM_FUZZ_AS says otherwise), imports tinyvlm once, then loops: one JSON job per stdin line ({path, mmproj?}),
`tinyvlm.load(..., backend="numpy")`, two greedy tokens (and two more with an image for a multimodal model), one
JSON outcome per line on the protocol pipe (the worker's stdout; its fd 1 is pointed at stderr before anything
runs, so nothing a case prints can be mistaken for an outcome). Outcomes:

    "ok" | "TinyVLMError:<class>: <message>" | "other:<type>: <message> at <file:line>" | "oom: ..." |
    "hang: ..." (the parent's wall clock ran out; the worker is killed and replaced) | "crash:<signal or exit code>" |
    "ran-code: ..." (the case's marker file appeared: a weight file ran code)

`python -m tests.fuzz.runner table LOG` prints a format x outcome-class table of a $TINYVLM_FUZZ_LOG file.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("ok", "TinyVLMError", "other", "hang", "oom", "crash", "ran-code")
TIMEOUT_S = float(os.environ.get("TINYVLM_FUZZ_TIMEOUT", "20"))
AS_LIMIT = int(os.environ.get("TINYVLM_FUZZ_AS", str(4 << 30)))
RSS_LIMIT_MIB = 1024  # a tiny seed never needs this much: a case that peaks above it is a memory blow-up
MARKER = "PWNED"  # the file the malicious pickles of mutate.py try to create in their case directory


def outcome_class(outcome: str) -> str:
    return next(c for c in CLASSES if outcome.startswith(c))


# ---------------------------------------------------------------- parent side

class Runner:
    """Sends jobs to one worker at a time, replacing it after a hang, a crash or an out-of-memory case."""

    def __init__(self, timeout_s: float = TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.log = os.environ.get("TINYVLM_FUZZ_LOG")

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, TINYVLM_BACKEND="numpy", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MALLOC_ARENA_MAX="2",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.runner", "worker"], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        line = self._readline(proc, 120.0)
        if line != "ready":
            self._kill(proc)
            raise RuntimeError(f"the fuzz worker did not start: {line!r}")
        return proc

    @staticmethod
    def _readline(proc: subprocess.Popen, timeout_s: float) -> str | None:
        """One line of the worker's output, None on timeout, "" when the worker is gone."""
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        return proc.stdout.readline().decode("utf-8", "replace").rstrip("\n")

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and anything a case started
        except ProcessLookupError:
            pass
        proc.wait()
        Runner._close_pipes(proc)

    @staticmethod
    def _close_pipes(proc: subprocess.Popen) -> None:
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()  # type: ignore[union-attr]
            except OSError:
                pass

    def run(self, path: Path | str, mmproj: Path | str | None = None, marker: Path | None = None,
            family: str = "", mutation: str = "", detail: str = "", probe: str | None = None) -> str:
        """The outcome of loading `path` (+ `mmproj`) and generating; see the module docstring. `probe` (hang, crash,
        oom, code, error) makes the worker misbehave on purpose instead, to test this classification."""
        marker = Path(marker) if marker is not None else None
        if marker is not None and marker.exists():
            marker.unlink()
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        job = {"path": str(path), "mmproj": None if mmproj is None else str(mmproj), "probe": probe,
               "marker": str(marker)}
        assert proc.stdin is not None
        try:
            proc.stdin.write((json.dumps(job) + "\n").encode())
            proc.stdin.flush()
            line = self._readline(proc, self.timeout_s)
        except BrokenPipeError:
            line = ""
        if line is None:
            self._kill(proc)
            self.proc = None
            outcome = f"hang: no outcome within {self.timeout_s:g} s"
        elif line == "":
            code = proc.wait()
            self._close_pipes(proc)
            self.proc = None
            outcome = f"crash:{_signal_name(-code)}" if code < 0 else f"crash:exit {code}"
        else:
            outcome = json.loads(line)
            if outcome.startswith("oom"):
                self.close()  # a fresh worker after a MemoryError
        if marker is not None and marker.exists():
            outcome = f"ran-code: {marker} was created ({outcome})"
        if self.log and probe is None:
            with open(self.log, "a") as f:
                f.write(json.dumps({"format": family, "mutation": mutation, "class": outcome_class(outcome),
                                    "outcome": outcome[:300], "detail": detail[:200]}) + "\n")
        return outcome

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]  # the worker's loop ends
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            if self.proc.poll() is None:  # still running: kill it (never a group whose leader was reaped)
                self._kill(self.proc)
            self._close_pipes(self.proc)
            self.proc = None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---------------------------------------------------------------- worker side

def _text(e: BaseException, limit: int) -> str:
    try:
        return str(e)[:limit]
    except BaseException:  # noqa: BLE001 - str() of a hostile value can fail too
        return f"<str() failed on a {type(e).__name__}>"


def _where(e: BaseException) -> str:
    import traceback

    import tinyvlm

    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    package = str(Path(tinyvlm.__file__).parent)
    ours = [f for f in frames if f.filename.startswith(package)]
    where = f"{Path(last.filename).name}:{last.lineno} in {last.name}"
    if ours and ours[-1] is not last:
        where += f" (from {Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name})"
    return where


def run_case(job: dict) -> str:
    """Load and generate; the outcome as a string (never raises, except KeyboardInterrupt)."""
    import gc
    import warnings

    import numpy as np

    import tinyvlm
    from tinyvlm.errors import TinyVLMError

    vlm = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if job.get("probe"):
                _probe(job["probe"], Path(job["marker"]))
            vlm = tinyvlm.load(job["path"], backend="numpy", mmproj=job.get("mmproj"))
            vlm.generate("Hi", max_new_tokens=2)
            if getattr(vlm, "vision", None) is not None:
                image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
                vlm.generate("What is it?", image=image, max_new_tokens=2)
        return "ok"
    except KeyboardInterrupt:
        raise
    except MemoryError as e:
        return f"oom: MemoryError: {_text(e, 200)} at {_where(e)}"
    except TinyVLMError as e:
        return f"TinyVLMError:{type(e).__name__}: {_text(e, 200)}"
    except BaseException as e:  # noqa: BLE001 - pyo3's PanicException, SystemExit from a payload, ...
        return f"other:{type(e).__name__}: {_text(e, 300)} at {_where(e)}"
    finally:
        del vlm
        gc.collect()


def _probe(kind: str, marker: Path) -> None:
    if kind == "hang":
        time.sleep(3600)
    elif kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "oom":
        bytearray(AS_LIMIT)
    elif kind == "code":
        marker.touch()
    raise ValueError(f"probe {kind}")


def worker() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever a case prints goes to stderr, never into the protocol
    __import__("tinyvlm.loading")  # imported once, before the first case
    from benchmarks._common import peak_rss_mib, reset_peak_rss  # VmHWM, reset per case

    proto.write("ready\n")
    proto.flush()
    for line in sys.stdin:
        job = json.loads(line)
        reset_peak_rss()
        outcome = run_case(job)
        peak = peak_rss_mib()
        if peak > RSS_LIMIT_MIB and not outcome.startswith("oom"):
            outcome = f"oom: peak RSS {peak:.0f} MiB > {RSS_LIMIT_MIB} MiB ({outcome[:200]})"
        proto.write(json.dumps(outcome) + "\n")
        proto.flush()
        if outcome.startswith("oom"):
            return


# ---------------------------------------------------------------- the long-run table

def table(log: Path) -> str:
    """format x outcome class, then every distinct outcome that is neither ok nor a TinyVLMError, with its count."""
    counts: Counter = Counter()
    bad: Counter = Counter()
    formats: list[str] = []
    for line in Path(log).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            counts[row["format"], row["class"]] += 1
            if row["format"] not in formats:
                formats.append(row["format"])
            if row["class"] not in ("ok", "TinyVLMError"):
                bad[row["format"], row["mutation"], re.sub(r"/case\d+/", "/case*/", row["outcome"])] += 1
    width = max([len("format"), *map(len, formats)])
    lines = [f"{'format':<{width}} " + " ".join(f"{c:>12}" for c in CLASSES) + f" {'total':>8}"]
    for fmt in formats:
        cells = [counts[fmt, c] for c in CLASSES]
        lines.append(f"{fmt:<{width}} " + " ".join(f"{n:>12}" for n in cells) + f" {sum(cells):>8}")
    totals = [sum(counts[f, c] for f in formats) for c in CLASSES]
    lines.append(f"{'all':<{width}} " + " ".join(f"{n:>12}" for n in totals) + f" {sum(totals):>8}")
    lines += [f"{n:>6} x {fmt} {mutation}: {outcome}" for (fmt, mutation, outcome), n in bad.most_common()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        worker()
        return 0
    if len(argv) == 2 and argv[0] == "table":
        print(table(Path(argv[1])))
        return 0
    print("usage: python -m tests.fuzz.runner worker | table LOG", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
