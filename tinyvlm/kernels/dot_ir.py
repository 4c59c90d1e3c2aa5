"""Integer dot products of one quantized weight row with int8 activations, written as target-independent LLVM IR.

Numba widens int8 products to int64, so its own loops cannot reach the CPUs' integer dot-product instructions.
This module builds the row loop in LLVM IR instead (llvmlite's IR builder; only generic instructions and the
generic intrinsics llvm.vector.partial.reduce.add and llvm.fmuladd, no x86- or ARM-specific names), and
quant_int8.py calls it from a Numba intrinsic. What one row computes, for blocks g of 32 weights:

    dot = sum_g d[g] * xd[g] * sum_j n[32g + j] * xq[32g + j]      (int32 per block, float across blocks)

where xq (int8) and xd (float32) are the activations quantized per block (xd is passed repeated once per lane,
so that it scales the int32 lanes with one multiply), and n is the weight's integer:
q8_0 its int8 value; q4 its nibble, minus BIAS[target]. The offset that bias leaves (and q4_1's min) is the
caller's: sum_g (m[g] + (BIAS - 8 if q4_0) d[g]) * xd[g] * sum(xq of block g), a short loop over the blocks.

Which IR form decides the instruction, so the form is chosen per target family when the kernel compiles
(measured with LLVM 22 from llvmlite 0.50; tests/test_kernels_int8.py checks the instructions):
  arm  (aarch64, and the generic form elsewhere): per block, two llvm.vector.partial.reduce.add of
       sext(i8) x sext(i8) products into a <4 x i32> accumulator, which becomes two SDOT on cores with the dot
       product extension (Armv8.2+; NUMBA_CPU_NAME=neoverse-n1 under qemu). The nibbles must be signed for it
       (LLVM proves 0..15 non-negative and turns the sign extension into a zero extension, which has no SDOT
       form): BIAS 8, which is q4_0's own offset. The reduction's lane order is unspecified, so one accumulator
       never holds two blocks. Two blocks a step; the q4 loop is 32 instructions per two blocks for neoverse-n1
       (4 sdot; llama.cpp's NEON ggml_vec_dot_q4_0_q8_0 has about 34 intrinsics per two blocks in its source).
  x86  (x86-64): zext(u8) x sext(i8) products summed in adjacent pairs (an exact lane order), which becomes
       vpmaddwd, and with AVX-512 VNNI or AVX-VNNI vpdpwssd for the second half; q4 two blocks per step in
       512-bit vectors (8 int32 lanes a block), q8_0 one (16 lanes), converted to float and scaled lane-wise.
       BIAS 0.
       A full llvm.vector.reduce.add of the u8 x s8 products becomes vpdpbusd, but with a horizontal sum
       after every block (12 instructions of the 14 per block), and partial.reduce.add becomes vpmaddwd with
       unspecified lanes; the pairs form is 29 instructions per four blocks in the q4 decode loop (LLVM unrolls
       it twice), against about 10 per block for the float kernel of quant_numba.py.
Several tokens (prefill of a short input) share each step's weight loads and nibble splitting: `tokens`
accumulators, one per token. Numba caches the compiled kernels of quant_int8.py keyed by that file only: after
editing this one, delete tinyvlm/kernels/__pycache__/quant_int8* (a package upgrade replaces both files).
"""
from __future__ import annotations

import platform

from llvmlite import ir

I8, I32, I64, F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
BLOCK = 32  # weights per block


def target_family() -> str:
    """ "x86" on x86-64, else "arm" (the form that becomes SDOT on aarch64 and stays correct anywhere)."""
    return "x86" if platform.machine().lower() in ("x86_64", "amd64", "x64") else "arm"


BIAS = {"x86": 0, "arm": 8}  # subtracted from each q4 nibble before the integer product


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _splat(t: ir.Type, n: int, value: int | float) -> ir.Constant:
    return ir.Constant(_vec(t, n), [ir.Constant(t, value)] * n)


def _shuffle(b: ir.IRBuilder, v: ir.Value, indices: list[int]) -> ir.Value:
    return b.shuffle_vector(v, ir.Constant(v.type, None), ir.Constant(_vec(I32, len(indices)), indices))


def _load_i8(b: ir.IRBuilder, base: ir.Value, offset: ir.Value, n: int) -> ir.Value:
    """<n x i8> at base + offset bytes (no alignment assumed)."""
    pointer = b.bitcast(b.gep(base, [offset]), _vec(I8, n).as_pointer())
    return b.load(pointer, align=1)


