"""Piecewise statistics, scaling and the in-place validation split give the very bits of the
whole-block formulas they replace (which built float64 copies of the whole block), and the
statistics stay exact against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_hpc.data.dataset import compact_rows, gather_rows, held_out, validation_mask
from lepton_hpc.data.preprocess import (
    Scaler,
    block_moments,
    local_moments,
    sum_squared_deviations,
)
from lepton_hpc.data.reader import Block, aligned_empty


def whole_moments(X: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """The former whole-block formulas."""
    mean = X.mean(axis=0, dtype=np.float64)
    return X.shape[0], mean, ((X - mean) ** 2).sum(axis=0, dtype=np.float64)


def whole_apply(s: Scaler, X: np.ndarray) -> np.ndarray:
    out = np.empty(X.shape, X.dtype)
    out[...] = (X - s.shift) / s.scale
    return out


@st.composite
def blocks(draw):
    """Rows with features of very different offsets and spreads (rounding errors show)."""
    n = draw(st.integers(1, 700))
    d = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 4, d)
    X = rng.normal(rng.uniform(-1e4, 1e4, d), scale, (n, d)).astype(dtype)
    return X, draw(st.integers(1, 64))


@settings(max_examples=150, deadline=None)
@given(blocks())
def test_piecewise_moments_are_the_whole_block_bits(case):
    X, step = case
    n, mean, m2 = local_moments(X, step)
    n0, mean0, m20 = whole_moments(X)
    assert n == n0
    assert mean.tobytes() == mean0.tobytes()
    assert m2.tobytes() == m20.tobytes()
    assert sum_squared_deviations(X, mean0, step).tobytes() == m20.tobytes()


@settings(max_examples=100, deadline=None)
@given(blocks(), st.sampled_from(["zscore", "minmax"]))
def test_piecewise_apply_is_the_whole_block_bits(case, kind):
    X, _ = case
    d = X.shape[1]
    rng = np.random.default_rng(X.shape[0])
    s = Scaler(kind, rng.normal(0, 1e3, d), 10.0 ** rng.uniform(-2, 3, d))
    want = whole_apply(s, X)
    original = X.copy()
    copied = s.apply(X)
    assert copied.dtype == X.dtype and copied.tobytes() == want.tobytes()
    assert X.tobytes() == original.tobytes()  # apply leaves the caller's array alone
    inplace = s.apply_(X)
    assert inplace is X and X.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pieces_span_many_cache_pieces(dtype, monkeypatch):
    """The production piece size, forced small, over many pieces; against float64 numbers."""
    import lepton_hpc.data.preprocess as pre

    monkeypatch.setattr(pre, "PIECE_BYTES", 8 * 5 * 7)  # 7 rows of 5 features per piece
    rng = np.random.default_rng(5)
    X = rng.normal(3e3, 0.5, (1000, 5)).astype(dtype)
    n, mean, m2 = local_moments(X)
    _, mean0, m20 = whole_moments(X)
    assert mean.tobytes() == mean0.tobytes() and m2.tobytes() == m20.tobytes()
    X64 = X.astype(np.float64)
    assert np.allclose(m2 / n, X64.var(axis=0), rtol=1e-9)
    s = Scaler("zscore", mean, np.sqrt(m2 / n))
    want = whole_apply(s, X)
    assert s.apply(X).tobytes() == want.tobytes()
    assert np.allclose(s.apply_(X), (X64 - X64.mean(axis=0)) / X64.std(axis=0), atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(blocks(), st.integers(0, 2**32 - 1))
def test_block_moments_pieces(case, seed):
    X, _ = case
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.integers(0, 5, X.shape[0]))
    got = block_moments(X, ids)
    cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    bounds = zip(np.r_[0, cuts], np.r_[cuts, X.shape[0]], strict=True)
    want = [whole_moments(X[a:b]) for a, b in bounds]
    assert len(got) == len(want)
    for (n, m, q), (n0, m0, q0) in zip(got, want, strict=True):
        assert n == n0 and m.tobytes() == m0.tobytes() and q.tobytes() == q0.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 3000),
    st.integers(1, 9),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31),
    st.booleans(),
)
def test_split_in_place_is_the_former_copies(n, d, fraction, seed, two_d_y):
    rng = np.random.default_rng(seed)
    X = aligned_empty((n, d), np.float32)
    X[...] = rng.normal(size=(n, d))
    y = rng.normal(size=(n, 2) if two_d_y else n)
    start = int(rng.integers(0, 10**6))

    class Cfg:
        validation_fraction = fraction
        folds = 0
        fold = 0

    block = Block(X=X, y=y, start=start, info=None)  # type: ignore[arg-type]
    hold = held_out(block, Cfg, seed)
    rows = np.arange(start, start + n, dtype=np.int64)
    assert np.array_equal(hold, validation_mask(rows, fraction, seed))
    want_X, want_y = X[~hold].copy(), y[~hold].copy()
    held = gather_rows(X, hold)
    assert held.tobytes() == X[hold].tobytes()
    assert held.size == 0 or held.ctypes.data % 64 == 0
    got_X, got_y = compact_rows(X, ~hold), compact_rows(y, ~hold)
    assert got_X.tobytes() == want_X.tobytes() and got_y.tobytes() == want_y.tobytes()
    assert got_X.flags.c_contiguous and got_X.ctypes.data == X.ctypes.data
