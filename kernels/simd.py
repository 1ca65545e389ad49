"""Explicit SIMD vectors for Numba kernels: 8 and 4 lanes of float64 as LLVM vector values.

LLVM's loop vectoriser only vectorises innermost loops, so a row of X that is needed twice (for
its dot product, then, once the head has turned the logit into d loss / d z, for the gradient)
is loaded and widened twice, and the gradient goes through memory for every group of rows.
With explicit vectors a group of four rows of up to 32 features stays in registers (16 x 8
lanes), the gradient accumulates in registers for a whole chunk of rows, and the head runs on
the four logits at once as one 4-lane vector (``head_lanes``). For the logistic head, groups
of eight rows (``hsum8``, the head on one 8-lane vector) are faster still: see
``kernels.cpu._tile_group8``.

Values of type ``vec8`` / ``vec4`` are plain LLVM ``<8 x double>`` / ``<4 x double>``; they
live in registers and never touch memory unless stored. On AVX-512 one ``vec8`` is one zmm
register; elsewhere LLVM splits it into narrower registers (correct, but the register budget
of the one-output kernel then no longer fits: ``kernels.cpu`` uses it only with AVX-512).

``head_lanes`` is ``kernels.cpu._head_loss`` for one output (SQUARED and BINARY) on the lanes of
a vector: exp and log1p on (0, 1] are emitted as LLVM vector code from the same method and
constants as ``fastmath`` (Cody-Waite reduction with a degree-11 polynomial; the atanh series),
with the same NaN/inf handling (selects, so NaN passes through). tests/unit/test_simd.py checks
it against ``_head_loss`` (relative error < 1e-14).

Measured and not kept (one thread, 64K x 32 float32 rows in cache, 4M rows from memory):
Estrin's scheme for the polynomials and one division shared by softplus and sigmoid (no
change: the head is not bound by its chain latency nor by the divider);
a head on eight lanes for eight rows written with the first four rows loaded twice (8.8
against 9.8 ns per row in cache, but no faster from memory; the kept eight-row kernel loads
each row once and computes its dot product at once), and the head of one group run while the
next group's dot products are computed (no faster from memory); longer software-prefetch
distances (3-6 KiB: slower);
the head's constants passed in an array instead of the constant pool, which Numba's large code
model reaches with a 64-bit address load at each use (no change); dynamic scheduling of the
chunks over threads (numba.set_parallel_chunksize: no change); the gradient's broadcasts of
the four d loss / d z read from memory (an embedded broadcast on the load ports instead of a
shuffle on port 5: no change).
"""

import operator

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from . import fastmath as fm

_F64 = ir.DoubleType()
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)


class VecType(types.Type):
    """``lanes`` float64 values held as one LLVM vector."""

    def __init__(self, lanes: int):
        self.lanes = lanes
        super().__init__(name=f"vec{lanes}")


vec8 = VecType(8)
vec4 = VecType(4)


@register_model(VecType)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_F64, fe_type.lanes))


def _vty(lanes, elem=_F64):
    return ir.VectorType(elem, lanes)


def _splat(builder, value, lanes):
    """Broadcast an LLVM scalar (or a constant Python number, as float64) to all lanes."""
    if not isinstance(value, ir.Value):
        return ir.Constant(_vty(lanes), [float(value)] * lanes)
    one = builder.insert_element(ir.Constant(_vty(lanes, value.type), ir.Undefined), value, _I32(0))
    return builder.shuffle_vector(one, one, ir.Constant(_vty(lanes, _I32), [0] * lanes))


