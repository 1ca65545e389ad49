"""kernels.native.simd: masked loads and stores, the reductions, and the 4-lane head against the scalar
head of the CPU kernels (which fastmath's tests check against NumPy)."""

import numpy as np
import pytest
from lepton_hpc.kernels import BINARY, SQUARED, cpu
from lepton_hpc.kernels.native import simd
from lepton_hpc.kernels.native.heads import head_lanes
from numba import njit


@njit
def _load_both(a, off, count):
    return simd.unpack4(simd.load4(a, off, count)), simd.hsum(simd.load8(a, off, count))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_loads_read_only_count_lanes(dtype):
    a = (np.arange(1, 17) * 1.5).astype(dtype)
    for off in (0, 3, 8):
        for count in (-3, 0, 1, 3, 4, 5, 8):
            four, total = _load_both(a, off, count)
            want = np.zeros(8)
            k = max(0, min(count, 8, a.size - off))
            want[:k] = a[off : off + k]
            np.testing.assert_array_equal(four, want[:4])
            assert total == want.sum()


def test_masked_load_touches_nothing_past_the_end():
    """A count of 0 at the end of a 1-element array reads nothing (no fault, no garbage)."""
    a = np.ones(1)
    assert _load_both(a, 1, 0) == ((0.0, 0.0, 0.0, 0.0), 0.0)


@njit
def _store(row, off, count, a):
    simd.store8(row, off, count, simd.load8(a, 0, 8))


def test_masked_store_writes_only_count_lanes():
    a = np.arange(1.0, 9.0)
    for count in (-1, 0, 3, 8):
        row = np.full(12, -7.0)
        _store(row, 2, count, a)
        want = np.full(12, -7.0)
        k = max(0, count)
        want[2 : 2 + k] = a[:k]
        np.testing.assert_array_equal(row, want)


@njit
def _reduce(a):
    v0, v1 = simd.load8(a, 0, 8), simd.load8(a, 8, 8)
    v2, v3 = simd.load8(a, 16, 8), simd.load8(a, 24, 8)
    four = simd.hsum4(v0, v1, v2, v3)
    lane = simd.hsum(simd.lane8(four, 2))
    product = simd.hsum(simd.fma(v0, v1, v2) + v3 * v0 - v1)
    return simd.unpack4(four), lane, product


def test_reductions_and_arithmetic():
    a = np.random.default_rng(3).standard_normal(32)
    four, lane, product = _reduce(a)
    rows = a.reshape(4, 8)
    np.testing.assert_allclose(four, rows.sum(axis=1), rtol=1e-15, atol=1e-15)
    assert lane == 8 * four[2]
    want = (rows[0] * rows[1] + rows[2] + rows[3] * rows[0] - rows[1]).sum()
    assert abs(product - want) < 1e-13


@njit
def _reduce8(a, out):
    sums = simd.hsum8(
        simd.load8(a, 0, 8),
        simd.load8(a, 8, 8),
        simd.load8(a, 16, 8),
        simd.load8(a, 24, 8),
        simd.load8(a, 32, 8),
        simd.load8(a, 40, 8),
        simd.load8(a, 48, 8),
        simd.load8(a, 56, 8),
    )
    simd.store8(out, 0, 8, sums)
    simd.store8(out, 8, 8, simd.splat8(2.5))


def test_hsum8_lane_k_is_the_sum_of_vector_k():
    a = np.random.default_rng(4).standard_normal(64)
    out = np.zeros(16)
    _reduce8(a, out)
    np.testing.assert_allclose(out[:8], a.reshape(8, 8).sum(axis=1), rtol=1e-15, atol=1e-15)
    np.testing.assert_array_equal(out[8:], 2.5)


@njit
def _head_lanes(z, y, count, binary):
    out_q, out_l = np.zeros(z.size), np.zeros(z.size)
    for i in range(0, z.size, 4):
        zz, yy = simd.load4(z, i, 4), simd.load4(y, i, 4)
        if binary:
            q, loss = head_lanes(zz, yy, count, True)
        else:
            q, loss = head_lanes(zz, yy, count, False)
        out_q[i : i + 4] = np.array(simd.unpack4(q))
        out_l[i : i + 4] = np.array(simd.unpack4(loss))
    return out_q, out_l


@njit
def _head_lanes8(z, y, count, binary):
    out_q, out_l = np.zeros(z.size), np.zeros(z.size)
    for i in range(0, z.size, 8):
        zz, yy = simd.load8(z, i, 8), simd.load8(y, i, 8)
        if binary:
            q, loss = head_lanes(zz, yy, count, True)
        else:
            q, loss = head_lanes(zz, yy, count, False)
        simd.store8(out_q, i, 8, q)
        simd.store8(out_l, i, 8, loss)
    return out_q, out_l


@njit
def _scalar_head_rows(z, y, head):
    """_head_loss row by row: per-row losses, and z turned into d loss / d z."""
    losses = np.empty(z.size)
    Y = y.reshape(-1, 1)
    for i in range(z.size):
        losses[i] = cpu._head_loss(z[i : i + 1], 1, 1, Y, i, head)
    return losses


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("lanes", [4, 8])
@pytest.mark.parametrize("head", [SQUARED, BINARY])
def test_head_matches_scalar_head(head, lanes):
    rng = np.random.default_rng(7)
    z = np.concatenate(
        [
            np.linspace(-760.0, 760.0, 40_000),
            np.geomspace(1e-12, 40.0, 4_000),
            -np.geomspace(1e-12, 40.0, 4_000),
            [0.0, -0.0, np.nan, np.inf, -np.inf, 1e300, -1e300, 5e-324],
        ]
    )
    z = np.concatenate([z, np.zeros(-z.size % 8)])
    y = (rng.random(z.size) < 0.5).astype(np.float64)
    q, losses = (_head_lanes8 if lanes == 8 else _head_lanes)(z, y, lanes, head == BINARY)
    q_ref = z.copy()
    loss_ref = _scalar_head_rows(q_ref, y, head)
    finite = np.isfinite(loss_ref)
    np.testing.assert_array_equal(np.isfinite(losses), finite)
    np.testing.assert_array_equal(np.isnan(q), np.isnan(q_ref))
    scale = np.maximum(np.abs(loss_ref[finite]), 1e-300)
    assert np.max(np.abs(losses[finite] - loss_ref[finite]) / scale) < 1e-14
    # d loss / d z = sigmoid(z) - y cancels when both are near 1: compare on the scale of the
    # terms (1 for the binary head; |z| + |y| for squared error, where it is exact anyway).
    ok = np.isfinite(q_ref)
    terms = np.ones(z.size) if head == BINARY else np.abs(z) + np.abs(y)
    assert np.max(np.abs(q[ok] - q_ref[ok]) / np.maximum(terms[ok], 1e-300)) < 1e-15


@pytest.mark.parametrize("count", [-1, 0, 1, 2, 3, 5, 7])
def test_head_zeroes_lanes_past_count(count):
    z = np.array([0.3, -2.0, 5.0, 40.0, -0.7, 3.0, -9.0, 1.5])
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    for binary in (True, False):
        if count < 4:
            q, losses = _head_lanes(z[:4], y[:4], count, binary)
            k = max(0, count)
            assert np.all(q[k:] == 0.0) and np.all(losses[k:] == 0.0)
            assert np.all(q[:k] != 0.0) and np.all(losses[:k] > 0.0)
        q, losses = _head_lanes8(z, y, count, binary)
        k = max(0, count)
        assert np.all(q[k:] == 0.0) and np.all(losses[k:] == 0.0)
        assert np.all(q[:k] != 0.0) and np.all(losses[:k] > 0.0)
