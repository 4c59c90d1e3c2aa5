"""What bounds the CPU targets of issue 11 on this machine: the float32 floor of the image encode, the int16 GEMM's
rate, whether the cores are separate, and which instructions LLVM makes of byte dot-product IR.

Prints one JSON line per finding:
- `sgemm`: OpenBLAS (numpy) float32 GEMM at the ViT's four linear shapes (577 tokens), and the seconds that the 23
  ViT layers' linears alone need at that rate: the floor of a float32 image encode.
- `gemm_int16`: tinyvlm's prefill GEMM (quant_gemm.py) at the same ViT shapes (q8_0) and at a MobileLLaMA q4_0
  shape (192 tokens), on 1 and 2 threads, in G multiply-adds x 2 per second (GOPS).
- `cores`: one-thread sgemm alone, then in two processes at once. Two hyperthreads of one core would halve it.
- `ir_forms`: three lane-exact IR forms of a 16-lane int32 sum of u8 x s8 products in groups of four (what
  `vpdpbusd` computes), and the partial reduction, compiled by llvmlite for the host CPU: the vector instructions
  each becomes. The issue forbids target-specific intrinsics, so only generic IR counts.
    python benchmarks/bench_ceilings.py
"""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from _common import VISION, emit, machine_info, median, pin_threads

TOKENS = VISION.num_patches + 1  # 577
C, F = VISION.hidden_size, VISION.intermediate_size
VIT_LINEARS = ((3 * C, C), (C, C), (F, C), (C, F))  # (out, in): q k v stacked, out_proj, fc1, fc2
VIT_LAYERS = 23  # MobileVLM selects hidden_states[-2]


def _rate(call, ops: float, rounds: int = 15) -> float:
    """Median G operations per second of call()."""
    call()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return ops / median(times) / 1e9


def sgemm() -> dict:
    rng = np.random.default_rng(0)
    rates, seconds = {}, 0.0
    for out, n_in in VIT_LINEARS:
        x = rng.standard_normal((TOKENS, n_in), dtype=np.float32)
        w = rng.standard_normal((out, n_in), dtype=np.float32)
        y = np.empty((TOKENS, out), dtype=np.float32)
        flops = 2.0 * TOKENS * out * n_in
        rate = _rate(lambda: np.matmul(x, w.T, out=y), flops)
        rates[f"{out}x{n_in}"] = round(rate, 1)
        seconds += VIT_LAYERS * flops / rate / 1e9
    vit_gflop = VIT_LAYERS * sum(2.0 * TOKENS * o * i for o, i in VIT_LINEARS) / 1e9
    return {"bench": "ceiling", "what": "sgemm", "engine": "numpy OpenBLAS float32", "gflop_s": rates,
            "vit_linear_gflop": round(vit_gflop, 1), "vit_linear_floor_s": round(seconds, 3)}


def gemm_int16() -> dict:
    import numba

    from tinyvlm.kernels import quant, quant_gemm

    rng = np.random.default_rng(0)
    cases = [("q8_0", TOKENS, out, n_in) for out, n_in in VIT_LINEARS] + [("q4_0", 192, 5632, 2048)]
    rows = {}
    for kind, tokens, out, n_in in cases:
        qm = quant.quantize(rng.standard_normal((out, n_in), dtype=np.float32), kind)
        x = rng.standard_normal((tokens, n_in), dtype=np.float32)
        y = np.empty((tokens, out), dtype=np.float32)
        row = {}
        for threads in (1, 2):
            numba.set_num_threads(threads)
            row[f"{threads}t_gops"] = round(_rate(lambda: quant_gemm.matmul(x, qm, y), 2.0 * tokens * out * n_in), 1)
        rows[f"{kind} {tokens}x{n_in}->{out}"] = row
    return {"bench": "ceiling", "what": "gemm_int16", "engine": "tinyvlm quant_gemm (vpdpwssd)", "cases": rows}


ONE_CORE = """
import os, time, numpy as np
a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
a @ a
t, n = time.perf_counter(), 0
while time.perf_counter() - t < 3:
    a @ a
    n += 1
print(n * 2 * 1024 ** 3 / (time.perf_counter() - t) / 1e9)
"""


