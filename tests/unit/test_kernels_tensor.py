"""The tensor-parallel MLP slices (``kernels.tensor``): k simulated ranks (threads whose
``allreduce`` sums in rank order) give the float64 reference's gradient and loss, the slices
cover the full vector, and the gradient agrees with finite differences of the loss."""

import itertools
import threading

import numpy as np
import pytest
from lepton_hpc.kernels import BINARY, RELU, SIGMOID, SOFTMAX, SQUARED, TANH, reference, tensor

from tests.unit.test_kernels_reference import problem as reference_problem


class Group:
    """``allreduce`` for k threads standing in for the ranks of a tensor group."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.barrier = threading.Barrier(k)
        self.slots: list = [None] * k

    def allreduce(self, t: int):
        def reduce_(buf: np.ndarray) -> np.ndarray:
            self.slots[t] = buf.copy()
            self.barrier.wait()
            total = np.zeros_like(buf)
            for part in self.slots:  # rank order: the same sum on every rank
                total += part
            self.barrier.wait()
            buf[...] = total
            return buf

        return reduce_


def sliced(X, y, params, sizes, act, head, k, flags=None):
    """Each of k ranks' gradient slice (with loss and rows), and the agreed flags."""
    plans = [tensor.make_plan(sizes, k, t) for t in range(k)]
    outs = [np.empty(p.n_local + 2) for p in plans]
    agreed = [None] * k

    def body(t: int, allreduce) -> None:
        p = plans[t]
        flag = 0.0 if flags is None else flags[t]
        agreed[t] = tensor.sliced_gradient(
            X, y, params[p.own], p, act, head, outs[t], allreduce, flag
        )

    run_group(k, body)
    return plans, outs, agreed


def run_group(k: int, body) -> None:
    """``body(t, allreduce)`` on k threads standing in for a tensor group's ranks."""
    group, errors = Group(k), []

    def run(t: int) -> None:
        try:
            body(t, group.allreduce(t))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(k)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def problem(sizes, head, n, dtype=np.float64, seed=0):
    """``test_kernels_reference.problem`` without its sizes."""
    X, y, params, _ = reference_problem(sizes, head, n, dtype, seed)
    return X, y, params


CASES = [  # (sizes, head, activation, k): one to three pairs, odd and even layer counts
    ((5, 8, 1), BINARY, TANH, 2),
    ((5, 8, 6, 1), BINARY, RELU, 2),
    ((4, 8, 6, 12, 3), SOFTMAX, SIGMOID, 2),
    ((4, 12, 3, 8, 2), SQUARED, TANH, 4),
    ((6, 12, 5, 4, 7, 2, 4), SOFTMAX, RELU, 2),
    ((3, 6, 2), SQUARED, SIGMOID, 3),
    ((3, 6, 2), SQUARED, SIGMOID, 1),
]


@pytest.mark.parametrize(("sizes", "head", "act", "k"), CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_slices_sum_to_the_reference_gradient(sizes, head, act, k, dtype):
    X, y, params = problem(sizes, head, 37, dtype)
    want = np.empty(params.size + 2)
    reference.gradient(X, y, params, np.array(sizes), act, head, want)
    plans, outs, _ = sliced(X, y, params, sizes, act, head, k)
    got = np.full(params.size, np.nan)
    for p, out in zip(plans, outs, strict=True):
        n = p.n_local
        seen = got[p.own]
        same = np.isnan(seen) | (seen == out[:n])  # replicated entries: the same on every rank
        assert same.all()
        got[p.own] = out[:n]
        assert out[n] == pytest.approx(want[-2], rel=1e-12)
        assert out[n + 1] == X.shape[0]
    assert not np.isnan(got).any()  # the slices cover every parameter
    scale = np.max(np.abs(want[:-2]))
    assert np.max(np.abs(got - want[:-2])) <= 1e-12 * scale


@pytest.mark.parametrize("k", [1, 2, 4])
def test_plan_partitions_the_split_layers(k):
    sizes = (5, 8, 4, 8, 3)
    plans = [tensor.make_plan(sizes, k, t) for t in range(k)]
    P = sum(a * b + b for a, b in itertools.pairwise(sizes))
    counts = np.zeros(P, dtype=np.int64)
    for p in plans:
        assert np.unique(p.own).size == p.own.size
        counts[p.own] += 1
    # weights and column biases of both pairs are split; row-parallel biases are replicated
    replicated = np.zeros(P, dtype=bool)
    replicated[5 * 8 + 8 + 8 * 4 : 5 * 8 + 8 + 8 * 4 + 4] = True  # layer 1's bias
    replicated[P - 3 :] = True  # layer 3's bias
    assert (counts[replicated] == k).all()
    assert (counts[~replicated] == 1).all()
    assert tensor.split_widths(sizes) == [8, 8]
    with pytest.raises(ValueError, match="divisible"):
        tensor.make_plan((5, 6, 3), 4, 0)


def test_flag_is_agreed_and_empty_batches_work():
    sizes = (3, 4, 2)
    X, y, params = problem(sizes, SQUARED, 0)
    _, outs, agreed = sliced(X, y, params, sizes, RELU, SQUARED, 2, flags=[0.0, 1.0])
    assert agreed == [1.0, 1.0]
    for out in outs:
        assert not out.any()


@pytest.mark.parametrize(("sizes", "head", "act", "k"), CASES[:5])
def test_gradient_matches_finite_differences(sizes, head, act, k):
    X, y, params = problem(sizes, head, 11, seed=3)
    plans, outs, _ = sliced(X, y, params, sizes, act, head, k)
    got = np.zeros(params.size)
    for p, out in zip(plans, outs, strict=True):
        got[p.own] = out[: p.n_local]

    def loss(w):
        _, o, _ = sliced(X, y, w, sizes, act, head, k)
        return o[0][plans[0].n_local]

    rng = np.random.default_rng(1)
    for i in rng.choice(params.size, size=min(12, params.size), replace=False):
        h = 1e-6
        up, down = params.copy(), params.copy()
        up[i] += h
        down[i] -= h
        fd = (loss(up) - loss(down)) / (2 * h)
        assert got[i] == pytest.approx(fd, rel=1e-5, abs=1e-6)
