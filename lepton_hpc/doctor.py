"""``lepton doctor``: one check per line of what a job needs, detected lazily, once."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .comm.base import Communicator


def _check(name: str, ok: bool, detail: str, required: bool = True) -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail, "required": required}


def mpi_library() -> dict:
    from mpi4py import MPI

    lib = MPI.Get_library_version().splitlines()[0].strip()
    return _check("mpi4py", True, f"{lib} (MPI {'.'.join(map(str, MPI.Get_version()))})")


def launcher() -> dict:
    """The mpirun on the PATH must be the same MPI family mpi4py was built against."""
    from mpi4py import MPI

    built = "Open MPI" if "Open MPI" in MPI.Get_library_version() else "MPICH-like"
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        return _check("mpirun", False, "no mpirun/mpiexec on the PATH")
    try:
        out = subprocess.run(
            [exe, "--version"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            env=clean_env(),
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _check("mpirun", False, f"{exe} --version failed: {exc}")
    family = "Open MPI" if "Open MPI" in out or "OpenRTE" in out else "MPICH-like"
    first = out.strip().splitlines()[0] if out.strip() else "?"
    return _check("mpirun", family == built, f"{exe}: {first}; mpi4py uses {built}")


def srun() -> dict:
    exe = shutil.which("srun")
    if exe is None:
        return _check("srun", True, "not on the PATH (not a Slurm node)", required=False)
    try:
        out = subprocess.run(
            [exe, "--mpi=list"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _check("srun", False, f"srun --mpi=list failed: {exc}", required=False)
    types = out.stdout + out.stderr
    best = "pmix" if "pmix" in types else ("pmi2" if "pmi2" in types else "none")
    return _check("srun", True, f"use srun --mpi={best}", required=False)


def h5py_parallel() -> dict:
    import h5py

    cfg = h5py.get_config()
    return _check(
        "h5py parallel (mpio)",
        cfg.mpi,
        f"h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}, mpi={cfg.mpi}",
    )


def gpu() -> dict:
    from .device import cuda_available

    seen = cuda_available()
    return _check(
        "GPU (numba.cuda)",
        True,
        "a GPU is visible" if seen else "none (CPU kernels)",
        required=False,
    )


def horovod() -> dict:
    try:
        import horovod.torch as hvd
    except ImportError:
        return _check("horovod", True, "not installed (make install-horovod)", required=False)
    return _check("horovod", hvd.mpi_built(), f"built with MPI: {hvd.mpi_built()}", required=False)


def writable(path: Path) -> dict:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        return _check("run directory", False, f"'{path}' is not writable: {exc.strerror}")
    return _check("run directory", True, f"'{path}' is writable")


def clean_env() -> dict[str, str]:
    """The environment without the MPI singleton's variables, for starting mpirun from here."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMPI_", "PMIX_")) or k.startswith(("OMPI_ALLOW", "OMPI_MCA"))
    }


def run_checks(comm: Communicator, run_dir: Path) -> list[dict]:
    checks = [mpi_library(), h5py_parallel(), gpu(), horovod(), writable(run_dir)]
    if comm.is_root:
        checks += [launcher(), srun()]
    checks.insert(1, _check("ranks", True, f"{comm.size} rank(s), {comm.node_size} on this node"))
    return checks
