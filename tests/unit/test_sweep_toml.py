"""The TOML writer of sweep outputs: every value and document reads back exactly with tomllib."""

import math
import tomllib

import pytest

from lepton_hpc.config import config_from_dict
from lepton_hpc.sweep.toml_writer import dumps, toml_value
from tests.unit.test_sweep_spec import BASE


@pytest.mark.parametrize(
    "value",
    [0.1, 1e-5, 3, True, 'a "quoted" \\ path\nline', [16, 8], [0.5, -1.25e-7], "ünï", "x\x7f"],
)
def test_toml_values_read_back_exactly(value):
    assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value


def test_toml_document_reads_back_and_validates():
    text = dumps({**BASE, "top": 1}, header="two\nlines")
    assert text.startswith("# two\n# lines\n")
    back = tomllib.loads(text)
    assert back == {**BASE, "top": 1}
    config_from_dict(BASE)


def test_nan_and_inf_are_written_as_toml():
    back = tomllib.loads(f"a = {toml_value(math.inf)}\nb = {toml_value(math.nan)}")
    assert back["a"] == math.inf and math.isnan(back["b"])
