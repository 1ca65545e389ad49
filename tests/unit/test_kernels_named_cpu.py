"""The tuned CPU kernels on code for a named CPU (``NUMBA_CPU_NAME``): which features LLVM's code
for that CPU has (``native.probe``), the choice of kernels that follows, and, in a subprocess
compiling for haswell (AVX2 and FMA, no AVX-512) in a cache of its own, gradients against the
float64 NumPy reference and machine code free of AVX-512 registers."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lepton_hpc.kernels import native

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 CPU names and code"
)

# Any AVX-512 state in AT&T assembly: 512-bit registers, the upper 16 xmm/ymm registers (EVEX
# only), mask registers and embedded broadcasts.
AVX512_ASM = re.compile(r"%zmm\d+|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]\b|\{1to\d+\}")


def _asm_for(cpu: str, features: str = "") -> str:
    """Machine code of native's probe functions for a target machine of that CPU."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    flat = ",".join(f for f in (features, "+64bit") if f)
    machine = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=flat)
    return machine.emit_assembly(llvm.parse_assembly(native._PROBE_IR))


@pytest.mark.parametrize(
    ("cpu", "avx2", "avx512"),
    [
        ("haswell", True, False),
        ("broadwell", True, False),
        ("skylake", True, False),
        ("znver1", True, False),
        ("znver3", True, False),
        ("skylake-avx512", True, True),
        ("cascadelake", True, True),
        ("icelake-server", True, True),
        ("sapphirerapids", True, True),
        ("znver4", True, True),
        ("x86-64-v3", True, False),
        ("x86-64-v4", True, True),
        ("x86-64", False, False),
        ("generic", False, False),
        ("sandybridge", False, False),
    ],
)
def test_probe_knows_named_cpus(cpu, avx2, avx512):
    """LLVM's code for each CPU name has the features that CPU has, and no others."""
    known, features = native.probe(cpu, "")
    assert known
    assert features["avx2"] is avx2 and features["fma"] is avx2
    assert features["avx512f"] is avx512


def test_probe_applies_the_feature_string_over_the_cpu():
    """NUMBA_CPU_FEATURES adds to or removes from the named CPU's own features."""
    assert native.probe("haswell", "+avx512f")[1]["avx512f"]
    assert not native.probe("skylake-avx512", "-avx512f")[1]["avx512f"]
    assert not native.probe("haswell", "-fma")[1]["fma"]


def test_probe_unknown_cpu_is_reported_and_not_compiled():
    known, features = native.probe("no-such-cpu", "")
    assert not known and features == {}


def test_avx512_detector_catches_avx512_code():
    """The check the subprocess test applies to the compiled kernels finds AVX-512 code where
    there is some (the probe's 512-bit function for skylake-avx512), none in haswell's."""
    assert AVX512_ASM.search(_asm_for("skylake-avx512"))
    haswell = _asm_for("haswell")
    assert not AVX512_ASM.search(haswell)
    assert "%ymm" in haswell


def _with_config(monkeypatch, name, features):
    from numba import config

    monkeypatch.setattr(config, "CPU_NAME", name)
    monkeypatch.setattr(config, "CPU_FEATURES", features)
    native._check.cache_clear()
    return native.supported()


@pytest.fixture
def fresh_check():
    native._check.cache_clear()
    yield
    native._check.cache_clear()


@pytest.mark.usefixtures("fresh_check")
def test_supported_under_named_cpus(monkeypatch, capsys):
    """The choice follows the code's features: haswell (own features) gets the AVX2 tuned
    paths, no tiles; haswell with the host's feature string (NUMBA_CPU_NAME alone: Numba passes
    them) gets what the host has; an unknown name gets the reference kernels and one line."""
    from numba.core import codegen

    ok, why = _with_config(monkeypatch, "haswell", "")
    assert ok and "AVX2" in why and "haswell" in why
    assert not native.has_avx512()

    ok, why = _with_config(monkeypatch, "sandybridge", "")
    assert not ok and "no avx2, fma" in why

    capsys.readouterr()
    ok, why = _with_config(monkeypatch, "haswell", None)
    host = native._parse_features(codegen.get_host_cpu_features())
    assert ok
    assert native.has_avx512() is bool(host.get("avx512f", False))
    err = capsys.readouterr().err
    if host.get("avx512f", False):  # said once, in the reason and on stderr
        assert "uses avx512f, which haswell lacks" in why
        assert err.count("lepton: warning:") == 1 and 'NUMBA_CPU_FEATURES=""' in err
    else:
        assert "lacks" not in why and not err

    ok, why = _with_config(monkeypatch, "no-such-cpu", "")
    assert not ok and "no-such-cpu" in why and "not a CPU LLVM knows" in why
    err = capsys.readouterr().err
    assert err.count("lepton: warning:") == 1 and "no-such-cpu" in err


