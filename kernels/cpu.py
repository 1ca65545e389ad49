"""CPU backend of the dense-stack contract in ``lepton_hpc.kernels`` (Numba, multithreaded).

The tuned kernels (``cpu_passes``, ``cpu_tiles``, built on ``cpu_layers`` and ``fastmath``) run
where ``native.supported()`` says their hand-written LLVM code was tested; anywhere else every
call goes to ``reference``, the plain ``@njit`` implementation of the same contract.

Work split of the tuned kernels: rows are cut into blocks (about 4 KiB of X for one-layer
models, about 128 KiB of activations for MLPs) grouped into chunks that depend only on n and the
model, so results are bitwise identical for any thread count. Precision: float32 X is widened as
it is read; every product, sum and accumulator is float64 (agreement with a float64 reference to
~1e-13), unless ``train.products = "float32"`` (see ``gradient``). One-output models run the
register tiles of ``cpu_tiles`` where the CPU has AVX-512 and the rows are narrow (``_tiled``),
and its feature panels for every other width (any row on AVX2, ``_panels``); models with
several outputs the pipelined passes.
"""

import numpy as np

from . import BINARY, cpu_gemm, native, reference
from .checks import check_gradient_out, check_model, targets
from .cpu_float32 import one_output_float32
from .cpu_layers import (
    _COMBINE_TILE,
    _combine,
    _combine_columns,
    _head_loss,  # noqa: F401 - tests reach the scalar head as cpu._head_loss
)
from .cpu_passes import _mlp_forward, _mlp_gradient, _single_layer_gradient
from .cpu_tiles import (
    _one_output_forward8,
    _one_output_panels,
    _one_output_panels4,
    _one_output_panels4x16,
    _one_output_pipelined4,
    _taken_panels4,
    _taken_panels4x16,
    tiles_kernel,
)

SINGLE_BLOCK_BYTES = 4096  # one-layer models: rows of X per block
MLP_ROW_FLOATS = 16384  # MLP blocks: rows x (sum of layer widths) <= this (128 KiB of float64)
MAX_CHUNKS = 1024  # enough chunks to balance any thread count we run with
SCRATCH_BYTES = 64 << 20  # fewer chunks for big models, to bound the per-chunk partial sums...
MIN_CHUNKS = 16  # ...but never fewer than this (when there are enough blocks)
MIN_CHUNK_BLOCKS = 8  # a chunk has at least this many blocks: small batches pay less per chunk
TILE_WIDTH = 32  # one-output models up to this many features: rows held in registers
TILE_AHEAD_BYTES = 2048  # software prefetch distance of the register-tile kernels
PANEL_AHEAD_WIDTH = 28  # ... those 4-feature panels prefetch (software) rows up to this width
PANEL4_WIDTH = 40  # one-output rows up to this many features run 4-feature panels of 16 rows
# MLPs with a hidden layer at least this wide run their layers as BLAS GEMMs over blocks of
# rows (``cpu_gemm``); narrower ones the loop nests of ``cpu_passes``, which win there. Tests
# switch it.
GEMM_MIN_WIDTH = 64

# The register tiles need AVX-512's 32 vector registers: elsewhere their live vectors spill and
# the pipelined kernel is faster. Tests switch it.
USE_TILES = native.has_avx512()
# One-output models the tiles do not take (``_tiled``; any d without AVX-512) run feature
# panels of 8 or 4 features (``_panels``), faster than the pipelined pass. Tests switch it.
USE_PANELS = True
# The CPUs (LLVM's name of the host) whose AVX2 code runs the wide-row groups faster pipelined
# (``cpu_tiles._one_output_pipelined4``) than in two passes (``_one_output_panels4``): the same
# bits either way. Measured faster on Zen 3 (4-15 % from memory at d >= 128) and slower on a
# Zen 4 running AVX2 code (20-30 %); elsewhere the two passes, the kernel with the longest record.
PIPELINED_CPUS = ("znver3",)
PIPELINED = native.host_cpu() in PIPELINED_CPUS