def _suffix(t: ir.Type) -> str:
    """LLVM's mangling of an overloaded intrinsic's type: v16f32, v4i32, ..."""
    element = "f32" if t.element == F32 else f"i{t.element.width}"
    return f"v{t.count}{element}"


def _intrinsic(module: ir.Module, name: str, result: ir.Type, args: list[ir.Type], overloads: list[ir.Type]
               ) -> ir.Function:
    """A declaration of a generic LLVM intrinsic overloaded on vector types, its name mangled with `overloads`
    (llvmlite's declare_intrinsic knows scalar types only)."""
    full = ".".join([name] + [_suffix(t) for t in overloads])
    existing = module.globals.get(full)
    return existing if existing is not None else ir.Function(module, ir.FunctionType(result, args), full)


def _pairs(b: ir.IRBuilder, products: ir.Value) -> ir.Value:
    """<2n x i32> -> <n x i32>: lane k = products[2k] + products[2k + 1] (x86: vpmaddwd / vpdpwssd)."""
    n = products.type.count // 2
    return b.add(_shuffle(b, products, [2 * k for k in range(n)]), _shuffle(b, products, [2 * k + 1 for k in range(n)]))


def _partial_reduce(b: ir.IRBuilder, acc: ir.Value, products: ir.Value) -> ir.Value:
    """acc <4 x i32> + the 16 products, lanes unspecified (ARM with dotprod: SDOT)."""
    types = [acc.type, products.type]
    fn = _intrinsic(b.module, "llvm.vector.partial.reduce.add", acc.type, types, overloads=types)
    return b.call(fn, [acc, products])


def steps(family: str, kind: str) -> int:
    """Blocks per step of the row loop: two (x86 q4, q6_k: 512-bit vectors, q6_k's unpacking shared; arm: the
    loop's own cost halved), x86 q8_0 one (a block fills 512 bits), arm q6_k one (its sdot works on one block's
    half at a time). A last odd block runs alone."""
    if family == "x86":
        return 1 if kind == "q8_0" else 2
    return 1 if kind == "q6_k" else 2


def scales_per_block(kind: str) -> int:
    """Weight scales per block of 32: q6_k has one per 16 values (its two halves keep separate lanes)."""
    return 2 if kind == "q6_k" else 1


def _q6_weights(b: ir.IRBuilder, q: ir.Value, g: ir.Value, plane: ir.Value, nb: int) -> ir.Value:
    """q6_k blocks g .. g + nb as <32nb x i8> values q - 32, element 8k + j of block g + i at 8nb k + 8i + j: the
    three planes' 8nb bytes each (low 4 bits of elements j and 16 + j; of 8 + j and 24 + j; top 2 bits of all)."""
    base = b.mul(g, ir.Constant(I64, 8))
    n = 8 * nb
    low, odd, high = (_load_i8(b, q, b.add(base, b.mul(plane, ir.Constant(I64, p))), n) for p in range(3))

    def splat(v: int) -> ir.Constant:
        return _splat(I8, n, v)

    def top(shifted: ir.Value) -> ir.Value:
        return b.and_(shifted, splat(0x30))  # the two bits of quarter k, at bits 4..5

    quarters = [b.or_(b.and_(low, splat(15)), top(b.shl(high, splat(4)))),
                b.or_(b.and_(odd, splat(15)), top(b.shl(high, splat(2)))),
                b.or_(b.lshr(low, splat(4)), top(high)),
                b.or_(b.lshr(odd, splat(4)), top(b.lshr(high, splat(2))))]
    halves = [b.shuffle_vector(quarters[i], quarters[i + 1], ir.Constant(_vec(I32, 2 * n), list(range(2 * n))))
              for i in (0, 2)]
    values = b.shuffle_vector(*halves, ir.Constant(_vec(I32, 4 * n), list(range(4 * n))))
    return b.sub(values, _splat(I8, 4 * n, 32))


