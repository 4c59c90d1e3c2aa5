"""An int16 GEMM micro-kernel for prefill, written as target-independent LLVM IR: ROWS weight rows times PANELS
panels of 16 tokens, the tokens in the vector lanes.

Prefill multiplies every weight row with many tokens, so the weights' bytes are no longer what limits it: the
multiply-adds are. The decode kernels (dot_ir.py) keep a row's elements in the lanes, and pay a conversion and a
scaling per block of 32 for every token. Here the lanes are 16 tokens, and a weight pair is broadcast to them:

    acc[t] += w[o, k] x[t, k] + w[o, k+1] x[t, k+1]        (16 token lanes, int32, one instruction)

which is sext(i16) x sext(i16) products summed in adjacent pairs: vpdpwssd with AVX-512 VNNI (vpmaddwd + vpaddd
without), on x86-64, with nothing x86-specific in the IR. Per block of 32 weights (per 16 for q6_k) the int32
lanes are converted once and scaled, for all 16 tokens at once:

    y[t, o] += float(acc[t]) * (d_x[t, g] d[o, g])      (+ m[o, g] s[t, g] for q4_1: its min times the block sums)

Measured on the 2-core Xeon of the benchmarks (one core, registers only): 4.8 G vpdpwssd/s, 153 G int16
multiply-adds/s, against 4.1 G vfmadd231ps/s, 65 G float32 multiply-adds/s.

Operands, all in the kernel's column order (that of the row expansion in quant_gemm.py; a block of 32 is SEGMENTS
runs of 32 / SEGMENTS columns, run s of block g at column s in/SEGMENTS + g 32/SEGMENTS):
    w    int16 (ROWS, w_stride) rows of integer weights: q8_0 q; q4_0 n - 8; q4_1 n; q6_k q - 32
    d    float32 rows of block scales (one a block; q6_k two), row r at d + r d_stride; m alike (q4_1's mins)
    xp   int16 panels (in/2, 16, 2): panel p at xp + p xp_stride, column pair kp of token t at 32 kp + 2 t
    xd   float32 (G, 16) per panel at xd + p xd_stride: each token's block scale; xs alike, scale * block sum
    out  float32 (ROWS, PANELS, 16)
"""
from __future__ import annotations

from llvmlite import ir

from tinyvlm.kernels.dot_ir import F32, I32, I64, _intrinsic, _shuffle, _splat, _vec

I16 = ir.IntType(16)
LANES = 16  # tokens per panel

SEGMENTS = {"q8_0": 1, "q4_0": 2, "q4_1": 2, "q6_k": 4}  # runs of one block in the column order


def _load(b: ir.IRBuilder, t: ir.Type, base: ir.Value, offset: ir.Value, align: int) -> ir.Value:
    return b.load(b.bitcast(b.gep(base, [offset]), t.as_pointer()), align=align)


def _const(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def _open_loop(b: ir.IRBuilder, fn: ir.Function, name: str, count: ir.Value, initial: list[ir.Constant]
               ) -> tuple[ir.Value, list[ir.Value], ir.Block]:
    """Start `for i in range(count)` carrying values that start as `initial`: returns (i, their phis, the block
    after the loop); the builder is left in the body. _close_loop ends it."""
    pre = b.block
    head, body, done = (fn.append_basic_block(f"{name}.{s}") for s in ("head", "body", "done"))
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64)
    i.add_incoming(_const(0), pre)
    carried = []
    for value in initial:
        phi = b.phi(value.type)
        phi.add_incoming(value, pre)
        carried.append(phi)
    b.cbranch(b.icmp_signed("<", i, count), body, done)
    b.position_at_end(body)
    return i, carried, done


def _close_loop(b: ir.IRBuilder, i: ir.Value, carried: list[ir.Value], values: list[ir.Value], done: ir.Block) -> None:
    """End a loop of _open_loop: the carried phis take `values` and i + 1; the builder moves to the block after."""
    for phi, value in zip(carried, values):
        phi.add_incoming(value, b.block)
    i.add_incoming(b.add(i, _const(1)), b.block)
    b.branch(i.parent)
    b.position_at_end(done)


def _broadcast(b: ir.IRBuilder, scalar: ir.Value, vf: ir.VectorType) -> ir.Value:
    """<n x float> of one float."""
    one = b.insert_element(ir.Constant(vf, None), scalar, ir.Constant(I32, 0))
    return b.shuffle_vector(one, ir.Constant(vf, None), ir.Constant(_vec(I32, vf.count), [0] * vf.count))


