"""The step context against a float64 NumPy reference: the fused buffer's layout, its stop and
step slots, the one "gradient / rows + L2" formula, and one sync gradient with the real kernels
on simulated ranks."""

import numpy as np
import pytest

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.training.step import (
    StepOutcome,
    Timers,
    check_step,
    fused_buffer,
    kernel_part,
)
from tests.unit.training_fakes import (
    context,
    data,
    reference_gradient,
    reference_sums,
    run_ranks,
    with_reduction,
)


def test_buffer_layout_payload_then_loss_rows_stop_step():
    buf = fused_buffer(5)
    assert buf.shape == (9,) and not buf.any()
    part = kernel_part(buf)
    assert part.size == 7 and np.shares_memory(part, buf) and part.flags.c_contiguous


def test_mark_fills_the_stop_and_step_slots():
    buf = fused_buffer(5)
    context(SerialComm()).mark(buf, 12)
    assert buf[-2:].tolist() == [0.0, 12.0]
    context(SerialComm(), stop=True, hooks="skew=0@12").mark(buf, 12)
    assert buf[-2:].tolist() == [1.0, 13.0]  # the skew hook reports a wrong step
    assert not buf[:-2].any()


def test_outcome_reads_the_tail_and_checks_the_step():
    ctx = context(SerialComm())
    buf = fused_buffer(5)
    buf[-4:] = [2.5, 10.0, 1.0, 7.0]
    out = ctx.outcome(buf, 7)
    assert (out.loss_sum, out.rows, out.stop) == (2.5, 10.0, True)
    assert type(out.loss_sum) is float and type(out.rows) is float
    with pytest.raises(RuntimeError, match="out of step: step 8 here"):
        ctx.outcome(buf, 8)


def test_mean_gradient_divides_by_rows_and_adds_l2_to_weights_only():
    params = np.array([1.0, -2.0, 3.0, 0.5, 4.0])
    sums = np.array([2.0, 4.0, 6.0, 8.0, 10.0])
    assert np.array_equal(context(SerialComm()).mean_gradient(sums, 2.0, params), sums / 2)
    ctx = context(SerialComm(), l2=0.1)
    want = sums / 2 + 0.1 * np.r_[params[:-1], 0.0]
    assert np.array_equal(ctx.mean_gradient(sums, 2.0, params), want)
    assert np.array_equal(context(SerialComm()).mean_gradient(sums, 0.0, params), sums)  # no rows


def test_gradient_on_one_rank_is_the_numpy_gradient():
    X, y = data()
    params = np.array([0.3, -0.1, 0.2, 0.0, 0.5])
    ctx = with_reduction(context(SerialComm(), l2=0.01))
    grad, out = ctx.gradient(params, X, y, 0)
    assert np.allclose(grad, reference_gradient(X, y, params, 0.01), rtol=1e-12, atol=1e-12)
    assert out.rows == len(X) and not out.stop
    assert np.isclose(out.loss_sum, reference_sums(X, y, params)[1], rtol=1e-12)
    assert set(ctx.timers.seconds) == {"compute", "comm"}


@pytest.mark.parametrize("size", [2, 3])
def test_gradient_over_simulated_ranks_is_the_full_batch_gradient(size):
    X, y = data(61)
    params = np.array([0.3, -0.1, 0.2, 0.0, 0.5])
    parts = np.array_split(np.arange(len(X)), size)

    def rank(comm):
        mine = parts[comm.rank]
        ctx = with_reduction(context(comm, l2=0.05, stop=comm.rank == size - 1))
        return ctx.gradient(params, X[mine], y[mine], 4)

    results = run_ranks(size, rank)
    want = reference_gradient(X, y, params, 0.05)
    for grad, out in results:
        assert grad.tobytes() == results[0][0].tobytes()  # every rank holds the same numbers
        assert np.allclose(grad, want, rtol=1e-12, atol=1e-12)
        assert out.rows == len(X) and out.stop  # one rank's signal stops every rank


def test_a_rank_out_of_step_fails_every_rank():
    X, y = data()

    def rank(comm):
        ctx = with_reduction(context(comm, hooks="skew=1@3"))
        with pytest.raises(RuntimeError, match="out of step"):
            ctx.gradient(np.zeros(5), X, y, 3)
        return True

    assert run_ranks(2, rank) == [True, True]


def test_timers_and_outcomes_add_up():
    timers = Timers()
    for _ in range(3):
        with timers("io"):
            pass
    assert set(timers.seconds) == {"io"} and timers.seconds["io"] >= 0
    total = StepOutcome(1.0, 2.0, False) + StepOutcome(0.5, 1.0, True) + StepOutcome()
    assert (total.loss_sum, total.rows, total.stop) == (1.5, 3.0, True)
    check_step(6.0, 2, 3)