def _call(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _fma(builder, a, b, c):
    """a * b + c, rounded once (llvm.fma on the vector type of a)."""
    lanes = a.type.count
    return _call(builder, f"llvm.fma.v{lanes}f64", a.type, [a, b, c])


def _lane_mask(builder, count, lanes):
    """<lanes x i1>: lane l is on when l < count (count an i64; any value, negative included)."""
    idx = ir.Constant(_vty(lanes, _I64), list(range(lanes)))
    return builder.icmp_signed("<", idx, _splat(builder, count, lanes))


def _masked_load(context, builder, arytype, ary, off, count, lanes):
    """Elements off .. off + lanes - 1 of a contiguous array (lanes >= count read as 0), float64.

    llvm.masked.load never touches a masked-off lane, so a short tail reads nothing past it.
    """
    arr = context.make_array(arytype)(context, builder, ary)
    elem = context.get_data_type(arytype.dtype)
    vt = _vty(lanes, elem)
    ptr = builder.bitcast(builder.gep(arr.data, [off]), vt.as_pointer())
    mask = _lane_mask(builder, count, lanes)
    align = ir.Constant(_I32, arytype.dtype.bitwidth // 8)
    suffix = "f32" if arytype.dtype == types.float32 else "f64"
    name = f"llvm.masked.load.v{lanes}{suffix}.p0"
    value = _call(builder, name, vt, [ptr, align, mask, ir.Constant(vt, None)])
    return builder.fpext(value, _vty(lanes)) if elem != _F64 else value


def _is_float_array(a):
    return (
        isinstance(a, types.Array)
        and a.dtype in (types.float32, types.float64)
        and a.layout == "C"
        and a.ndim == 1
    )


def _loader(lanes):
    def load(_typingctx, ary, off, count):
        """``lanes`` elements of a 1-D float array from off, widened; lanes >= count are 0."""
        if not (
            _is_float_array(ary)
            and isinstance(off, types.Integer)
            and isinstance(count, types.Integer)
        ):
            return None
        vtype = vec8 if lanes == 8 else vec4

        def codegen(context, builder, sig, args):
            o = context.cast(builder, args[1], sig.args[1], types.int64)
            n = context.cast(builder, args[2], sig.args[2], types.int64)
            return _masked_load(context, builder, sig.args[0], args[0], o, n, lanes)

        return vtype(ary, off, count), codegen

    return load


load8 = intrinsic(_loader(8))
load4 = intrinsic(_loader(4))


@intrinsic
def store8(_typingctx, ary, off, count, v):
    """ary[off + l] = v[l] for lanes l < count (ary: 1-D contiguous float64)."""
    if not (_is_float_array(ary) and ary.dtype == types.float64 and v == vec8):
        return None

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        o = context.cast(builder, args[1], sig.args[1], types.int64)
        n = context.cast(builder, args[2], sig.args[2], types.int64)
        vt = _vty(8)
        ptr = builder.bitcast(builder.gep(arr.data, [o]), vt.as_pointer())
        mask = _lane_mask(builder, n, 8)
        _call(builder, "llvm.masked.store.v8f64.p0", ir.VoidType(), [args[3], ptr, _I32(8), mask])
        return context.get_dummy_value()

    return types.none(ary, off, count, v), codegen


def _splatter(lanes):
    def splat(_typingctx, x):
        """A vector with all lanes = x."""
        if not isinstance(x, (types.Float, types.Integer)):
            return None
        vtype = vec8 if lanes == 8 else vec4

        def codegen(context, builder, sig, args):
            value = context.cast(builder, args[0], sig.args[0], types.float64)
            return _splat(builder, value, lanes)

        return vtype(x), codegen

    return splat


splat4 = intrinsic(_splatter(4))
splat8 = intrinsic(_splatter(8))


@intrinsic
def lane8(_typingctx, v, k):
    """A vec8 with every lane = lane k (a constant) of the vec4 or vec8 v."""
    if not (isinstance(v, VecType) and isinstance(k, types.IntegerLiteral)):
        return None
    lane = k.literal_value

    def codegen(_context, builder, _sig, args):
        return builder.shuffle_vector(args[0], args[0], ir.Constant(_vty(8, _I32), [lane] * 8))

    return vec8(v, k), codegen


@intrinsic
def fma(_typingctx, a, b, c):
    """a * b + c lane by lane, rounded once."""
    if not (isinstance(a, VecType) and a == b == c):
        return None

    def codegen(_context, builder, _sig, args):
        return _fma(builder, *args)

    return a(a, b, c), codegen


@intrinsic
def hsum(_typingctx, v):
    """Sum of the lanes, as a tree of halves (fixed order)."""
    if not isinstance(v, VecType):
        return None

    def codegen(_context, builder, sig, args):
        value, lanes = args[0], sig.args[0].lanes
        while lanes > 1:
            lanes //= 2
            lo = builder.shuffle_vector(
                value, value, ir.Constant(_vty(lanes, _I32), list(range(lanes)))
            )
            hi = builder.shuffle_vector(
                value, value, ir.Constant(_vty(lanes, _I32), list(range(lanes, 2 * lanes)))
            )
            value = builder.fadd(lo, hi)
        return builder.extract_element(value, _I32(0))

    return types.float64(v), codegen


def _fold(builder, x, y, keep):
    """[x folded | y folded]: lane i + lane i + keep, for the lanes i with bit ``keep`` clear."""
    n = x.type.count
    lo = [i for i in range(n) if (i // keep) % 2 == 0]
    hi = [i + keep for i in lo]
    first = builder.shuffle_vector(x, y, ir.Constant(_vty(n, _I32), lo + [n + i for i in lo]))
    second = builder.shuffle_vector(x, y, ir.Constant(_vty(n, _I32), hi + [n + i for i in hi]))
    return builder.fadd(first, second)


def _transposed_sums(builder, vectors):
    """<8 x double> whose lane k is the sum of vectors[k] (8 vectors; 4: lanes 4-7 repeat 0-3).

    A tree in fixed order: each vec8 is folded to 4 partial sums and paired with its neighbour
    ([a's 4 | b's 4]), then to 2 and 1, pairing again, so 8 sums take 7 adds and 14 shuffles.
    """
    keep = 4
    while keep:
        if len(vectors) == 1:
            vectors = vectors * 2
        vectors = [
            _fold(builder, a, b, keep) for a, b in zip(vectors[::2], vectors[1::2], strict=True)
        ]
        keep //= 2
    return vectors[0]


@intrinsic
def hsum4(_typingctx, a, b, c, d):
    """vec4 (sum of a, sum of b, sum of c, sum of d) from four vec8, by a transposing tree."""
    if not (a == b == c == d == vec8):
        return None

    def codegen(_context, builder, _sig, args):
        sums = _transposed_sums(builder, list(args))  # [a, b, c, d, a, b, c, d]
        return builder.shuffle_vector(sums, sums, ir.Constant(_vty(4, _I32), [0, 1, 2, 3]))

    return vec4(a, b, c, d), codegen


@intrinsic
def hsum8(_typingctx, a, b, c, d, e, f, g, h):
    """vec8 (sum of a, ..., sum of h) from eight vec8, by the same transposing tree."""
    if not (a == b == c == d == e == f == g == h == vec8):
        return None

    def codegen(_context, builder, _sig, args):
        return _transposed_sums(builder, list(args))

    return vec8(a, b, c, d, e, f, g, h), codegen


def _arithmetic(op, emit):
    """Overload op (+, -, *) for two vectors of the same type: one LLVM instruction."""

    @intrinsic
    def vector_op(_typingctx, a, b):
        if not (isinstance(a, VecType) and a == b):
            return None

        def codegen(_context, builder, _sig, args):
            return getattr(builder, emit)(args[0], args[1])

        return a(a, b), codegen

    # inline="always": the operation lands in the caller's IR as one instruction, not a call.
    # Callers should be compiled without fast-math flags (see cpu._one_output_tiles): Numba
    # applied them to these instructions when it compiled a parallel function and not when it
    # loaded it from its cache, and the two then differed in the last bit.
    @overload(op, inline="always")
    def _overload(a, b):
        if isinstance(a, VecType) and a == b:
            return lambda a, b: vector_op(a, b)  # noqa: PLW0108 - overload needs a Python impl
        return None


_arithmetic(operator.add, "fadd")
_arithmetic(operator.sub, "fsub")
_arithmetic(operator.mul, "fmul")


# ------------------------------------------------------------------------------- the head


def _horner(builder, x, coefs):
    """coefs[0] + coefs[1] x + ... + coefs[-1] x^(n-1), by FMAs from the top (as fastmath does).

    Estrin's scheme (shallower chains) measured no faster in the one-output kernel.
    """
    n = x.type.count
    p = _splat(builder, coefs[-1], n)
    for coef in reversed(coefs[:-1]):
        p = _fma(builder, p, x, _splat(builder, coef, n))
    return p


def _exp(builder, x):
    """fastmath.fast_exp on a vector (same reduction, polynomial and exponent split)."""
    n = x.type.count
    c = lambda v: _splat(builder, v, n)  # noqa: E731 - local constant maker
    ivt = _vty(n, _I64)
    x = builder.select(builder.fcmp_ordered("<", x, c(fm._EXP_LO)), c(fm._EXP_LO), x)
    x = builder.select(builder.fcmp_ordered(">", x, c(fm._EXP_HI)), c(fm._EXP_HI), x)
    t = _fma(builder, x, c(fm._LOG2E), c(fm._SHIFT))
    k = builder.sub(builder.bitcast(t, ivt), builder.bitcast(c(fm._SHIFT), ivt))
    kf = builder.fsub(t, c(fm._SHIFT))
    r = _fma(builder, builder.fneg(kf), c(fm._LN2_HI), x)
    r = _fma(builder, builder.fneg(kf), c(fm._LN2_LO), r)
    p = _horner(
        builder,
        r,
        (fm._E2, fm._E3, fm._E4, fm._E5, fm._E6, fm._E7, fm._E8, fm._E9, fm._E10, fm._E11),
    )
    q = _fma(builder, builder.fmul(r, r), p, r)
    k1 = builder.ashr(k, ir.Constant(ivt, [1] * n))

    def pow2(kk):
        biased = builder.add(kk, ir.Constant(ivt, [1023] * n))
        return builder.bitcast(builder.shl(biased, ir.Constant(ivt, [52] * n)), x.type)

    e = builder.fmul(builder.fadd(c(1.0), q), pow2(k1))
    return builder.fmul(e, pow2(builder.sub(k, k1)))


def _log1p_unit(builder, t):
    """fastmath.log1p_unit (log(1 + t) for 0 <= t <= 1) on a vector."""
    n = t.type.count
    c = lambda v: _splat(builder, v, n)  # noqa: E731
    big = builder.fcmp_ordered(">", t, c(fm._SQRT2 - 1.0))
    w = builder.select(big, builder.fmul(c(0.5), builder.fsub(t, c(1.0))), t)
    s = builder.fdiv(w, builder.fadd(c(2.0), w))
    z = builder.fmul(s, s)
    p = _horner(builder, z, (fm._A1, fm._A2, fm._A3, fm._A4, fm._A5, fm._A6, fm._A7, fm._A8))
    res = builder.fmul(s, _fma(builder, z, p, c(2.0)))
    high = builder.fadd(c(fm._LN2_HI), builder.fadd(res, c(fm._LN2_LO)))
    return builder.select(big, high, res)


@intrinsic
def head_lanes(_typingctx, z, y, count, binary):
    """(d loss / d z, loss) of four or eight rows at once; lanes >= count give 0 for both.

    binary False: squared error (z - y)^2, gradient 2 (z - y).
    binary True: log(1 + e^z) - y z, gradient sigmoid(z) - y, computed as in _head_loss.
    """
    if not (isinstance(z, VecType) and z == y and isinstance(count, types.Integer)):
        return None
    if not isinstance(binary, types.BooleanLiteral):
        return None
    is_binary = binary.literal_value
    lanes = z.lanes
    rtype = types.UniTuple(z, 2)

    def codegen(context, builder, sig, args):
        v, t = args[0], args[1]
        c = lambda x: _splat(builder, x, lanes)  # noqa: E731
        if is_binary:
            neg_abs = builder.fneg(_call(builder, f"llvm.fabs.v{lanes}f64", v.type, [v]))
            e = _exp(builder, neg_abs)
            pos = builder.fcmp_ordered(">", v, c(0.0))
            loss = builder.fsub(builder.select(pos, v, c(0.0)), builder.fmul(t, v))
            loss = builder.fadd(loss, _log1p_unit(builder, e))
            inv = builder.fdiv(c(1.0), builder.fadd(c(1.0), e))
            nonneg = builder.fcmp_ordered(">=", v, c(0.0))
            grad = builder.fsub(builder.select(nonneg, inv, builder.fmul(e, inv)), t)
        else:
            r = builder.fsub(v, t)
            loss = builder.fmul(r, r)
            grad = builder.fmul(c(2.0), r)
        cnt = context.cast(builder, args[2], sig.args[2], types.int64)
        on = _lane_mask(builder, cnt, lanes)
        grad = builder.select(on, grad, c(0.0))
        loss = builder.select(on, loss, c(0.0))
        return context.make_tuple(builder, rtype, [grad, loss])

    return rtype(z, y, count, binary), codegen


@intrinsic
def zero8(_typingctx):
    """A vec8 of zeros."""

    def codegen(_context, _builder, _sig, _args):
        return ir.Constant(_vty(8), None)

    return vec8(), codegen


@intrinsic
def zero4(_typingctx):
    """A vec4 of zeros."""

    def codegen(_context, _builder, _sig, _args):
        return ir.Constant(_vty(4), None)

    return vec4(), codegen


@intrinsic
def unpack4(_typingctx, v):
    """The four lanes of a vec4 as a tuple of float64."""
    if v != vec4:
        return None
    rtype = types.UniTuple(types.float64, 4)

    def codegen(context, builder, _sig, args):
        lanes = [builder.extract_element(args[0], _I32(i)) for i in range(4)]
        return context.make_tuple(builder, rtype, lanes)

    return rtype(v), codegen