def gemm_tile(module: ir.Module, kind: str, rows: int, panels: int) -> ir.Function:
    """void tile(i16* w, i64 w_stride, float* d, i64 d_stride, float* m, i16* xp, i64 xp_stride, float* xd,
    i64 xd_stride, float* xs, float* out, i64 n_in), defined once per module (internal, always inlined):
    out[r, p, t] = sum over blocks as in the module doc, for r < rows, p < panels."""
    name = f"tinyvlm.gemm_tile.{kind}.{rows}.{panels}"
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    i16p, f32p = I16.as_pointer(), F32.as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [i16p, I64, f32p, I64, f32p, i16p, I64, f32p, I64, f32p, f32p, I64])
    fn = ir.Function(module, fnty, name)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    w, w_stride, d, d_stride, m, xp, xp_stride, xd, xd_stride, xs, out, n_in = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    segments = SEGMENTS[kind]
    run = 32 // segments  # columns per run
    spb = 2 if kind == "q6_k" else 1  # scales per block
    seg_cols = b.sdiv(n_in, _const(segments))
    blocks = b.sdiv(n_in, _const(32))
    vf, vi = _vec(F32, LANES), _vec(I32, LANES)
    wide = _vec(I32, 2 * LANES)
    fmuladd = _intrinsic(module, "llvm.fmuladd", vf, [vf, vf, vf], overloads=[vf])
    w_rows = [b.gep(w, [b.mul(w_stride, _const(r))]) for r in range(rows)]
    d_rows = [b.gep(d, [b.mul(d_stride, _const(r))]) for r in range(rows)]
    m_rows = [b.gep(m, [b.mul(d_stride, _const(r))]) for r in range(rows)]
    x_panels = [b.gep(xp, [b.mul(xp_stride, _const(p))]) for p in range(panels)]
    xd_panels = [b.gep(xd, [b.mul(xd_stride, _const(p))]) for p in range(panels)]
    xs_panels = [b.gep(xs, [b.mul(xd_stride, _const(p))]) for p in range(panels)]

    g, flat_accs, done = _open_loop(b, fn, "blocks", blocks, [_splat(F32, LANES, 0.0)] * (rows * panels))
    totals = [flat_accs[r * panels:(r + 1) * panels] for r in range(rows)]
    pair_lo = [2 * k for k in range(LANES)]
    pair_hi = [2 * k + 1 for k in range(LANES)]
    splat_pair = [k % 2 for k in range(2 * LANES)]
    x_scales = [_load(b, vf, xd_panels[p], b.mul(g, _const(LANES)), 4) for p in range(panels)]
    # pairs of columns per scale, 16 (q6_k 8), derived from the arguments so that LLVM keeps the inner loop: fully
    # unrolled, its int32 sums become one dependency chain and x86's machine combiner splits vpdpwssd into
    # vpmaddwd + vpaddd; in a loop each sum is a phi, and stays one vpdpwssd
    trip = b.sdiv(xd_stride, blocks)
    if spb == 2:
        trip = b.ashr(trip, _const(1))
    per_run = run // 2
    runs = segments // spb  # runs per scale
    for f in range(spb):
        i, flat_ints, inner_done = _open_loop(b, fn, f"pairs{f}", trip, [ir.Constant(vi, None)] * (rows * panels))
        ints = [flat_ints[r * panels:(r + 1) * panels] for r in range(rows)]
        seg = b.add(_const(f * runs), b.udiv(i, _const(per_run)))
        col = b.add(b.add(b.mul(seg_cols, seg), b.mul(g, _const(run))), b.mul(b.urem(i, _const(per_run)), _const(2)))
        xs_vec = [b.sext(_load(b, _vec(I16, 2 * LANES), x_panels[p], b.mul(col, _const(LANES)), 2), wide)
                  for p in range(panels)]
        new_ints = [[None] * panels for _ in range(rows)]
        for r in range(rows):
            pair = _load(b, _vec(I16, 2), w_rows[r], col, 2)
            w_vec = b.sext(b.shuffle_vector(pair, ir.Constant(pair.type, None),
                                            ir.Constant(_vec(I32, 2 * LANES), splat_pair)), wide)
            for p in range(panels):
                prod = b.mul(w_vec, xs_vec[p])
                new_ints[r][p] = b.add(ints[r][p], b.add(_shuffle(b, prod, pair_lo), _shuffle(b, prod, pair_hi)))
        _close_loop(b, i, flat_ints, [v for row in new_ints for v in row], inner_done)
        for r in range(rows):
            w_splat = _broadcast(b, b.load(b.gep(d_rows[r], [b.add(b.mul(g, _const(spb)), _const(f))]), align=4), vf)
            for p in range(panels):
                scale = b.fmul(x_scales[p], w_splat)
                totals[r][p] = b.call(fmuladd, [b.sitofp(ints[r][p], vf), scale, totals[r][p]])
    if kind == "q4_1":
        sums = [_load(b, vf, xs_panels[p], b.mul(g, _const(LANES)), 4) for p in range(panels)]
        for r in range(rows):
            m_splat = _broadcast(b, b.load(b.gep(m_rows[r], [g]), align=4), vf)
            for p in range(panels):
                totals[r][p] = b.call(fmuladd, [m_splat, sums[p], totals[r][p]])
    _close_loop(b, g, flat_accs, [v for row in totals for v in row], done)
    for k, acc in enumerate(flat_accs):  # out[r, p] at k = r panels + p
        b.store(acc, b.bitcast(b.gep(out, [_const(k * LANES)]), vf.as_pointer()), align=4)
    b.ret_void()
    return fn
