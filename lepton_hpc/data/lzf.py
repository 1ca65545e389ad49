"""LZF decompression (HDF5 filter 32000, h5py's ``lzf``) in Numba, without the GIL.

h5py's filter stores each chunk as one header-less LZF block (liblzf's ``lzf_compress`` output,
nothing around it). When compression would not shrink a chunk the filter fails and, being
optional, HDF5 stores the chunk unfiltered and sets the chunk's filter-mask bit: the mask, not
the stored size, says whether a chunk is compressed (a compressed block may be exactly as long
as the chunk).

The format (liblzf ``lzf_d.c``): a control byte ``c``; ``c < 32`` is a literal run of ``c + 1``
bytes that follow; otherwise a back reference of length ``(c >> 5) + 2`` (a length field of 7
continues in the next byte) at distance ``((c & 31) << 8) + next byte + 1`` behind the output
position, copied byte by byte (it may overlap its own output). The block ends where the input
ends. Any run past either end is an error here (-1), never a read or write out of bounds.

Why Numba: a byte-by-byte loop in Python is a thousand times slower, and ``nogil`` lets a rank's
threads decode chunks at once (``chunk_read``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64


@njit(nogil=True, cache=True)
def decompress_into(src, out):
    """Decode the LZF block ``src`` (uint8) into ``out`` (uint8); the number of bytes written,
    or -1 when ``src`` is not a valid block whose output fits in ``out``.

    A caller that needs exactly ``out.size`` bytes compares the result with it: a block that
    decodes to fewer bytes is a different chunk, not a valid one. Indices are unsigned so that
    Numba leaves out its negative-index wraparound on every byte (2-3x faster); every run is
    checked against both ends before it is copied.
    """
    n_in = uint64(src.size)
    n_out = uint64(out.size)
    ip = uint64(0)
    op = uint64(0)
    if n_in == 0:
        return -1
    while ip < n_in:
        ctrl = uint64(src[ip])
        ip += uint64(1)
        if ctrl < 32:  # a literal run
            run = ctrl + uint64(1)
            if op + run > n_out or ip + run > n_in:
                return -1
            for k in range(run):
                out[op + uint64(k)] = src[ip + uint64(k)]
            op += run
            ip += run
        else:  # a back reference
            length = ctrl >> uint64(5)
            if ip >= n_in:
                return -1
            if length == 7:
                length += uint64(src[ip])
                ip += uint64(1)
                if ip >= n_in:
                    return -1
            back = ((ctrl & uint64(31)) << uint64(8)) + uint64(1) + uint64(src[ip])
            ip += uint64(1)
            length += uint64(2)
            if op + length > n_out or back > op:
                return -1
            ref = op - back
            for k in range(length):  # byte by byte: the source may overlap the output
                out[op + uint64(k)] = out[ref + uint64(k)]
            op += length
    return np.int64(op)


def decompress(
    block: bytes | np.ndarray, nbytes: int, out: np.ndarray | None = None
) -> np.ndarray | None:
    """The ``nbytes`` bytes (uint8) the LZF ``block`` holds, or None when it does not decode to
    exactly that many. ``out``: ``nbytes`` bytes (uint8) to decode into, returned (its bytes
    are undefined when None is returned); else a new array."""
    src = np.frombuffer(block, dtype=np.uint8) if isinstance(block, bytes) else block
    out = np.empty(nbytes, dtype=np.uint8) if out is None else out
    return out if decompress_into(src, out) == nbytes else None
