"""lepton_hpc: MPI training and inference on HDF5 data, from job scripts and from Python.

``import lepton_hpc as lp`` gives the Python interface: ``lp.train`` / ``lp.Run`` (a run from a
config, alone or under mpirun), ``lp.load_model`` / ``lp.Model`` (in-process predict, evaluate,
ONNX export) and the scikit-learn estimators. They are imported on first use (PEP 562), so the
``lepton`` command never pays for them and scikit-learn stays optional.
"""

import os as _os

__version__ = "0.1.0"

# Numba's OpenMP workers spin after each parallel region for GOMP's default 300,000 turns (about
# 2 ms here) and hold a core meanwhile: the BLAS worker threads of the kernels' GEMM path
# (``kernels.cpu_gemm``) lost 1.9 ms of a 2.7 ms mini-batch step to the spin after the
# optimiser's update. 10,000 turns cost nothing measurable on the tight loops (mini-batch
# logistic epoch 114-122 ms either way). libgomp reads it when first loaded (by Numba, or by
# torch, which shares it), so it is set on the package's import; a value the user set is kept.
OMP_SPINCOUNT = _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

_EXPORTS = {
    "train": "run",
    "Run": "run",
    "load_model": "model",
    "Model": "model",
    "LinearRegression": "estimators",
    "LogisticRegression": "estimators",
    "SoftmaxRegression": "estimators",
    "MLPClassifier": "estimators",
    "MLPRegressor": "estimators",
}
__all__ = ["__version__", *_EXPORTS.keys()]  # noqa: PLE0604 - all strings


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lepton_hpc' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".api.{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
