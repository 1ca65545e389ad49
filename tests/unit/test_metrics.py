"""Metrics on one rank against scikit-learn on random arrays, by hand, and the exact sums."""

import math
import warnings

import numba
import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.exact import exact_sums
from lepton_hpc.metrics import (
    EPS,
    MetricSums,
    classification_metrics,
    from_confusion,
    predicted_labels,
    regression_metrics,
)

COMM = SerialComm()
# Our formulas and scikit-learn's order the float operations differently: equal to rounding.
SAME = {"rel": 1e-12, "abs": 1e-15}


def sklearn_scores(y, labels, k, average):
    with warnings.catch_warnings():  # zero division: scikit-learn warns and scores 0.0
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        kw = {"average": average, "labels": list(range(k))} if average == "macro" else {}
        return {
            "accuracy": skm.accuracy_score(y, labels),
            "precision": skm.precision_score(y, labels, **kw),
            "recall": skm.recall_score(y, labels, **kw),
            "f1": skm.f1_score(y, labels, **kw),
        }


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=501).astype(np.float64)
    p = np.clip(0.6 * y + 0.4 * rng.random(501) - 0.1, 0.0, 1.0)[:, None]
    m = classification_metrics(y, p, "binary", 2, COMM)
    labels = predicted_labels(p, "binary")
    for key, value in sklearn_scores(y, labels, 2, "binary").items():
        assert m[key] == pytest.approx(value, **SAME), key
    assert m["confusion"] == skm.confusion_matrix(y, labels).tolist()
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, np.c_[1 - p, p]), rel=1e-12)
    assert m["rows"] == 501


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("absent", ["never-predicted", "never-true", "none"])
def test_four_class_macro_metrics_equal_scikit_learn(absent):
    rng = np.random.default_rng(7)
    n, k = 400, 4
    y = rng.integers(0, k, size=n)
    z = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y]
    if absent == "never-predicted":
        z[:, 3] = -50.0  # class 3 is true for ~100 rows but never predicted: precision 0/0
    elif absent == "never-true":
        y = np.where(y == 2, 1, y)  # class 2 never true (recall 0/0), still sometimes predicted
    out = softmax(z)
    labels = predicted_labels(out, "softmax")
    if absent == "never-predicted":
        assert 3 not in labels and 3 in y
    if absent == "never-true":
        assert 2 in labels and 2 not in y
    m = classification_metrics(y.astype(np.float64), out, "softmax", k, COMM)
    for key, value in sklearn_scores(y, labels, k, "macro").items():
        assert m[key] == pytest.approx(value, **SAME), key
    assert m["confusion"] == skm.confusion_matrix(y, labels, labels=range(k)).tolist()
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, out, labels=range(k)), rel=1e-12)


def test_from_confusion_by_hand():
    # binary: the scores of class 1; tp = 30, fp = 10, fn = 20, tn = 40
    m = from_confusion(np.array([[40, 10], [20, 30]]))
    assert m["accuracy"] == 0.7
    assert m["precision"] == 0.75 and m["recall"] == 0.6
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35, **SAME)
    # three classes, macro: precisions 5/6, 3/4 and 0/0 -> 0 (class 2 never predicted)
    cm = np.array([[5, 1, 0], [1, 3, 0], [0, 0, 0]])
    m = from_confusion(cm)
    assert m["accuracy"] == 0.8
    assert m["precision"] == pytest.approx((5 / 6 + 3 / 4 + 0) / 3, **SAME)
    # recalls 5/6, 3/4 and 0/0 -> 0 (class 2 never true)
    assert m["recall"] == pytest.approx((5 / 6 + 3 / 4) / 3, **SAME)
    f1 = [2 * (5 / 6) * (5 / 6) / (5 / 3), 2 * 0.75 * 0.75 / 1.5, 0.0]
    assert m["f1"] == pytest.approx(sum(f1) / 3, **SAME)
    # nothing at all: zeros, not NaN
    assert from_confusion(np.zeros((2, 2), dtype=np.int64)) == {
        "accuracy": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
    }