# The subprocess: Numba compiles for haswell with its own features in a cache of its own.
_HASWELL_RUN = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import reference as ref
from lepton_hpc import kernel_cache
# compile afresh: code loaded from a cache has no assembly to inspect, and the source tree's
# own cache may hold this CPU's entries already (from a bench's AVX2 part, for instance)
kernel_cache.seed = lambda installed, dest: 0
from lepton_hpc.kernels import BINARY, SOFTMAX, SQUARED, TANH, SIGMOID, cpu, native, param_count
from lepton_hpc.kernels import reference as plain
from lepton_hpc.kernels import cpu_float32, cpu_layers, cpu_passes, cpu_tiles, fastmath

def refuse(*args, **kwargs):
    raise AssertionError("the reference kernels ran: the tuned ones were not chosen")

plain.gradient = refuse
report = {"supported": native.supported(), "tiles": cpu.USE_TILES, "errors": {}}
models = {
    "linear": ((1,), SIGMOID, SQUARED),
    "logistic": ((1,), SIGMOID, BINARY),
    "softmax": ((3,), SIGMOID, SOFTMAX),
    "mlp": ((5, 3), TANH, SOFTMAX),
}
rng = np.random.default_rng(0)
n = 203
for name, (tail, act, head) in models.items():
    # every tail of the 4-feature panels, on rows of up to 40 features and on wider ones
    for d in (1, 2, 7, 8, 31, 32, 33, 34, 256, 1021, 1022, 1023):
        sizes = np.array((d, *tail), dtype=np.int64)
        X = rng.standard_normal((n, d)).astype(np.float32)
        k = int(sizes[-1])
        if head == SQUARED:
            y = rng.standard_normal(n)
        elif head == BINARY:
            y = (rng.random(n) < 0.5).astype(np.float64)
        else:
            y = rng.integers(0, k, n).astype(np.float64)
        params = rng.standard_normal(param_count(sizes)) * 0.5
        out = np.full(params.size + 2, np.nan)
        cpu.gradient(X, y, params, sizes, act, head, out)
        g, loss, rows = ref.gradient(X, y, params, sizes, act, head)
        P = params.size
        report["errors"][f"{name}_d{d}"] = [
            float(np.max(np.abs(out[:P] - g)) / np.max(np.abs(g))),
            abs(out[P] - loss) / abs(loss),
            float(out[P + 1] - rows),
        ]
        if len(tail) == 1 and tail[0] == 1 and d > cpu.PANEL4_WIDTH:  # train.products = "float32"
            cpu.gradient(X, y, params, sizes, act, head, out, "float32")
            report["errors"][f"{name}_d{d}_float32"] = [
                float(np.max(np.abs(out[:P] - g)) / np.max(np.abs(g))),
                abs(out[P] - loss) / abs(loss),
                float(out[P + 1] - rows),
            ]
asm = {}
for module in (cpu, cpu_passes, cpu_layers, cpu_tiles, cpu_float32, fastmath):
    for attr, fn in vars(module).items():
        for sig in getattr(fn, "signatures", []) if hasattr(fn, "inspect_asm") else []:
            asm[f"{module.__name__}.{attr}{sig}"] = fn.inspect_asm(sig)
