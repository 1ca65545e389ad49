"""Host-side checks shared by the CPU backends: shapes, dtypes and codes of a kernel call."""

import numpy as np

from . import BINARY, RELU, SIGMOID, SOFTMAX, SQUARED, TANH, param_count

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def check_model(X, params, sizes, activation, head):
    """Validate shapes and codes; return contiguous X (float32/64), params, int64 sizes.

    Arrays that already have the right dtype and layout pass through without a copy (this runs
    once per training step, so it is kept to a few microseconds).
    """
    if not (isinstance(sizes, np.ndarray) and sizes.dtype == np.int64 and sizes.flags.c_contiguous):
        sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    if not isinstance(X, np.ndarray) or X.dtype not in _FLOATS or not X.flags.c_contiguous:
        X = np.asarray(X)
        X = np.ascontiguousarray(X if X.dtype in _FLOATS else X.astype(np.float64))
    if not (
        isinstance(params, np.ndarray) and params.dtype == np.float64 and params.flags.c_contiguous
    ):
        params = np.ascontiguousarray(params, dtype=np.float64)
    widths = sizes.tolist()
    if sizes.ndim != 1 or len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"sizes must be >= 2 positive widths, got {sizes}")
    if X.ndim != 2 or X.shape[1] != widths[0]:
        raise ValueError(f"X must be (n, {widths[0]}), got {X.shape}")
    if params.shape != (param_count(widths),):
        raise ValueError(f"params must have length {param_count(widths)}, got {params.shape}")
    if head not in (SQUARED, BINARY, SOFTMAX) or activation not in (SIGMOID, TANH, RELU):
        raise ValueError(f"unknown head {head} or activation {activation}")
    if head == BINARY and widths[-1] != 1:
        raise ValueError("the BINARY head needs one output")
    return X, params, sizes


def check_gradient_out(out, n_params: int) -> None:
    """``out`` must be the contract's contiguous float64 vector of length P + 2."""
    if out.shape != (n_params + 2,) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous float64 of length {n_params + 2}")


def targets(y, n: int, k: int, head: int) -> np.ndarray:
    """y as a C-contiguous float64 (n, k) array for SQUARED, (n, 1) for labels.

    Training reads targets as float64; other types (float32, integers) are converted here, so
    that the kernels have one compiled signature for targets (each of the AVX2 panel kernels
    takes about two minutes to compile)."""
    if not isinstance(y, np.ndarray):
        y = np.asarray(y)
    if y.dtype != np.float64:
        y = y.astype(np.float64)
    cols = k if head == SQUARED else 1
    if y.size != n * cols or (y.ndim == 2 and y.shape != (n, cols)) or y.ndim > 2:
        raise ValueError(f"y must have {n} rows of {cols} target(s), got shape {y.shape}")
    if not y.flags.c_contiguous:
        y = np.ascontiguousarray(y)
    return y.reshape(n, cols)