def test_regression_metrics_equal_scikit_learn():
    rng = np.random.default_rng(3)
    y = rng.normal(3.0, 2.0, size=777)
    out = (y + rng.normal(0, 0.5, size=777))[:, None]
    m = regression_metrics(y, out, COMM)
    assert m["mse"] == pytest.approx(skm.mean_squared_error(y, out[:, 0]), **SAME)
    assert m["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, out[:, 0])), **SAME)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, out[:, 0]), **SAME)
    assert m["r2"] == pytest.approx(skm.r2_score(y, out[:, 0]), **SAME)
    assert m["rows"] == 777
    # two outputs: MSE over all cells; R² pooled over outputs (scikit-learn's variance_weighted)
    Y = np.c_[y, 2 * y + 1]
    out2 = Y + rng.normal(0, 0.3, size=Y.shape)
    m = regression_metrics(Y, out2, COMM)
    assert m["mse"] == pytest.approx(skm.mean_squared_error(Y, out2), **SAME)
    assert m["r2"] == pytest.approx(skm.r2_score(Y, out2, multioutput="variance_weighted"), **SAME)


# ---- exact sums ----------------------------------------------------------------------------
def awkward(rng, n):
    """Values over the whole float64 range, cancelling, with subnormals and signed zeros."""
    x = rng.normal(size=n) * 10.0 ** rng.integers(-300, 300, size=n)
    return np.r_[x, -x[: n // 3], 5e-324, 1e-310, -0.0, 1e308, -1e308, 0.1, 0.2, 0.3]


@pytest.mark.parametrize("seed", range(20))
def test_exact_sums_are_correctly_rounded_whatever_the_order(seed):
    rng = np.random.default_rng(seed)
    x = awkward(rng, int(rng.integers(1, 3000)))
    want = math.fsum(x)
    got = exact_sums([x, x[::-1].copy(), rng.permutation(x), x.reshape(-1, 1)], COMM)
    assert got.tolist() == [want] * 4


class OtherRanks(SerialComm):
    """A communicator whose allreduce adds the bins the other ranks would contribute."""

    def __init__(self, others):
        self.others = others

    def allreduce_(self, buf):
        buf += self.others
        return buf


class Recorder(SerialComm):
    def allreduce_(self, buf):
        self.bins = buf.copy()
        return buf


def test_exact_sums_do_not_depend_on_the_split_of_rows():
    rng = np.random.default_rng(11)
    x = awkward(rng, 5000)
    for cuts in ([1], [1000, 1001], [17, 2000, 4999]):
        parts = np.split(x, cuts)
        others = 0
        for part in parts[1:]:
            rec = Recorder()
            exact_sums([part], rec)
            others = others + rec.bins
        assert exact_sums([parts[0]], OtherRanks(others))[0] == math.fsum(x)
    assert exact_sums([np.zeros(0)], COMM)[0] == 0.0


def test_exact_sums_of_non_finite_values():
    nan, inf = float("nan"), float("inf")
    got = exact_sums(
        [np.array([1.0, nan]), np.array([inf, 1.0]), np.array([-inf, 2.0]), np.array([inf, -inf])],
        COMM,
    )
    assert math.isnan(got[0]) and got[1] == inf and got[2] == -inf and math.isnan(got[3])
    assert exact_sums([np.array([1e308, 1e308])], COMM)[0] == inf  # overflow of the total


def _numpy_sums(y, out, head, k):
    """The NumPy expressions the metric kernels replace: counts and per-row terms."""
    labels = y.astype(np.int64)
    if head == "binary":
        p = np.clip(out[:, 0], EPS, 1 - EPS)
        terms = -(labels * np.log(p) + (1 - labels) * np.log1p(-p))
    else:
        terms = -np.log(np.clip(out[np.arange(labels.size), labels], EPS, None))
    cm = np.bincount(labels * k + predicted_labels(out, head), minlength=k * k)
    return cm, terms


@pytest.mark.parametrize(("head", "k"), [("binary", 2), ("softmax", 4)])
def test_metric_kernels_equal_numpy_for_any_threads_and_pieces(head, k):
    """Counts exactly, log-loss terms to the fast log's 1e-14; every thread count and split of
    the rows gives the same bits (integer bins); edge probabilities 0, 1, 0.5, tiny."""
    rng = np.random.default_rng(7)
    n = 30_011
    y = rng.integers(0, k, n).astype(np.float64)
    if head == "binary":
        out = rng.random((n, 1)) ** rng.choice([1.0, 8.0, 0.125], (n, 1))
        out[:6, 0] = [0.0, 1.0, 0.5, 1e-300, 1 - 1e-17, 0.29]
    else:
        out = softmax(rng.normal(size=(n, k)) * 4)
        out[:3] = [[1, 0, 0, 0], [0, 0, 0, 1], [0.25] * 4]  # a zero probability, a tie
    cm, terms = _numpy_sums(y, out, head, k)
    results = []
    for threads, piece in ((1, n), (2, n), (2, 4099), (1, 977)):
        numba.set_num_threads(threads)
        sums = MetricSums(head, k)
        for a in range(0, n, piece):
            sums.add(y[a : a + piece], out[a : a + piece])
        results.append((sums.cm.tolist(), sums.sums.bins.tobytes()))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert all(r == results[0] for r in results)
    assert results[0][0] == cm.tolist()
    got = MetricSums(head, k)
    got.add(y, out)
    per_row = MetricSums(head, k)
    for i in range(50):  # each term alone against NumPy's
        per_row.sums.bins[:] = 0
        per_row.add(y[i : i + 1], out[i : i + 1])
        assert per_row.sums.total(COMM)[0] == pytest.approx(terms[i], rel=1e-14, abs=1e-300)
    assert got.sums.total(COMM)[0] == pytest.approx(exact_sums([terms], COMM)[0], rel=1e-14)
    out[5, int(y[5]) if head == "softmax" else 0] = np.nan  # the loss is NaN, as in NumPy
    nan = MetricSums(head, k)
    nan.add(y, out)
    assert math.isnan(nan.sums.total(COMM)[0])


def test_regression_kernel_sums_are_numpy_bitwise():
    rng = np.random.default_rng(8)
    y, out = rng.normal(size=(10_007, 2)), rng.normal(size=(10_007, 2))
    mean = y.mean(axis=0)
    sums = MetricSums("squared", 0, mean)
    for a in range(0, 10_007, 3001):
        sums.add(y[a : a + 3001], out[a : a + 3001])
    err = out - y
    want = exact_sums([err * err, np.abs(err), (y - mean) ** 2], COMM)
    assert np.array_equal(sums.sums.total(COMM), want)
