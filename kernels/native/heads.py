"""The one-output loss heads (SQUARED and BINARY) on the lanes of a ``simd`` vector.

``head_lanes`` is the CPU backend's ``_head_loss`` for one output, four or eight rows at once:
exp and log1p on (0, 1] are emitted as LLVM vector code from the same method and constants as
``fastmath`` (Cody-Waite reduction with a degree-11 polynomial; the atanh series), with the same
NaN/inf handling (selects, so NaN passes through). tests/unit/test_kernels_native_simd.py
checks it against ``_head_loss`` (relative error < 1e-14).
"""

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .. import fastmath as fm
from .simd import VecType, _call, _fma, _lane_mask, _splat, _vty

_I64 = ir.IntType(64)


def _horner(builder, x, coefs):
    """coefs[0] + coefs[1] x + ... + coefs[-1] x^(n-1), by FMAs from the top (as fastmath does)."""
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


@njit(inline="always")
def head_of(z, y, count, binary):
    """``head_lanes`` for a ``binary`` flag known only when the kernel runs: both heads are
    compiled and the flag picks one (``head_lanes`` itself takes it as a literal)."""
    if binary:
        return head_lanes(z, y, count, True)
    return head_lanes(z, y, count, False)