def _weights(b: ir.IRBuilder, family: str, kind: str, q: ir.Value, g: ir.Value, plane: ir.Value,
             nb: int) -> list[ir.Value]:
    """The integers of blocks g .. g + nb of a row (q: its bytes; plane: q6_k's plane size): q8_0 [<32nb x i8>];
    q4 [low nibbles, high nibbles], each <16nb x i8>, less BIAS; q6_k [<32nb x i8>] (_q6_weights)."""
    if kind == "q8_0":
        return [_load_i8(b, q, b.mul(g, ir.Constant(I64, BLOCK)), BLOCK * nb)]
    if kind == "q6_k":
        return [_q6_weights(b, q, g, plane, nb)]
    qv = _load_i8(b, q, b.mul(g, ir.Constant(I64, BLOCK // 2)), 16 * nb)  # <16nb x i8>: 16 bytes a block
    lo, hi = b.and_(qv, _splat(I8, 16 * nb, 15)), b.lshr(qv, _splat(I8, 16 * nb, 4))
    if BIAS[family]:
        lo, hi = b.sub(lo, _splat(I8, 16 * nb, BIAS[family])), b.sub(hi, _splat(I8, 16 * nb, BIAS[family]))
    return [lo, hi]


def _activations(b: ir.IRBuilder, kind: str, x: ir.Value, g: ir.Value, nb: int) -> list[ir.Value]:
    """The int8 activations that _weights' parts multiply (x in activation_order), part by part."""
    xv = _load_i8(b, x, b.mul(g, ir.Constant(I64, BLOCK)), BLOCK * nb)  # <32nb x i8>
    if kind in ("q8_0", "q6_k"):
        return [xv]
    return [_shuffle(b, xv, list(range(16 * nb))), _shuffle(b, xv, list(range(16 * nb, 32 * nb)))]


def _block_lanes(b: ir.IRBuilder, family: str, kind: str, weights: list[ir.Value], xs: list[ir.Value],
                 nb: int) -> ir.Value:
    """Integer lanes of nb blocks' dot products, block i in lanes L i .. L i + L - 1 (L = lanes_per_block)."""
    signed_weights = kind in ("q8_0", "q6_k") or BIAS[family] != 0
    if family == "x86":
        lanes = None
        for w, xp in zip(weights, xs):
            n = w.type.count
            wide = b.sext(w, _vec(I32, n)) if signed_weights else b.zext(w, _vec(I32, n))
            s = _pairs(b, b.mul(wide, b.sext(xp, _vec(I32, n))))
            lanes = s if lanes is None else b.add(lanes, s)
        if kind == "q6_k" and nb > 1:  # pair lane 8k + 4i + m (block i, quarter k) to block-major 16i + 4k + m
            order = [8 * (lane % 16 // 4) + 4 * (lane // 16) + lane % 4 for lane in range(16 * nb)]
            lanes = _shuffle(b, lanes, order)
        return lanes
    zero = ir.Constant(_vec(I32, 4), [ir.Constant(I32, 0)] * 4)
    per_block = []  # arm: each block's own <4 x i32> (the partial reduction's lanes are unspecified); q6_k: each
    for i in range(nb):  # half's own, as its halves have their own scales
        acc = zero
        for w, xp in zip(weights, xs):
            width = w.type.count // nb  # this part's bytes of one block: q4 16, q8_0 32
            for start in range(width * i, width * (i + 1), 16):
                idx = list(range(start, start + 16))
                w16, x16 = (b.sext(_shuffle(b, v, idx), _vec(I32, 16)) for v in (w, xp))
                acc = _partial_reduce(b, acc if kind != "q6_k" else zero, b.mul(w16, x16))
                if kind == "q6_k":
                    per_block.append(acc)
        if kind != "q6_k":
            per_block.append(acc)
    if len(per_block) == 1:
        return per_block[0]
    return b.shuffle_vector(per_block[0], per_block[1], ir.Constant(_vec(I32, 8), list(range(8))))


def activation_order(family: str, kind: str, n_in: int) -> list[int]:
    """The order the kernel reads the int8 activations in: element indices, (in,). The q4 kernels take two
    blocks a step, the elements of their low nibbles first: per pair of blocks A, B: A[0:16] B[0:16] A[16:32]
    B[16:32]; q6_k per step its quarters (elements 8k .. 8k + 7) in turn, each block's in turn: A[0:8] B[0:8]
    A[8:16] ...; a last odd block, and q8_0, in natural order."""
    nb, blocks = (1 if kind == "q8_0" else steps(family, kind)), n_in // BLOCK
    order = []
    for g in range(0, blocks - blocks % nb, nb):
        if kind == "q6_k":  # as _q6_weights lays them out
            order += [BLOCK * (g + i) + 8 * k + j for k in range(4) for i in range(nb) for j in range(8)]
        else:
            order += [BLOCK * (g + i) + j for half in (0, 16) for i in range(nb) for j in range(half, half + 16)]
    return order + list(range(len(order), n_in))


def lanes_per_block(family: str, kind: str) -> int:
    """x86: the pair sums of a block (q8_0, q6_k: 16; q4: 8, its low- and high-nibble halves added); arm: 4
    (q6_k 8: 4 a half)."""
    if family == "x86":
        return 16 if kind in ("q8_0", "q6_k") else 8
    return 8 if kind == "q6_k" else 4


def _hsum(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """The sum of a float vector's lanes, halves added pairwise (a fixed order)."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = b.fadd(_shuffle(b, v, list(range(n))), _shuffle(b, v, list(range(n, 2 * n))))
    return b.extract_element(v, ir.Constant(I32, 0))


def _scaled_loop(b: ir.IRBuilder, fn: ir.Function, family: str, kind: str, tokens: int, start: ir.Value,
                 count: ir.Value, nb: int, name: str) -> list[ir.Value]:
    """`count` steps of nb blocks from block `start`, for each token t: acc[t] += float(lanes) * xl_t(lanes)
    * d[g] per block. The weights are loaded and split once per step for all tokens. Returns each token's
    accumulated lane sum."""
    q, d, x, x_stride, xl, xl_stride = fn.args[:6]
    plane = b.mul(fn.args[8], ir.Constant(I64, 8))  # q6_k: bytes per plane of the row
    per = lanes_per_block(family, kind)
    lanes = per * nb
    vf = _vec(F32, lanes)
    head, body, done = (fn.append_basic_block(f"{name}.{s}") for s in ("head", "body", "done"))
    entry = b.block
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64)
    accs = [b.phi(vf) for _ in range(tokens)]
    i.add_incoming(ir.Constant(I64, 0), entry)
    for acc in accs:
        acc.add_incoming(_splat(F32, lanes, 0.0), entry)
    b.cbranch(b.icmp_signed("<", i, count), body, done)
    b.position_at_end(body)
    g = b.add(start, b.mul(i, ir.Constant(I64, nb)))
    weights = _weights(b, family, kind, q, g, plane, nb)
    spb = scales_per_block(kind)
    w_scale = b.load(b.bitcast(b.gep(d, [b.mul(g, ir.Constant(I64, spb))]), _vec(F32, nb * spb).as_pointer()),
                     align=4)  # d[g spb .. (g + nb) spb]
    w_scale = _shuffle(b, w_scale, [k // (per // spb) for k in range(lanes)])  # each scale over its lanes
    fmuladd = _intrinsic(b.module, "llvm.fmuladd", vf, [vf, vf, vf], overloads=[vf])
    for t, acc in enumerate(accs):
        x_t = b.gep(x, [b.mul(x_stride, ir.Constant(I64, t))])
        xl_t = b.gep(xl, [b.add(b.mul(xl_stride, ir.Constant(I64, t)), b.mul(g, ir.Constant(I64, per)))])
        ints = b.sitofp(_block_lanes(b, family, kind, weights, _activations(b, kind, x_t, g, nb), nb), vf)
        x_scale = b.load(b.bitcast(xl_t, vf.as_pointer()), align=4)
        acc.add_incoming(b.call(fmuladd, [b.fmul(ints, x_scale), w_scale, acc]), body)
    i.add_incoming(b.add(i, ir.Constant(I64, 1)), body)
    b.branch(head)
    b.position_at_end(done)
    return [_hsum(b, acc) for acc in accs]


def row_dot(module: ir.Module, kind: str, family: str, tokens: int = 1) -> ir.Function:
    """void dot(i8* q_row, float* d_row, i8* xq, i64 xq_stride, float* xl, i64 xl_stride, float* y, i64 y_stride,
    i64 blocks), defined once per module (internal, always inlined): y[t * y_stride] = row . activations of token
    t, for t < tokens, token t's int8 activations at xq + t xq_stride (in activation_order) and their block
    scales, repeated lanes_per_block times, at xl + t xl_stride. See the module doc."""
    name = f"tinyvlm.row_dot.{kind}.{family}.{tokens}"
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    i8p, f32p = I8.as_pointer(), F32.as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [i8p, f32p, i8p, I64, f32p, I64, f32p, I64, I64])
    fn = ir.Function(module, fnty, name)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    y, y_stride, blocks = fn.args[6:]
    nb = steps(family, kind)
    full = b.sdiv(blocks, ir.Constant(I64, nb))
    totals = _scaled_loop(b, fn, family, kind, tokens, ir.Constant(I64, 0), full, nb, "main")
    if nb > 1:  # the last block of an odd count
        start = b.mul(full, ir.Constant(I64, nb))
        tails = _scaled_loop(b, fn, family, kind, tokens, start, b.sub(blocks, start), 1, "tail")
        totals = [b.fadd(a, t) for a, t in zip(totals, tails)]
    for t, total in enumerate(totals):
        b.store(total, b.gep(y, [b.mul(y_stride, ir.Constant(I64, t))]))
    b.ret_void()
    return fn
