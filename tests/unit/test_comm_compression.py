"""Compressors (fp16, bf16), error feedback, and the packed compressed reduction (no MPI)."""

import numpy as np
import pytest

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.comm.compression import (
    COMPRESSORS,
    CompressedReducer,
    ErrorFeedback,
    make_compressor,
    make_reducer,
)

# Relative rounding error of round-to-nearest: half an ulp of the significand.
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}


def values(n=10_000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=n) * 10.0 ** rng.uniform(-3, 3, size=n)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_round_trip_is_rounding_to_nearest(name):
    c = make_compressor(name)
    x = values()
    words = c.compress(x)
    assert words.dtype == np.uint16 and words.shape == x.shape
    back = c.decompress(words)
    assert back.dtype == np.float64
    normal = np.abs(x) > (6.2e-5 if name == "fp16" else 1e-30)  # fp16 subnormals lose bits
    rel = np.abs(back - x)[normal] / np.abs(x)[normal]
    assert rel.max() <= UNIT_ROUNDOFF[name] * (1 + 1e-12)


def test_bf16_rounds_ties_to_even_and_keeps_specials():
    c = make_compressor("bf16")
    one_ulp = 2.0**-7  # bf16 spacing just above 1.0
    x = np.array([1.0 + one_ulp / 2, 1.0 + 3 * one_ulp / 2, -2.5, np.inf, -np.inf, np.nan])
    back = c.decompress(c.compress(x))
    assert back[0] == 1.0  # a tie goes to the even significand (1.0)
    assert back[1] == 1.0 + 2 * one_ulp  # a tie from an odd one goes up
    assert back[2] == -2.5
    assert back[3] == np.inf and back[4] == -np.inf and np.isnan(back[5])


def test_fp16_clips_instead_of_overflowing():
    c = make_compressor("fp16")
    back = c.decompress(c.compress(np.array([1e6, -1e6, 3.0])))
    assert np.all(np.isfinite(back))
    assert back[0] == 65504.0 and back[1] == -65504.0 and back[2] == 3.0


def test_registry_names_match_the_config():
    assert set(COMPRESSORS) == {"none", "fp16", "bf16"}
    x = values(100)
    c = make_compressor("none")
    assert np.array_equal(c.decompress(c.compress(x)), x)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_error_feedback_loses_nothing_for_good(name):
    """What was sent over T steps equals what was meant, up to the last residual."""
    c = make_compressor(name)
    ef = ErrorFeedback(c, 500)
    rng = np.random.default_rng(3)
    meant = np.zeros(500)
    sent = np.zeros(500)
    plain = np.zeros(500)
    for _ in range(200):
        g = rng.normal(size=500) * 1e-3 + 1e-6  # a small bias that plain rounding loses
        meant += g
        words, scale = ef.compress(g)
        assert scale == 1.0  # small values: no scaling
        sent += c.decompress(words)
        plain += c.decompress(c.compress(g))
    assert np.allclose(sent + ef.residual, meant, rtol=0, atol=1e-15)
    assert np.abs(sent - meant).max() <= np.abs(plain - meant).max()
    assert np.abs(ef.residual).max() <= UNIT_ROUNDOFF[name] * np.abs(meant).max() * 4
    ef.reset()
    assert not ef.residual.any()


class EchoComm(SerialComm):
    """A fake communicator of ``size`` ranks that all send the same message."""

    def __init__(self, size):
        self.size = size

    def allgather(self, obj):
        return [obj] * self.size


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_compressed_reducer_sums_payload_and_keeps_the_tail_exact(name):
    comm = EchoComm(3)
    P = 257
    reducer = make_reducer(name, comm, P)
    assert isinstance(reducer, CompressedReducer)
    buf = np.r_[values(P), 12345.678901234567, 1001.0, 1.0, 41.0]
    expect = buf.copy()
    reducer.allreduce_(buf)
    c = make_compressor(name)
    assert np.array_equal(buf[:P], 3 * c.decompress(c.compress(expect[:P])))
    assert np.array_equal(buf[P:], 3 * expect[P:])  # loss, rows, flag, step: float64 exact
    assert reducer.bytes_sent == 2 * P + 8 * 5  # words, their scale, the tail


def test_fp16_sums_beyond_its_range_are_scaled_not_clipped():
    """A rank's gradient *sum* over many rows passes 65504; it is sent scaled by a power of two,
    so the reduced sum keeps fp16's relative precision instead of being clipped."""
    comm = EchoComm(2)
    P = 64
    reducer = make_reducer("fp16", comm, P)
    rng = np.random.default_rng(5)
    grad = rng.normal(size=P) * 1e7  # e.g. 1e6 rows x gradients of ~10
    buf = np.r_[grad, 1.0, 2e6, 0.0, 3.0]
    reducer.allreduce_(buf)
    assert np.allclose(buf[:P], 2 * grad, rtol=2**-10, atol=0)
    assert np.array_equal(buf[P:], [2.0, 4e6, 0.0, 6.0])
    # what one rank lost to rounding is in its residual, not clipped away
    assert np.abs(reducer.feedback.residual).max() <= np.abs(grad).max() * 2**-10


def test_no_compression_and_one_rank_leave_the_buffer_alone():
    comm = SerialComm()
    assert make_reducer("none", comm, 10) is comm
    buf = values(14)
    before = buf.copy()
    make_reducer("fp16", comm, 10).allreduce_(buf)
    assert np.array_equal(buf, before)