report["asm"] = asm
json.dump(report, open(sys.argv[2], "w"))
"""


def _host_features() -> dict:
    import llvmlite.binding as llvm

    return dict(llvm.get_host_cpu_features())


def _host_runs_haswell_code() -> bool:
    host = _host_features()
    return bool(host.get("avx2", False) and host.get("fma", False))


def _host_has_avx512() -> bool:
    return bool(_host_features().get("avx512f", False))


@pytest.mark.skipif(
    not (_host_runs_haswell_code() and native.supported()[0]),
    reason="this host cannot run AVX2+FMA code, or the tuned kernels are untested here",
)
@pytest.mark.skipif(
    _host_runs_haswell_code() and not _host_has_avx512(),
    reason=(
        "this host is itself AVX2 without AVX-512: every kernel test here already runs the AVX2 "
        "code (3-4 minutes of compiling saved)"
    ),
)
def test_haswell_code_tuned_correct_and_free_of_avx512(tmp_path):
    """Compiled for haswell (NUMBA_CPU_FEATURES="": the CPU's own features): the tuned kernels
    are chosen (the reference kernels refuse to run), without the AVX-512 tiles; the gradient
    sums of linear, logistic, softmax and an MLP at d = 1 .. 1023 (every tail of 4 features)
    match the float64 NumPy reference; and no compiled kernel has an AVX-512 register or
    instruction in its code."""
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CPU_FEATURES": "",
        "NUMBA_CACHE_DIR": str(tmp_path / "numba_cache"),
    }
    result = tmp_path / "result.json"
    tests_dir = str(Path(__file__).resolve().parents[1])
    run = subprocess.run(
        [sys.executable, "-c", _HASWELL_RUN, tests_dir, str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # compiling every tuned kernel afresh: 3.5 minutes on a 2-core machine
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(result.read_text())
    ok, why = report["supported"]
    assert ok and "AVX2" in why and "haswell" in why, why
    assert report["tiles"] is False
    assert len(report["errors"]) == 48 + 8  # float32 products at 256, 1021, 1022 and 1023 features
    for case, (grad_err, loss_err, rows_diff) in report["errors"].items():
        # the tolerance of test_kernels_cpu's reference tests: all arithmetic is float64, or
        # float32 products (1e-6 there too)
        tol = 1e-6 if case.endswith("_float32") else 1e-11
        assert grad_err < tol, (case, grad_err)
        assert loss_err < tol, (case, loss_err)
        assert rows_diff == 0, case
        if case.endswith("_float32"):
            assert grad_err > 1e-12, case  # float32 products indeed
    asm = report["asm"]
    kernels = [k for k in asm if "_single_layer_gradient" in k or "_mlp_gradient" in k]
    kernels += [k for k in asm if "one_output_float32" in k]
    assert len({k.split("(")[0].rsplit(".", 1)[1] for k in kernels}) == 3, sorted(asm)
    for key in kernels:
        assert "%ymm" in asm[key], f"{key}: no 256-bit vector code (not AVX2?)"
    leaked = {key: hit.group() for key, text in asm.items() if (hit := AVX512_ASM.search(text))}
    assert not leaked, leaked


# ---- the bench's avx2 part ------------------------------------------------------------------
def test_bench_avx2_part_times_generic_and_tuned():
    """The avx2 part times the generic kernels beside ours; where the check chose the tuned
    kernels, 'tuned' is ours (one timing), and every figure agrees with NumPy float64."""
    import types

    from lepton_hpc.bench import kernel_parts

    args = types.SimpleNamespace(part="avx2", sizes="8", bytes=64 * 1024, repeats=2)
    res = kernel_parts.kernel_sweep(args)
    figures = res["figures"]
    assert figures["generic_s_d8"]["value"] > 0
    assert res["gradient_vs_numpy_f64"]["8"]["generic"] < 1e-6
    assert res["gradient_vs_numpy_f64"]["8"]["ours"] < 1e-6
    assert set(res["code_features"]) == set(native.PROBED_FEATURES)
    if res["native_supported"][0]:
        assert not res["tuned_forced"]
        assert figures["tuned_s_d8"]["value"] == figures["ours_s_d8"]["value"]


def test_bench_avx2_part_asks_for_the_named_cpus_own_features(monkeypatch, tmp_path):
    """NUMBA_CPU_NAME alone keeps the host's features in Numba's code: the avx2 part sets
    NUMBA_CPU_FEATURES="" (and has Numba read its config again) when it is not set."""
    import numba.core.config

    from lepton_hpc.bench import kernel_parts

    seen = {}
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "placeholder")
    monkeypatch.delenv("NUMBA_CPU_FEATURES")  # restored as unset afterwards
    monkeypatch.setattr(numba.core.config, "reload_config", lambda: seen.setdefault("reload", 1))
    monkeypatch.setitem(
        kernel_parts.PARTS,
        "avx2",
        lambda _args: seen.setdefault("env", os.environ.get("NUMBA_CPU_FEATURES")),
    )
    out = tmp_path / "part.json"
    monkeypatch.setattr(sys, "argv", ["kernel_parts", "avx2", "--out", str(out)])
    kernel_parts.main()
    assert seen == {"reload": 1, "env": ""}
    assert json.loads(out.read_text()) == ""