def _plan(n: int, block: int, width: int) -> tuple[int, int]:
    """(n_chunks, rows per chunk): whole blocks per chunk, from n and the model only."""
    n_blocks = -(-n // block)
    cap = max(MIN_CHUNKS, min(MAX_CHUNKS, SCRATCH_BYTES // (8 * width)))
    per = max(min(MIN_CHUNK_BLOCKS, n_blocks), -(-n_blocks // cap))
    return -(-n_blocks // per), per * block


def _single_block(X: np.ndarray) -> int:
    """Rows per one-layer block: about SINGLE_BLOCK_BYTES of X, a multiple of 4 rows."""
    rows = SINGLE_BLOCK_BYTES // max(1, X.shape[1] * X.itemsize)
    return min(max(rows, 8), 512) // 4 * 4


def _mlp_block(sizes: np.ndarray) -> int:
    """Rows per MLP block so that the block's activations stay around 128 KiB."""
    return min(max(MLP_ROW_FLOATS // int(sizes[1:].sum()), 8), 512)


def _tiled(d: int, binary: bool) -> bool:
    """Whether one-output rows of d features run the register tiles (with AVX-512): rows of one
    or two registers (d <= 16), and, for the squared head, of four (29-32 features, at most 3 of
    their 32 lanes padding). The 4-feature panels in groups of 16 rows take the rest up to
    ``PANEL4_WIDTH``: at 17-28 features they waste less (d = 20: 10.7 against 15.7 ms, d = 24:
    10.1 against 13.0 for 256 MiB), and the logistic head's two groups' heads interleaved beat
    its eight-row register tiles at 29-32 (d = 32, 512 MiB: 0.82-0.86 of the read ceiling
    against 0.72-0.74)."""
    return d <= 16 or (not binary and TILE_WIDTH - 4 < d <= TILE_WIDTH)


def _panels(X: np.ndarray):
    """(feature-panel kernel, prefetch distance in rows) for one-output rows of X: up to
    ``PANEL4_WIDTH`` features panels of 4 features in groups of 16 rows (there the head is a
    large part of the work: two groups' heads run interleaved); wider rows panels of 8 features
    (AVX-512) or of 4 in groups of 8 rows (AVX2), read in memory order, one after the other.
    Rows up to ``PANEL_AHEAD_WIDTH`` features (AVX-512) or ``TILE_WIDTH`` (AVX2) take a
    software prefetch; wider ones run faster without it.

    At 33-40 features the 8-feature panels pay a whole panel for 1-8 features. Logistic, 256
    MiB of rows, timed in rotation: with AVX-512 the 16-row groups were faster in 15 of 18
    pairs (three runs of d = 33-37 and 40), by up to 40 %; on AVX2 code 0.73-0.84 of the read
    ceiling against 0.56-0.77 in 8-row groups; with the prefetch 5-25 % slower. At 48 features
    and more the wider panels win."""
    d = X.shape[1]
    if d > PANEL4_WIDTH:
        if USE_TILES:
            return _one_output_panels, 0
        return (_one_output_pipelined4 if PIPELINED else _one_output_panels4), 0
    prefetched = PANEL_AHEAD_WIDTH if USE_TILES else TILE_WIDTH
    ahead = max(16, TILE_AHEAD_BYTES // (d * X.itemsize)) if d <= prefetched else 0
    return _one_output_panels4x16, ahead


def _float32_rows(X: np.ndarray) -> bool:
    """One-output rows that ``train.products = "float32"`` runs with float32 products: float32
    rows wider than ``PANEL4_WIDTH``. Narrower rows keep the float64 tiles and panels, which
    are as fast or faster there (their per-row head is the larger part of the work; d = 32:
    10.2 against 11.0 ms for 256 MiB; d = 33-40: 0.69-0.82 of the read ceiling against
    0.49-0.80 in two runs)."""
    return X.dtype == np.float32 and X.shape[1] > PANEL4_WIDTH


def _gemm(sizes: np.ndarray) -> bool:
    """This MLP's layers run as GEMMs (see ``GEMM_MIN_WIDTH``)."""
    return sizes.size > 2 and int(sizes[1:-1].max()) >= GEMM_MIN_WIDTH


def _transposed(params: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """params with every W (in x out) stored as W^T (out x in); biases unchanged.

    One output layer (linear, logistic): W^T has the same layout as W, params is returned as is.
    """
    if sizes.size == 2 and sizes[1] == 1:
        return params
    pT = np.empty_like(params)
    p0 = 0
    for w_in, w_out in zip(sizes[:-1].tolist(), sizes[1:].tolist(), strict=True):
        nw = w_in * w_out
        pT[p0 : p0 + nw] = params[p0 : p0 + nw].reshape(w_in, w_out).T.ravel()
        pT[p0 + nw : p0 + nw + w_out] = params[p0 + nw : p0 + nw + w_out]
        p0 += nw + w_out
    return pT


PRODUCTS = {"float64": np.float64, "float32": np.float32}

# The kernels that have a twin on rows taken by index (``taken_rows``), and that twin.
_TAKEN = {
    _one_output_panels4: _taken_panels4,
    _one_output_pipelined4: _taken_panels4,
    _one_output_panels4x16: _taken_panels4x16,
}


def _read_only(a: np.ndarray) -> np.ndarray:
    """``a`` as a read-only array (a view of it when it is writable).

    The kernels only read their rows and targets, and rows mapped from a file (``data.stream``)
    are read-only. Numba compiles a kernel once per argument type, and read-only is part of
    the type. So passing every array read-only gives each kernel one compiled signature per
    dtype instead of two: the install's warm-up compiled the AVX2 panel kernels four times
    each, at about two minutes each."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def gradient(
    X, y, params, sizes, activation: int, head: int, out: np.ndarray, products: str = "float64"
) -> None:
    """out[:P] = sum of per-row loss gradients, out[P] = sum of losses, out[P+1] = n.

    ``products = "float32"`` lets the GEMM path of wide MLPs multiply in float32 (activations
    float32, each row block's sums added into float64), and one-output models on float32 rows
    wider than ``PANEL4_WIDTH`` run ``cpu_float32`` (float32 products, each row's and each 8-row
    group's sums in float32, everything across groups float64); every other path stays float64.
    """
    if not native.supported()[0]:
        reference.gradient(X, y, params, sizes, activation, head, out)
        return
    X, params, sizes = check_model(X, params, sizes, activation, head)
    P, n = params.size, X.shape[0]
    check_gradient_out(out, P)
    if n == 0:
        out[:] = 0.0
        return
    X, Y = _read_only(X), _read_only(targets(y, n, int(sizes[-1]), head))
    if _gemm(sizes):
        partial = cpu_gemm.gradient_partials(
            X, Y, params, sizes, activation, head, PRODUCTS[products]
        )
        cpu_gemm.combine(partial, out[: P + 1])
        out[P + 1] = n
        return
    pT = _transposed(params, sizes)
    one_output = sizes.size == 2 and sizes[1] == 1
    if products == "float32" and one_output and _float32_rows(X):
        n_chunks, rows = _plan(n, _single_block(X), P + 1)
        partial = one_output_float32(X, Y, pT, head == BINARY, rows, n_chunks)
    elif USE_TILES and one_output and _tiled(X.shape[1], head == BINARY):
        n_chunks, rows = _plan(n, _single_block(X), P + 1)
        ahead = max(1, TILE_AHEAD_BYTES // (X.shape[1] * X.itemsize))
        tiles = tiles_kernel(X.shape[1])
        partial = tiles(X, Y, pT, head == BINARY, ahead, rows, n_chunks)
    elif USE_PANELS and one_output:  # wider rows, or no AVX-512: feature panels
        n_chunks, rows = _plan(n, _single_block(X), P + 1)
        panels, ahead = _panels(X)
        partial = panels(X, Y, pT, head == BINARY, ahead, rows, n_chunks)
    elif sizes.size == 2:
        block = _single_block(X)
        n_chunks, rows = _plan(n, block, P + 1)
        partial = _single_layer_gradient(X, Y, pT, sizes, head, block, rows, n_chunks)
    else:
        block = _mlp_block(sizes)
        n_chunks, rows = _plan(n, block, P + 1)
        partial = _mlp_gradient(X, Y, pT, sizes, activation, head, block, rows, n_chunks)
    if partial.shape[1] <= _COMBINE_TILE:  # one tile: no thread pool for a few hundred adds
        _combine_columns(partial, out, 0, P + 1)
    else:
        _combine(partial, out[: P + 1])
    out[P + 1] = n


class TakenRows:
    """A rank's rows prepared once for ``gradient_rows`` (by ``taken_rows``): the rows ``X``
    and float64 targets ``Y`` (read-only), and what each step would otherwise work out again
    from them: the kernel (``cpu_tiles._taken_panels4`` or ``_taken_panels4x16``), the head
    and the rows per block of the chunk plan."""

    __slots__ = ("X", "Y", "binary", "block", "kernel", "n_params")

    def __init__(self, X: np.ndarray, y, head: int, kernel) -> None:
        self.X, self.Y = _read_only(X), _read_only(targets(y, X.shape[0], 1, head))
        self.binary = head == BINARY
        self.kernel = kernel
        self.block = _single_block(X)
        self.n_params = X.shape[1] + 1


def taken_rows(X, y, sizes, head: int, products: str = "float64") -> TakenRows | None:
    """The rows of X (targets y) prepared once for ``gradient_rows``, or None where a
    mini-batch of X is better copied and given to ``gradient``.

    The rows are read where they are by the one-output models whose rows run the 4-feature
    panels (every feature count on AVX2; with AVX-512 17-40 features, but the squared head's
    register tiles at 29-32), with float64 products: ``cpu_tiles._taken_panels4`` and
    ``_taken_panels4x16`` are those kernels on rows taken by index, with the same bits as on a
    copy of the rows. Other models (the register tiles, 8-feature panels, float32 products,
    MLPs, the reference kernels) keep the copy."""
    sizes = np.asarray(sizes)
    if not native.supported()[0] or not USE_PANELS or sizes.size != 2 or int(sizes[1]) != 1:
        return None
    if not isinstance(X, np.ndarray) or X.ndim != 2 or X.shape[1] != int(sizes[0]):
        return None
    if X.dtype not in (np.float32, np.float64) or not X.flags.c_contiguous:
        return None
    if products == "float32" and _float32_rows(X):
        return None
    d = X.shape[1]
    binary = head == BINARY
    copied = tiles_kernel(d) if USE_TILES and _tiled(d, binary) else _panels(X)[0]
    kernel = _TAKEN.get(copied)
    return None if kernel is None else TakenRows(X, y, head, kernel)


def gradient_rows(taken: TakenRows, rows, params, out) -> None:
    """``gradient`` of the rows ``X[rows]`` and targets ``Y[rows]`` of ``taken``
    (``taken_rows``), read where they are (rows: int32 or int64 positions in X, each in range):
    the same chunks, groups and arithmetic as ``gradient(X[rows], Y[rows], ...)``, the same
    bits."""
    P, n = taken.n_params, rows.size
    if params.size != P or params.dtype != np.float64 or not params.flags.c_contiguous:
        raise ValueError(f"params must be contiguous float64 of length {P}")
    check_gradient_out(out, P)
    if n == 0:
        out[:] = 0.0
        return
    n_chunks, chunk_rows = _plan(n, taken.block, P + 1)
    partial = taken.kernel(taken.X, taken.Y, rows, params, taken.binary, chunk_rows, n_chunks)
    if partial.shape[1] <= _COMBINE_TILE:  # as in ``gradient``
        _combine_columns(partial, out, 0, P + 1)
    else:
        _combine(partial, out[: P + 1])
    out[P + 1] = n


def _run_forward(X, Y, params, sizes, activation, head, out):
    """Shared driver of forward() and loss_sum(); returns the per-chunk losses.

    Always the loop nests, also for the MLPs whose gradient runs as GEMMs: they compute each
    row on its own, so a row's output has the same bits however the rows are split (between
    ranks, or into batches); a BLAS product's rows depend on the block's row count.
    """
    n = X.shape[0]
    block = _single_block(X) if sizes.size == 2 else _mlp_block(sizes)
    n_chunks, rows = _plan(n, block, 1)
    pT = _transposed(params, sizes)
    want_loss = out.shape[0] == 0
    return _mlp_forward(X, Y, pT, sizes, activation, head, want_loss, block, rows, n_chunks, out)


def forward(X, params, sizes, activation: int, head: int, out: np.ndarray) -> None:
    """out (n, k) float64 = model output: value, P(class 1), or class probabilities (float64
    products for every model: see ``_run_forward``)."""
    if not native.supported()[0]:
        reference.forward(X, params, sizes, activation, head, out)
        return
    X, params, sizes = check_model(X, params, sizes, activation, head)
    n, k = X.shape[0], int(sizes[-1])
    if out.shape != (n, k) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous float64 of shape ({n}, {k})")
    if n == 0:
        return
    X = _read_only(X)
    if USE_TILES and sizes.size == 2 and k == 1 and X.shape[1] <= TILE_WIDTH:
        n_chunks, rows = _plan(n, _single_block(X), 1)
        ahead = max(1, TILE_AHEAD_BYTES // (X.shape[1] * X.itemsize))
        _one_output_forward8(X, params, head == BINARY, ahead, rows, n_chunks, out.reshape(-1))
        return
    _run_forward(X, _read_only(np.empty((0, 1))), params, sizes, activation, head, out)


def loss_sum(X, y, params, sizes, activation: int, head: int) -> float:
    """Sum over rows of the loss (forward pass only; for line searches and finite differences)."""
    if not native.supported()[0]:
        return reference.loss_sum(X, y, params, sizes, activation, head)
    X, params, sizes = check_model(X, params, sizes, activation, head)
    n = X.shape[0]
    if n == 0:
        return 0.0
    Y = _read_only(targets(y, n, int(sizes[-1]), head))
    X = _read_only(X)
    losses = _run_forward(X, Y, params, sizes, activation, head, np.empty((0, int(sizes[-1]))))
    return float(losses.sum())
