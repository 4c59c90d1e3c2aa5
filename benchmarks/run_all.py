"""Run every engine of the side-by-side benchmark, each in its own process, and print one JSON line per result.

First a line describing the machine, then for each thread count: the memory read ceiling, the LLM engines
(tinyvlm fp32/int8/int4, llama.cpp Q4_0, PyTorch fp32), the vision/time-to-first-token engines (tinyvlm,
PyTorch) and the read ceiling again; each thread count's lines are printed when its group is done. One process per engine keeps their memory apart, so each peak_rss_mib is that engine's alone, and lets
each set its thread pools before they start. Engines run one after another, never two at once.
Run: `python benchmarks/run_all.py --threads 1,2 --repeat 3` (see benchmarks/README.md for the fields);
`--backend cuda` runs the GPU engines instead (bench_cuda.py: tinyvlm int4 and fp16, PyTorch fp16).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from _common import DEFAULT_CACHE, THREAD_VARS, emit, machine_info

HERE = Path(__file__).resolve().parent
# name -> (script, extra arguments)
ENGINES: dict[str, tuple[str, list[str]]] = {
    "bandwidth": ("bench_llm.py", ["--engine", "bandwidth"]),
    "tinyvlm-fp32": ("bench_llm.py", ["--engine", "tinyvlm", "--quant", "fp32"]),
    "tinyvlm-int8": ("bench_llm.py", ["--engine", "tinyvlm", "--quant", "int8"]),
    "tinyvlm-int4": ("bench_llm.py", ["--engine", "tinyvlm", "--quant", "int4"]),
    "tinyvlm-int4-f32act": ("bench_llm.py", ["--engine", "tinyvlm", "--quant", "int4", "--decode-activations",
                                             "float32"]),
    "llama.cpp": ("bench_llm.py", ["--engine", "llama.cpp"]),
    "llama.cpp-no-repack": ("bench_llm.py", ["--engine", "llama.cpp", "--llamacpp-no-extra-buffers"]),
    "tinyvlm-gguf-q4_0": ("bench_llm.py", ["--engine", "tinyvlm-gguf", "--gguf", "q4_0"]),
    "tinyvlm-gguf-q4_0-f32act": ("bench_llm.py", ["--engine", "tinyvlm-gguf", "--gguf", "q4_0", "--decode-activations",
                                                  "float32"]),
    "tinyvlm-gguf-q4_k_m": ("bench_llm.py", ["--engine", "tinyvlm-gguf", "--gguf", "q4_k_m"]),
    "llama.cpp-q4_k_m": ("bench_llm.py", ["--engine", "llama.cpp", "--gguf", "q4_k_m"]),
    "torch": ("bench_llm.py", ["--engine", "torch"]),
    "vision-tinyvlm-fp32": ("bench_vision.py", ["--engine", "tinyvlm", "--quant", "fp32"]),
    "vision-tinyvlm-int8": ("bench_vision.py", ["--engine", "tinyvlm", "--quant", "int8"]),
    "vision-tinyvlm-int4": ("bench_vision.py", ["--engine", "tinyvlm", "--quant", "int4"]),
    "vision-tinyvlm-int4-int8vision": ("bench_vision.py", ["--engine", "tinyvlm", "--quant", "int4",
                                                           "--vision-weights", "int8"]),
    "vision-torch": ("bench_vision.py", ["--engine", "torch"]),
    "smollm2-tinyvlm": ("bench_smollm2.py", ["--engine", "tinyvlm"]),
    "smollm2-tinyvlm-generate": ("bench_smollm2.py", ["--engine", "tinyvlm-generate"]),
    "smollm2-tinyvlm-f32act": ("bench_smollm2.py", ["--engine", "tinyvlm", "--decode-activations", "float32"]),
    "smollm2-llama.cpp": ("bench_smollm2.py", ["--engine", "llama.cpp"]),
    "smollm2-transformers": ("bench_smollm2.py", ["--engine", "transformers"]),
    # --backend cuda: MobileVLM_V2-1.7B on the GPU (bench_cuda.py)
    "cuda-tinyvlm-int4": ("bench_cuda.py", ["--engine", "tinyvlm", "--llm", "int4"]),
    "cuda-tinyvlm-fp16": ("bench_cuda.py", ["--engine", "tinyvlm", "--llm", "fp16"]),
    "cuda-torch-fp16": ("bench_cuda.py", ["--engine", "torch"]),
}
CUDA_ENGINES = [name for name in ENGINES if name.startswith("cuda-")]


def run_engine(name: str, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """One engine in a fresh Python process with every thread pool pinned; its JSON line, or an error line."""
    script, extra = ENGINES[name]
    cmd = [sys.executable, str(HERE / script), *extra, "--threads", str(threads), "--repeat", str(args.repeat)]
    if script == "bench_llm.py":
        cmd += ["--prefill-tokens", str(args.prefill_tokens), "--decode-tokens", str(args.decode_tokens),
                "--cache-dir", str(args.cache_dir), "--bandwidth-gib", str(args.bandwidth_gib)]
    env = dict(os.environ, **{v: str(threads) for v in THREAD_VARS})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"bench": name, "engine": name, "threads": threads, "error": f"exit {proc.returncode}: {tail}"}


def run_group(names: list[str], threads: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every chosen engine at one thread count, and fraction_of_ceiling filled in from the read ceiling.

    The ceiling is measured before and after the engines and the higher one is used: other work on the machine
    can only lower a bandwidth measurement.
    """
    results = [run_engine(name, threads, args) for name in names]
    if "bandwidth" in names:
        results.append(run_engine("bandwidth", threads, args))
    ceilings = [r["read_GB_s"] for r in results if r.get("bench") == "bandwidth" and "read_GB_s" in r]
    for r in results:
        if ceilings and "effective_GB_s" in r:
            r["fraction_of_ceiling"] = round(r["effective_GB_s"] / max(ceilings), 3)
    return results


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("numpy", "numba", "torch", "transformers", "llama_cpp_python", "gguf", "cupy-cuda12x", "numba-cuda"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip() or "?"
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2", help="comma-separated thread counts, e.g. 1,2")
    ap.add_argument("--prefill-tokens", type=int, default=192)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per engine; medians are reported")
    ap.add_argument("--only", help=f"comma-separated engines out of: {', '.join(ENGINES)}")
    ap.add_argument("--backend", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: every engine but the GPU ones (default); cuda: the GPU engines (bench_cuda.py)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where llama.cpp's GGUF is written once")
    ap.add_argument("--bandwidth-gib", type=float, default=2.0, help="array size of the read-ceiling measurement")
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = ap.parse_args()
    default = CUDA_ENGINES if args.backend == "cuda" else [n for n in ENGINES if n not in CUDA_ENGINES]
    chosen = default if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in chosen if n not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    names = [n for n in ENGINES if n in chosen]  # bandwidth first: the others' fraction_of_ceiling needs it
    thread_counts = [int(t) for t in args.threads.split(",")]

    lines = [emit({
        "bench": "machine", **machine_info(), **versions(), "commit": commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run_all.py", *sys.argv[1:]]),
    })]
    for threads in thread_counts:
        lines += [emit(result) for result in run_group(names, threads, args)]
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()
