"""Scalar LLVM intrinsics: float64 <-> int64 bit casts, prefetch hints and libc ``pread``.

Each is one or two LLVM instructions (or one call) that Numba has no spelling for. They are
declared by name, so the code that uses them stays cacheable.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def bits_to_f64(_typingctx, bits):
    """Reinterpret int64 bits as float64: one LLVM bitcast, free and vectorisable."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        as_i64 = context.cast(builder, args[0], sig.args[0], types.int64)
        return builder.bitcast(as_i64, ir.DoubleType())

    return types.float64(bits), codegen


@intrinsic
def f64_to_bits(_typingctx, x):
    """Reinterpret a float64 as its int64 bit pattern (LLVM bitcast)."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, sig, args):
        as_f64 = context.cast(builder, args[0], sig.args[0], types.float64)
        return builder.bitcast(as_f64, ir.IntType(64))

    return types.int64(x), codegen


@intrinsic
def prefetch_row(_typingctx, arr, row):
    """Hint the CPU to load row ``row`` of a 2-D C array into L1 (first and last byte's lines).

    ``llvm.prefetch`` never faults; the caller still keeps ``row`` inside the array.
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and isinstance(row, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        base = builder.bitcast(ary.data, i8p)
        stride = cgutils.unpack_tuple(builder, ary.strides, 2)[0]
        start = builder.mul(context.cast(builder, args[1], sig.args[1], types.intp), stride)
        end = builder.sub(builder.add(start, stride), ir.Constant(start.type, 1))
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        for offset in (start, end):  # read, high locality, data cache
            args_ = [builder.gep(base, [offset]), *(ir.Constant(i32, v) for v in (0, 3, 1))]
            builder.call(fn, args_)
        return context.get_dummy_value()

    return types.none(arr, row), codegen


@intrinsic
def prefetch_at(_typingctx, arr, offset):
    """Hint the CPU to load the cache line at byte ``offset`` of ``arr``'s data into L1.

    No bounds: ``llvm.prefetch`` never faults, whatever the address (past the end included).
    """
    if not (isinstance(arr, types.Array) and isinstance(offset, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        base = builder.bitcast(ary.data, i8p)
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        args_ = [builder.gep(base, [off]), *(ir.Constant(i32, v) for v in (0, 3, 1))]
        builder.call(fn, args_)  # read, high locality, data cache
        return context.get_dummy_value()

    return types.none(arr, offset), codegen


@intrinsic
def pread(_typingctx, fd, address, nbytes, offset):
    """libc ``pread(fd, (void *) address, nbytes, offset)``; returns its result (-1: error).

    Declared by name, so LLVM resolves it in the process when the code is loaded: unlike a
    ctypes function pointer this keeps the caller cacheable.
    """
    sig = types.int64(fd, address, nbytes, offset)

    def codegen(context, builder, sig_, args):
        i64, i8p = ir.IntType(64), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(i64, [ir.IntType(32), i8p, i64, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "pread")
        values = [
            context.cast(builder, v, t, types.int64) for v, t in zip(args, sig_.args, strict=True)
        ]
        handle = builder.trunc(values[0], ir.IntType(32))
        return builder.call(fn, [handle, builder.inttoptr(values[1], i8p), values[2], values[3]])

    return sig, codegen
