"""Vectorisable exp, expm1, log, sigmoid, softplus, tanh for the tuned Numba kernels.

PyPI llvmlite has no SVML, so ``math.exp``/``math.log`` in a loop stay scalar libm calls and
cap the logistic kernel far below memory bandwidth. These versions use only +, *, /, compares
(selects) and int64 <-> float64 bit casts, so a simple loop over a block of values calling them
is turned into SIMD code by LLVM's loop vectoriser once they are inlined.

Method: exp is Cody-Waite range reduction x = k ln2 + r, |r| <= ln2/2, then a degree-11 Taylor
polynomial for expm1(r) (truncation <= 6e-15 relative) and 2^k built from exponent bits, split in
two factors so that results between 2^-1074 and 2^1024 (gradual underflow, overflow to inf) come
out right. log reduces to m in [sqrt(1/2), sqrt(2)) from the bits and uses the atanh series
log(m) = 2 atanh((m-1)/(m+1)) to s^17 (truncation < 1e-15 relative).

Accuracy against float64 NumPy (tests/unit/test_kernels_cpu.py asserts the bounds on a wide grid):
    fast_exp, fast_log, log1p_unit, fast_sigmoid, fast_softplus: max relative error < 1e-14
    fast_expm1, fast_tanh (the e - 1 step near |x| = ln2/2):     max relative error < 5e-14
    (relative to results that are normal numbers; subnormal results may lose all their bits).
That is far below float32 data resolution (6e-8); gradients accumulate in float64 anyway.
Inputs are assumed finite except where stated; NaN propagates through every function.

These helpers are compiled with FMA contraction only, never with ``reassoc``: reassociation would
fold the Cody-Waite split and the round-to-integer shift. Keep them out of ``inline="always"``
(Numba-IR inlining would give them the caller's fast-math flags); LLVM inlines them anyway.
Callers need ``error_model="numpy"``: Python's error model guards every division with a
ZeroDivisionError branch, and that branch alone stops the loop from vectorising.
"""

import math

from numba import njit

from .native.intrinsics import bits_to_f64 as _bits_to_f64
from .native.intrinsics import f64_to_bits as _f64_to_bits

_FLAGS = {"contract"}  # FMA only: the reduction steps below depend on strict evaluation order

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 with trailing zero bits: k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10  # ln 2 - _LN2_HI
_SHIFT = 6755399441055744.0  # 1.5 * 2^52: adding it rounds a |v| < 2^51 to the nearest integer
_SQRT2 = 1.4142135623730951
_MIN_NORMAL, _TWO54 = 2.2250738585072014e-308, 18014398509481984.0
_EXP_LO, _EXP_HI = -746.0, 710.0  # beyond these exp is 0 or inf; clamping keeps k in range

