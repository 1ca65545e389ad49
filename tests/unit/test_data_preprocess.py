"""Scalers: statistics merged across (simulated) ranks equal the whole-data float64 ones."""

import numpy as np
import pytest

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.data.preprocess import fit_scaler, local_moments, merge_moments
from lepton_hpc.data.reader import row_block


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_merged_moments_equal_whole_data(size):
    rng = np.random.default_rng(1)
    X = rng.normal(1000.0, 3.0, size=(1001, 4)).astype(np.float32)
    parts = [local_moments(X[slice(*row_block(len(X), r, size))]) for r in range(size)]
    n, mean, m2 = merge_moments(parts)
    X64 = X.astype(np.float64)
    assert n == len(X)
    assert np.allclose(mean, X64.mean(axis=0), rtol=1e-13)
    assert np.allclose(m2 / n, X64.var(axis=0), rtol=1e-10)


def test_zscore_and_minmax_apply():
    rng = np.random.default_rng(2)
    X = rng.normal(5, 2, size=(200, 3))
    X[:, 2] = 7.0  # a constant feature must not divide by zero
    z = fit_scaler("zscore", X, SerialComm())
    Z = z.apply(X)
    assert np.allclose(Z[:, :2].mean(axis=0), 0, atol=1e-12)
    assert np.allclose(Z[:, :2].std(axis=0), 1, atol=1e-12)
    assert np.all(Z[:, 2] == 0)
    m = fit_scaler("minmax", X, SerialComm()).apply(X)
    assert np.allclose(m[:, :2].min(axis=0), 0) and np.allclose(m[:, :2].max(axis=0), 1)
    X32 = X.astype(np.float32)
    assert z.apply(X32).dtype == np.float32
    assert fit_scaler("none", X, SerialComm()).apply(X) is X