def cores() -> dict:
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}

    def start():
        return subprocess.Popen([sys.executable, "-c", ONE_CORE], env=env, stdout=subprocess.PIPE, text=True)

    alone = float(start().communicate()[0])
    pair = [start(), start()]
    together = [float(p.communicate()[0]) for p in pair]
    return {"bench": "ceiling", "what": "cores", "sgemm_1thread_alone_gflop_s": round(alone, 1),
            "sgemm_1thread_two_at_once_gflop_s": [round(v, 1) for v in together]}


def _lanes(step: int, first: int, count: int = 16) -> str:
    return ", ".join(f"i32 {first + step * k}" for k in range(count))


def _ir_forms() -> dict[str, str]:
    """Name -> the body computing %r (<16 x i32>) from %c (<16 x i32>) and %p (<64 x i32> products)."""
    fours = "\n".join(f"  %p{j} = shufflevector <64 x i32> %p, <64 x i32> poison, <16 x i32> <{_lanes(4, j)}>"
                      for j in range(4))
    pairs = (f"  %e = shufflevector <64 x i32> %p, <64 x i32> poison, <32 x i32> <{_lanes(2, 0, 32)}>\n"
             f"  %o = shufflevector <64 x i32> %p, <64 x i32> poison, <32 x i32> <{_lanes(2, 1, 32)}>\n"
             "  %q = add <32 x i32> %e, %o\n"
             f"  %e2 = shufflevector <32 x i32> %q, <32 x i32> poison, <16 x i32> <{_lanes(2, 0)}>\n"
             f"  %o2 = shufflevector <32 x i32> %q, <32 x i32> poison, <16 x i32> <{_lanes(2, 1)}>\n"
             "  %s = add <16 x i32> %e2, %o2\n  %r = add <16 x i32> %c, %s")
    return {
        "four shuffles, summed as a balanced tree": fours + "\n  %s01 = add <16 x i32> %p0, %p1\n"
        "  %s23 = add <16 x i32> %p2, %p3\n  %s = add <16 x i32> %s01, %s23\n  %r = add <16 x i32> %c, %s",
        "four shuffles, added to the sum one by one": fours + "\n  %a0 = add <16 x i32> %c, %p0\n"
        "  %a1 = add <16 x i32> %a0, %p1\n  %a2 = add <16 x i32> %a1, %p2\n  %r = add <16 x i32> %a2, %p3",
        "adjacent pairs of adjacent pairs": pairs,
        "llvm.vector.partial.reduce.add (its lanes are not specified)":
            "  %r = call <16 x i32> @llvm.vector.partial.reduce.add.v16i32.v64i32(<16 x i32> %c, <64 x i32> %p)",
    }


def ir_forms() -> dict:
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    cpu = llvm.get_host_cpu_name()
    machine = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=llvm.get_host_cpu_features()
                                                                      .flatten(), opt=3)
    found = {}
    for name, body in _ir_forms().items():
        source = f"""
declare <16 x i32> @llvm.vector.partial.reduce.add.v16i32.v64i32(<16 x i32>, <64 x i32>)
define void @f(ptr %a, ptr %b, ptr %acc) {{
  %va = load <64 x i8>, ptr %a
  %vb = load <64 x i8>, ptr %b
  %za = zext <64 x i8> %va to <64 x i32>
  %sb = sext <64 x i8> %vb to <64 x i32>
  %p = mul <64 x i32> %za, %sb
  %c = load <16 x i32>, ptr %acc
{body}
  store <16 x i32> %r, ptr %acc
  ret void
}}"""
        module = llvm.parse_assembly(source)
        module.verify()
        builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
        builder.getModulePassManager().run(module, builder)
        asm = machine.emit_assembly(module)
        ops = sorted({line.split()[0] for line in asm.splitlines() if line.strip().startswith("vp")})
        found[name] = {"vpdpbusd": "vpdpbusd" in asm, "vector_integer_ops": ops}
    return {"bench": "ir_forms", "llvm_cpu": cpu, "llvmlite": llvm.llvm_version_info, "forms": found}


def main() -> None:
    pin_threads(2)  # BLAS, OpenMP and Numba: both cores (cores() starts its own one-thread processes)
    emit({"bench": "machine", **machine_info()})
    emit(ir_forms())
    emit(cores())
    emit(sgemm())
    emit(gemm_int16())


if __name__ == "__main__":
    main()
