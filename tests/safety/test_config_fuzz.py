"""Property: any config a user can write (wrong types, out-of-range, non-finite numbers, huge
integers) is either refused with a ``LeptonError`` that names a key, or trains to a completed
run with finite results and strictly valid JSON. Never a traceback, never a loss of data.

The runs are real (the engine, the Numba kernels, the run directory) on one process with a
size-1 communicator; the same code runs under mpiexec.
"""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lepton_hpc.comm.base import SerialComm
from lepton_hpc.config import check_config, config_from_dict
from lepton_hpc.engine import train
from lepton_hpc.errors import ConfigError, LeptonError
from lepton_hpc.log import Log
from tests.conftest import write_h5
from tests.safety.conftest import assert_unchanged, snapshot

junk = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.booleans(),
    st.lists(st.integers(min_value=-3, max_value=40), max_size=3),
)

# Valid values per key, so that many drawn configs train; one key at a time gets junk.
PLAUSIBLE = {
    ("model", "kind"): st.sampled_from(["linear", "logistic", "softmax", "mlp"]),
    ("model", "hidden"): st.lists(st.integers(min_value=1, max_value=12), max_size=2),
    ("model", "activation"): st.sampled_from(["relu", "tanh", "sigmoid"]),
    ("model", "init"): st.sampled_from(["auto", "uniform", "xavier", "he", "zeros"]),
    ("model", "l2"): st.floats(min_value=0, max_value=10),
    ("model", "max_classes"): st.integers(min_value=2, max_value=5),
    ("optim", "name"): st.sampled_from(["sgd", "momentum", "adam", "lbfgs"]),
    ("optim", "lr"): st.floats(min_value=1e-300, max_value=1e6),
    ("optim", "momentum"): st.floats(min_value=0, max_value=0.999),
    ("optim", "history"): st.integers(min_value=1, max_value=20),
    ("train", "epochs"): st.integers(min_value=1, max_value=3),
    ("train", "batch_size"): st.integers(min_value=0, max_value=200),
    ("train", "max_steps"): st.integers(min_value=0, max_value=20),
    ("train", "seed"): st.integers(min_value=0, max_value=2**63 - 1),
    ("train", "patience"): st.integers(min_value=0, max_value=3),
    ("data", "validation_fraction"): st.floats(min_value=0, max_value=0.99),
    ("data", "scale"): st.sampled_from(["none", "zscore", "minmax"]),
    ("data", "nonfinite"): st.sampled_from(["error", "drop"]),
    ("comm", "strategy"): st.sampled_from(["sync", "local_sgd", "overlap"]),
    ("comm", "local_steps"): st.integers(min_value=1, max_value=5),
    ("comm", "compression"): st.sampled_from(["none", "fp16", "bf16"]),
    ("comm", "reproducible"): st.booleans(),
    ("checkpoint", "every_steps"): st.integers(min_value=0, max_value=5),
    ("checkpoint", "keep"): st.integers(min_value=1, max_value=3),
}


@st.composite
def raw_configs(draw):
    raw: dict[str, dict] = {}
    for (section, key), plausible in PLAUSIBLE.items():
        if draw(st.integers(0, 2)) == 0:
            raw.setdefault(section, {})[key] = draw(plausible)
    if draw(st.booleans()):  # one key (maybe unknown) with a value of any type or range
        section, key = draw(st.sampled_from([*PLAUSIBLE, ("optim", "nope"), ("extra", "x")]))
        raw.setdefault(section, {})[key] = draw(junk)
    return raw


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 3))
    return write_h5(tmp_path_factory.mktemp("fuzz") / "d.h5", X, (X[:, 0] > 0).astype(float))


def strict(path):
    def refuse(token):
        raise AssertionError(f"{path}: {token} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=raw_configs())
def test_any_config_is_refused_by_name_or_trains_cleanly(tmp_path, data, raw):
    before = snapshot(data)
    raw.setdefault("data", {})["train"] = str(data)
    raw["output"] = {"dir": str(tmp_path / "run"), "plot": False}
    raw.setdefault("train", {})["threads"] = 1
    try:
        cfg = check_config(config_from_dict(raw))
    except ConfigError as exc:
        refused = str(exc)
    else:
        refused = ""
    if refused:
        assert "config key '" in refused
        event("refused: config")
        return
    try:
        results = train(cfg, SerialComm(), Log(), overwrite=True)
    except LeptonError as exc:
        refused = f"{type(exc).__name__}: {exc}"
    if refused:
        assert "\n" not in refused  # one line
        assert_unchanged(before, data)
        event(f"refused: {refused.split(':')[0]}")
        return
    event("trained")
    assert results["status"] == "completed"
    saved = strict(tmp_path / "run" / "results.json")
    for part in saved["metrics"].values():
        for value in part.values():
            if isinstance(value, float):
                assert math.isfinite(value), saved["metrics"]
    assert_unchanged(before, data)