# 1/j! for the expm1(r) polynomial, j = 2..11 (expm1(r) = r + r^2/2 + ... + r^11/11!).
_E2, _E3, _E4, _E5, _E6 = (1.0 / math.factorial(j) for j in range(2, 7))
_E7, _E8, _E9, _E10, _E11 = (1.0 / math.factorial(j) for j in range(7, 12))
# 2/(2j+1) for 2 atanh(s) = s * (2 + 2/3 s^2 + 2/5 s^4 + ... + 2/17 s^16).
_A1, _A2, _A3, _A4 = 2.0 / 3.0, 2.0 / 5.0, 2.0 / 7.0, 2.0 / 9.0
_A5, _A6, _A7, _A8 = 2.0 / 11.0, 2.0 / 13.0, 2.0 / 15.0, 2.0 / 17.0


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _pow2(k):
    """2.0**k for -1022 <= k <= 1023, built in the exponent field."""
    return _bits_to_f64((k + 1023) << 52)


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _reduce_exp(x):
    """Split x = k ln2 + r with |r| <= ln2/2; return (k, expm1(r))."""
    x = _EXP_LO if x < _EXP_LO else x  # written as selects so that NaN passes through
    x = _EXP_HI if x > _EXP_HI else x
    t = x * _LOG2E + _SHIFT  # round-to-nearest via the 2^52 shift; needs strict order
    k = _f64_to_bits(t) - _f64_to_bits(_SHIFT)
    kf = t - _SHIFT
    r = (x - kf * _LN2_HI) - kf * _LN2_LO
    p = _E11 * r + _E10
    p = p * r + _E9
    p = p * r + _E8
    p = p * r + _E7
    p = p * r + _E6
    p = p * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + _E2
    q = r + r * r * p
    return k, q


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def fast_exp(x):
    """exp(x) in float64, relative error < 1e-14; 0 below -745.2, inf above 709.8."""
    k, q = _reduce_exp(x)
    k1 = k >> 1  # 2^k = 2^k1 * 2^(k-k1): each factor stays a normal number
    return ((1.0 + q) * _pow2(k1)) * _pow2(k - k1)


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def fast_expm1(x):
    """exp(x) - 1, relative error < 5e-14 (near 0 it is the polynomial itself, k == 0)."""
    k, q = _reduce_exp(x)
    k1 = k >> 1
    e = ((1.0 + q) * _pow2(k1)) * _pow2(k - k1)
    return q if k == 0 else e - 1.0


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _log_m(s):
    """2 atanh(s) = log((1+s)/(1-s)) for |s| <= 0.1716 (atanh series to s^17)."""
    z = s * s
    p = _A8 * z + _A7
    p = p * z + _A6
    p = p * z + _A5
    p = p * z + _A4
    p = p * z + _A3
    p = p * z + _A2
    p = p * z + _A1
    return s * (2.0 + z * p)


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def fast_log(x):
    """Natural log (relative error < 1e-14); log(0) = -inf, log(inf) = inf, log(<0) = nan."""
    tiny = x < _MIN_NORMAL  # subnormal: scale into the normal range first
    bits = _f64_to_bits(x * _TWO54 if tiny else x)
    e = (bits >> 52) - (1023 + 54 if tiny else 1023)
    m = _bits_to_f64((bits & 0xFFFFFFFFFFFFF) | (1023 << 52))  # mantissa in [1, 2)
    big = m > _SQRT2
    m = 0.5 * m if big else m  # m in [sqrt(1/2), sqrt(2))
    ef = float(e + 1) if big else float(e)
    f = m - 1.0  # exact (Sterbenz)
    res = ef * _LN2_HI + (_log_m(f / (2.0 + f)) + ef * _LN2_LO)
    res = res if x < math.inf else x  # inf and nan pass through
    res = -math.inf if x == 0.0 else res
    return math.nan if x < 0.0 else res


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def log1p_unit(t):
    """log(1 + t) for 0 <= t <= 1 (the range softplus needs), relative error < 1e-14."""
    big = t > _SQRT2 - 1.0
    w = 0.5 * (t - 1.0) if big else t  # (1 + t) = 2 (1 + w) on the big branch
    res = _log_m(w / (2.0 + w))
    return (_LN2_HI + (res + _LN2_LO)) if big else res


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def fast_softplus(z):
    """log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)); never overflows."""
    return max(z, 0.0) + log1p_unit(fast_exp(-abs(z)))


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def fast_sigmoid(z):
    """1 / (1 + exp(-z)) from exp(-|z|) <= 1, so nothing overflows for any z."""
    e = fast_exp(-abs(z))
    inv = 1.0 / (1.0 + e)
    return inv if z >= 0.0 else e * inv


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def fast_tanh(z):
    """tanh(z) = -expm1(-2|z|) / (2 + expm1(-2|z|)) with the sign of z (rel. error < 5e-14)."""
    em = fast_expm1(-2.0 * abs(z))
    t = -em / (2.0 + em)
    return -t if z < 0.0 else t
