"""Explicit SIMD vectors for Numba kernels: 4 to 32 lanes of float64 as LLVM vector values.

LLVM's loop vectoriser only vectorises innermost loops, so a row of X that is needed twice (for
its dot product, then, once the head has turned the logit into d loss / d z, for the gradient)
is loaded and widened twice, and the gradient goes through memory for every group of rows.
With explicit vectors a group of rows of up to 32 features stays in registers, the gradient
accumulates in registers for a whole chunk of rows, and the head runs on the group's logits at
once (``heads.head_lanes``).

Values of type ``vec8`` / ``vec4`` are plain LLVM ``<8 x double>`` / ``<4 x double>``; they
live in registers and never touch memory unless stored. On AVX-512 one ``vec8`` is one zmm
register; elsewhere LLVM splits it into narrower registers (correct, but the register budget
of the one-output kernel then no longer fits: the CPU backend uses it only with AVX-512).
A ``vec16`` / ``vec32`` is two / four such registers, every operation on it one per register
(``join8``: for heads of several row groups at once).
"""

import operator

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

_F64 = ir.DoubleType()
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)


class VecType(types.Type):
    """``lanes`` float64 values held as one LLVM vector."""

    def __init__(self, lanes: int):
        self.lanes = lanes
        super().__init__(name=f"vec{lanes}")


vec32 = VecType(32)
vec16 = VecType(16)
vec8 = VecType(8)
vec4 = VecType(4)
_VEC = {32: vec32, 16: vec16, 8: vec8, 4: vec4}


@register_model(VecType)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_F64, fe_type.lanes))


def _vty(lanes, elem=_F64):
    return ir.VectorType(elem, lanes)


def _counting(lanes):
    """The shuffle mask 0, 1, ..., lanes - 1 (two vectors joined into one)."""
    return ir.Constant(_vty(lanes, _I32), list(range(lanes)))


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
        vtype = _VEC[lanes]

        def codegen(context, builder, sig, args):
            o = context.cast(builder, args[1], sig.args[1], types.int64)
            n = context.cast(builder, args[2], sig.args[2], types.int64)
            return _masked_load(context, builder, sig.args[0], args[0], o, n, lanes)

        return vtype(ary, off, count), codegen

    return load


load16 = intrinsic(_loader(16))
load32 = intrinsic(_loader(32))
load8 = intrinsic(_loader(8))
load4 = intrinsic(_loader(4))


def _storer(lanes):
    def store(_typingctx, ary, off, count, v):
        """ary[off + l] = v[l] for lanes l < count (ary: 1-D contiguous float64)."""
        if not (_is_float_array(ary) and ary.dtype == types.float64 and v == _VEC[lanes]):
            return None

        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            o = context.cast(builder, args[1], sig.args[1], types.int64)
            n = context.cast(builder, args[2], sig.args[2], types.int64)
            vt = _vty(lanes)
            ptr = builder.bitcast(builder.gep(arr.data, [o]), vt.as_pointer())
            mask = _lane_mask(builder, n, lanes)
            name = f"llvm.masked.store.v{lanes}f64.p0"
            _call(builder, name, ir.VoidType(), [args[3], ptr, _I32(8), mask])
            return context.get_dummy_value()

        return types.none(ary, off, count, v), codegen

    return store


store8 = intrinsic(_storer(8))
store4 = intrinsic(_storer(4))


def _splatter(lanes):
    def splat(_typingctx, x):
        """A vector with all lanes = x."""
        if not isinstance(x, (types.Float, types.Integer)):
            return None
        vtype = _VEC[lanes]

        def codegen(context, builder, sig, args):
            value = context.cast(builder, args[0], sig.args[0], types.float64)
            return _splat(builder, value, lanes)

        return vtype(x), codegen

    return splat


splat4 = intrinsic(_splatter(4))
splat8 = intrinsic(_splatter(8))
splat16 = intrinsic(_splatter(16))
splat32 = intrinsic(_splatter(32))


def _joiner(lanes):
    def join(_typingctx, a, b):
        """The vector [a | b] of twice the lanes of two equal vectors.

        LLVM keeps a vec16 (vec32) as two (four) registers and splits each operation on it into
        one per register, adjacent in the code: independent chains, such as the loss head of
        several groups of rows, then run interleaved instead of one after the other.
        """
        if not (a == b == _VEC[lanes]):
            return None

        def codegen(_context, builder, _sig, args):
            return builder.shuffle_vector(args[0], args[1], _counting(2 * lanes))

        return _VEC[2 * lanes](a, b), codegen

    return join


join8 = intrinsic(_joiner(8))  # two vec8 -> vec16
join16 = intrinsic(_joiner(16))  # two vec16 -> vec32


def _broadcaster(lanes):
    def lane(_typingctx, v, k):
        """A vector of ``lanes`` lanes, every lane = lane k (a constant) of the vector v (any
        number of lanes)."""
        if not (isinstance(v, VecType) and isinstance(k, types.IntegerLiteral)):
            return None
        which = k.literal_value

        def codegen(_context, builder, _sig, args):
            mask = ir.Constant(_vty(lanes, _I32), [which] * lanes)
            return builder.shuffle_vector(args[0], args[0], mask)

        return _VEC[lanes](v, k), codegen

    return lane


lane8 = intrinsic(_broadcaster(8))
lane4 = intrinsic(_broadcaster(4))


@intrinsic
def part8(_typingctx, v, k):
    """Lanes 8k .. 8k + 7 (k a constant) of a vec16 or vec32, as a vec8."""
    if not (isinstance(v, VecType) and v.lanes > 8 and isinstance(k, types.IntegerLiteral)):
        return None
    first = 8 * k.literal_value

    def codegen(_context, builder, _sig, args):
        lanes = ir.Constant(_vty(8, _I32), list(range(first, first + 8)))
        return builder.shuffle_vector(args[0], args[0], lanes)

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


@intrinsic
def hsum8x4(_typingctx, a, b, c, d, e, f, g, h):
    """vec8 (sum of a, ..., sum of h) from eight vec4, by a transposing tree in fixed order
    (folded to 2 partial sums and paired, then to 1), the two halves joined."""
    if not (a == b == c == d == e == f == g == h == vec4):
        return None

    def codegen(_context, builder, _sig, args):
        vectors, keep = list(args), 2
        while keep:
            vectors = [
                _fold(builder, x, y, keep) for x, y in zip(vectors[::2], vectors[1::2], strict=True)
            ]
            keep //= 2
        return builder.shuffle_vector(vectors[0], vectors[1], _counting(8))

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
    # Callers should be compiled without fast-math flags (see cpu_tiles._one_output_tiles):
    # Numba applied them differently to a fresh compile and to the cached one of a parallel
    # function, and the two then differed in the last bit.
    @overload(op, inline="always")
    def _overload(a, b):
        if isinstance(a, VecType) and a == b:
            return lambda a, b: vector_op(a, b)  # noqa: PLW0108 - overload needs a Python impl
        return None


_arithmetic(operator.add, "fadd")
_arithmetic(operator.sub, "fsub")
_arithmetic(operator.mul, "fmul")


def _zeros(lanes):
    def zero(_typingctx):
        """A vector of ``lanes`` zeros."""

        def codegen(_context, _builder, _sig, _args):
            return ir.Constant(_vty(lanes), None)

        return _VEC[lanes](), codegen

    return zero


zero4 = intrinsic(_zeros(4))
zero8 = intrinsic(_zeros(8))
zero16 = intrinsic(_zeros(16))
zero32 = intrinsic(_zeros(32))


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
