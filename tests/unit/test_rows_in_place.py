"""Mini-batches whose rows the gradient reads where they are (``Device.taken_gather``): training
takes them where a kernel can, and they train the very model that copied batches train."""

from __future__ import annotations

import numpy as np
import pytest
from lepton_hpc.kernels import BINARY, cpu

from lepton_hpc.api import estimators as est
from lepton_hpc.training.strategies import FusedReduction


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [5, 32, 40])
def test_batches_read_in_place_train_the_model_of_copied_batches(monkeypatch, dtype, d):
    if cpu.taken_rows(np.zeros((2, d), dtype), np.zeros(2), np.array([d, 1]), BINARY) is None:
        pytest.skip("no kernel reads these rows in place on this CPU (register tiles)")
    rng = np.random.default_rng(d)
    X = rng.standard_normal((1_999, d)).astype(dtype)
    y = (X[:, 0] - X[:, 1] + 0.5 * rng.standard_normal(1_999) > 0).astype(np.float64)
    calls: list[int] = []
    real = cpu.gradient_rows

    def counted(taken, rows, *rest):
        calls.append(rows.size)
        real(taken, rows, *rest)

    monkeypatch.setattr(cpu, "gradient_rows", counted)

    def fit():
        model = est.LogisticRegression(
            optimizer="adam", lr=0.05, epochs=3, batch_size=64, validation_fraction=0.2
        )
        return model.fit(X, y)

    in_place = fit()
    steps = len(calls)
    assert steps == 3 * -(-1_600 // 64) and max(calls) == 64  # every step of 1,600 rows
    monkeypatch.setattr(FusedReduction, "in_place", False)  # the batches copied
    copied = fit()
    assert len(calls) == steps  # no more calls: the copied batches took ``gradient``
    assert np.array_equal(in_place.coef_, copied.coef_)
    assert np.array_equal(in_place.intercept_, copied.intercept_)
