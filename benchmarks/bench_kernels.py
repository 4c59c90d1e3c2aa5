"""Quantized-kernel benchmark: one JSON line per (kernel, shape, threads), never asserted.

Each line gives the median µs per call over repeats, the effective GB/s (weight bytes read per call / time)
and the memory-bandwidth ceiling measured in the same process (a float32 sum over 1 GiB, split over the
same number of threads). The weights cycle through a pool of copies larger than the last-level cache, so
decode numbers are memory-bound as in a real model, not served from cache. Shapes are MobileLLaMA-1.4B's.
Each thread count runs in its own subprocess so OpenBLAS gets the same count (OPENBLAS_NUM_THREADS).

    python benchmarks/bench_kernels.py                      # threads 1 and 2, all kernels
    python benchmarks/bench_kernels.py --threads 2 --only matvec
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048)]  # (out, in)
PREFILL_T = 192
TILE_ROWS = (64, 128, 256, 512)


def median_seconds(fn: Callable[[int], object], calls: int, repeats: int) -> float:
    """Median over repeats of the mean time of `calls` calls fn(0), fn(1), ... (one pool copy each)."""
    fn(0)  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        times.append((time.perf_counter() - t0) / calls)
    times.sort()
    return times[len(times) // 2]


def bandwidth_ceiling(np, threads: int, repeats: int) -> float:
    """GB/s of a float32 sum over 1 GiB split in `threads` parts (numpy releases the GIL in reductions)."""
    a = np.ones(1 << 28, dtype=np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        t = median_seconds(lambda _: list(pool.map(np.sum, parts)), 1, repeats)
    return a.nbytes / t / 1e9


def worker(args: argparse.Namespace) -> None:
    import numpy as np

    from tinyvlm.kernels import _numba, quant, quant_int8, quant_numba

    threads = args.worker
    _numba.set_threads(threads)
    ceiling = bandwidth_ceiling(np, threads, args.repeats)
    rng = np.random.default_rng(0)
    pool_bytes = args.pool_mb << 20
    raw = rng.integers(0, 256, size=pool_bytes, dtype=np.uint8)  # packed values of every copy
    scales = rng.uniform(-0.02, 0.02, size=pool_bytes // 8).astype(np.float32)  # d and m of every copy
    dense_pool = np.full(max(pool_bytes, 2 * 32000 * 2048 * 4) // 4, 0.01, dtype=np.float32)  # float32 copies
    machine = platform.processor() or platform.machine()
    common = {"threads": threads, "ceiling_gbs": round(ceiling, 2), "machine": machine}

    def copies(kind: str, out: int, n_in: int) -> list[quant.QuantizedMatrix]:
        """As many distinct matrices as fit in the pool (at least 2), as views into it."""
        n_q = out * n_in * {"q8_0": 4, "q6_k": 3}.get(kind, 2) // 4
        n_d = out * n_in // (16 if kind == "q6_k" else quant.GROUP)
        n = max(2, min(pool_bytes // n_q, scales.size // (2 * n_d)))
        mats = []
        for c in range(n):
            qs = raw[c * n_q:(c + 1) * n_q]
            qs = (qs.view(np.int8) if kind == "q8_0" else qs).reshape(out, -1)
            d = scales[2 * c * n_d:][:n_d].reshape(out, -1)
            m = scales[(2 * c + 1) * n_d:][:n_d].reshape(out, -1) if kind == "q4_1" else None
            mats.append(quant.QuantizedMatrix(kind, (out, n_in), qs, d, m))
        return mats

    def emit(**fields: object) -> None:
        print(json.dumps({**fields, **common}), flush=True)

    for out, n_in in SHAPES:
        x = rng.standard_normal(n_in).astype(np.float32)
        if args.only in (None, "matvec"):
            for kind in quant.KINDS + quant.FILE_KINDS:
                mats = copies(kind, out, n_in)
                for activations, matvec in (("float32", quant_numba.matvec), ("int8", quant_int8.matvec)):
                    t = median_seconds(lambda i: matvec(mats[i % len(mats)], x), len(mats), args.repeats)
                    emit(kernel="matvec", kind=kind, activations=activations, shape=[out, n_in],
                         us=round(t * 1e6, 1), gbs=round(quant.nbytes(mats[0]) / t / 1e9, 2))
            n = max(2, dense_pool.size // (out * n_in))  # fp32 reference point: numpy / BLAS sgemv
            dense = [dense_pool[c * out * n_in:(c + 1) * out * n_in].reshape(out, n_in) for c in range(n)]
            t = median_seconds(lambda i: dense[i % n] @ x, n, args.repeats)
            emit(kernel="matvec", kind="f32-numpy", shape=[out, n_in], us=round(t * 1e6, 1),
                 gbs=round(out * n_in * 4 / t / 1e9, 2))
        if args.only in (None, "matmul"):
            xs = rng.standard_normal((PREFILL_T, n_in)).astype(np.float32)
            flops = 2 * PREFILL_T * out * n_in
            mats = copies("q4_0", out, n_in)[:4]
            for tile in TILE_ROWS:
                t = median_seconds(lambda i: quant_numba.matmul(xs, mats[i % 4], tile), 4, args.repeats)
                emit(kernel="matmul", kind="q4_0", shape=[out, n_in], T=PREFILL_T, tile_rows=tile,
                     us=round(t * 1e6, 1), gflops=round(flops / t / 1e9, 1))
            dense = quant.dequantize(mats[0])
            t = median_seconds(lambda i: xs @ dense.T, 4, args.repeats)
            emit(kernel="matmul", kind="f32-numpy", shape=[out, n_in], T=PREFILL_T, us=round(t * 1e6, 1),
                 gflops=round(flops / t / 1e9, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--pool-mb", type=int, default=1024, help="weight pool cycled through per shape (MiB)")
    p.add_argument("--only", choices=("matvec", "matmul"), help="run one kernel family")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    for n in (int(t) for t in args.threads.split(",")):
        cmd = [sys.executable, __file__, "--worker", str(n), "--repeats", str(args.repeats),
               "--pool-mb", str(args.pool_mb)] + (["--only", args.only] if args.only else [])
        subprocess.run(cmd, check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": str(n)})


if __name__ == "__main__":
    main()
