"""``lepton doctor``: one line per thing a job needs, each detected lazily, once, when asked.

The checks that break jobs most often on a cluster: the launcher on the PATH (``mpirun``,
``srun --mpi=``) not matching the MPI library mpi4py loaded, two MPI libraries in one process,
serial h5py, a run directory that cannot be written. Every rank runs the checks (a bad node is
found, not just a bad rank 0); the results are merged so that a check passes only when it passes
on every rank, and every rank returns the same list (the same exit code).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from .comm.base import Communicator

SUBPROCESS_TIMEOUT = 20


def _check(name: str, ok: bool, detail: str, required: bool = True) -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail, "required": required}


def _run(cmd: list[str]) -> str:
    """stdout + stderr of a short command (empty when it cannot run), without MPI's variables."""
    try:
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
            check=False,
            env=clean_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout + res.stderr


def clean_env() -> dict[str, str]:
    """The environment for starting mpirun from here (see ``lepton_hpc.launch.mpi_env``)."""
    from .launch import mpi_env

    return mpi_env()


# ---- parsing (pure functions, unit-tested) ---------------------------------------------------
def mpi_flavour(text: str) -> tuple[str, tuple[int, ...]]:
    """MPI family and version from ``MPI_Get_library_version`` or ``mpirun --version`` text."""
    num = r"(\d+(?:\.\d+)*)"
    patterns = (
        ("Open MPI", rf"Open MPI\)? v?{num}"),
        ("Open MPI", rf"OpenRTE\)? v?{num}"),
        ("Intel MPI", rf"Intel\(R\) MPI Library (?:for Linux\* OS, )?(?:Version )?{num}"),
        ("MVAPICH", rf"MVAPICH2? Version\s*:?\s*{num}"),
        ("MPICH", rf"MPICH Version\s*:?\s*{num}"),
        ("MPICH", rf"HYDRA build details:\s+Version\s*:\s*{num}"),
    )
    for family, pattern in patterns:
        m = re.search(pattern, text)
        if m:
            return family, tuple(int(p) for p in m.group(1).split("."))
    return "unknown", ()


def launcher_matches(
    lib: tuple[str, tuple[int, ...]], launcher: tuple[str, tuple[int, ...]]
) -> tuple[bool, str]:
    """A launcher works with a library of the same family (Open MPI: same major version)."""
    (lib_family, lib_version), (run_family, run_version) = lib, launcher
    if run_family == "unknown":
        return False, "cannot tell which MPI it belongs to"
    mpich_like = {"MPICH", "Intel MPI", "MVAPICH"}
    if lib_family != run_family and not {lib_family, run_family} <= mpich_like:
        return False, f"it is {run_family} but mpi4py loaded {lib_family}"
    if lib_family == "Open MPI" and lib_version[:1] != run_version[:1]:
        return False, f"Open MPI {_v(run_version)} launcher, Open MPI {_v(lib_version)} library"
    return True, f"same MPI as mpi4py ({lib_family} {_v(lib_version)})"


def parse_srun_mpi_list(text: str) -> list[str]:
    """Plugin types from ``srun --mpi=list`` (e.g. ``['pmix', 'none', 'pmi2', 'pmix_v4']``).

    Slurm 22.05 prints a header and tab-indented names, then the PMIx versions on one line;
    older versions print ``srun: <name>`` or ``srun: mpi/<name>`` lines.
    """
    types: list[str] = []
    listing = False
    for raw in text.splitlines():
        line = re.sub(r"^srun:\s*", "", raw).strip()
        if re.search(r"MPI (plugin )?types are", line):
            listing = True
            continue
        versions = re.search(r"plugin versions available:\s*(.+)", line)
        if versions:
            types += [v.strip() for v in versions.group(1).split(",") if v.strip()]
            listing = False
        elif listing and re.fullmatch(r"[\w./-]+", line):
            types.append(line.removeprefix("mpi/"))
        elif line:
            listing = False
    return list(dict.fromkeys(types))


def recommend_srun_mpi(types: list[str], family: str, pmi: set[str]) -> tuple[str | None, str]:
    """The ``srun --mpi=`` value that starts this MPI, or None with the reason.

    ``pmi``: what the MPI library can use to start under srun ({"pmix", "pmi2"}); Open MPI 4
    needs a PMIx component (Debian's has ``ext3x``) for ``pmix``, and Slurm's PMI2 (``s2``) for
    ``pmi2``; the MPICH family speaks PMI2 (and PMIx in recent versions).
    """
    order = ("pmix", "pmi2") if family == "Open MPI" else ("pmi2", "pmix")
    for kind in order:
        offered = [t for t in types if t == kind or t.startswith(f"{kind}_")]
        if offered and kind in pmi:
            value = kind if kind in offered else offered[0]
            return value, f"use srun --mpi={value}"
    listed = ", ".join(t for t in types if not t.startswith("pmix_")) or "nothing"
    return None, (
        f"srun offers {listed}, none of which {family} here can use: srun direct launch will "
        "fail in MPI_Init; launch with mpirun inside the allocation"
    )


def openmpi_pmi_support(ompi_info: str) -> set[str]:
    """{"pmix", "pmi2"} from ``ompi_info --parsable``: PMIx components, Slurm's PMI2 (s2)."""
    components = set(re.findall(r"^mca:pmix:([\w]+):", ompi_info, flags=re.MULTILINE))
    kinds = set()
    if any(re.fullmatch(r"(ext\d+x|pmix\d+x)", c) for c in components):
        kinds.add("pmix")
    if "s2" in components:
        kinds.add("pmi2")
    return kinds


def loaded_mpi_libraries(maps: str) -> set[str]:
    """Distinct libmpi files mapped into a process, from the text of ``/proc/<pid>/maps``."""
    found = set()
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        name = os.path.basename(path)
        if re.match(r"lib(p?mpi|mpich|mpi_ibm)\.so", name):
            found.add(os.path.realpath(path))
    return found


def merge_ranks(per_rank: list[list[dict]], hosts: list[str], shown: int = 3) -> list[dict]:
    """One list: a check passes only where it passes on every rank; failures name their ranks."""
    merged = [dict(c) for c in per_rank[0]]
    by_name = {c["name"]: c for c in merged}
    extra: dict[str, int] = {}
    for rank, checks in enumerate(per_rank[1:], start=1):
        for c in checks:
            target = by_name.get(c["name"])
            if target is None:  # a check only some ranks run (launchers: one rank per node)
                target = by_name[c["name"]] = dict(c)
                merged.append(target)
                continue
            if c["ok"] or (not target["ok"] and c["detail"] in target["detail"]):
                continue
            target["ok"] = False
            extra[c["name"]] = extra.get(c["name"], 0) + 1
            if extra[c["name"]] <= shown:
                target["detail"] += f" | rank {rank} on {hosts[rank]}: {c['detail']}"
    for name, count in extra.items():
        if count > shown:
            by_name[name]["detail"] += f" | and {count - shown} more rank(s)"
    return merged


def _v(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version)) or "?"


# ---- the checks ------------------------------------------------------------------------------
def mpi_library() -> dict:
    """The MPI library mpi4py loaded (mpi4py 4 wheels choose one at run time)."""
    import mpi4py
    from mpi4py import MPI

    text = MPI.Get_library_version()
    family, version = mpi_flavour(text)
    libs = sorted(loaded_mpi_libraries(_self_maps()))
    where = ", ".join(libs) or "statically linked"
    detail = f"mpi4py {mpi4py.__version__}: {family} {_v(version)} ({where})"
    return _check("MPI library", family != "unknown", detail)


def one_mpi_library() -> dict:
    """mpi4py and h5py (through parallel HDF5) must use the same MPI: two in a process crash."""
    import h5py  # noqa: F401 - loads parallel HDF5 and the MPI it was built with
    from mpi4py import MPI  # noqa: F401

    libs = sorted(loaded_mpi_libraries(_self_maps()))
    if len(libs) > 1:
        return _check("one MPI library", False, f"{len(libs)} loaded at once: {', '.join(libs)}")
    return _check("one MPI library", True, "mpi4py and parallel HDF5 share it")


def launcher() -> dict:
    """The mpirun on the PATH must belong to the MPI library mpi4py loaded."""
    from mpi4py import MPI

    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        return _check("mpirun", False, "no mpirun or mpiexec on the PATH", required=False)
    out = _run([exe, "--version"])
    ok, why = launcher_matches(mpi_flavour(MPI.Get_library_version()), mpi_flavour(out))
    first = out.strip().splitlines()[0] if out.strip() else "no output"
    return _check("mpirun", ok, f"{exe} ({first}): {why}")


def srun_plugin_types(exe: str) -> list[str]:
    """``srun --mpi=list``, or the mpi_*.so plugins next to srun when no slurm.conf is readable."""
    types = parse_srun_mpi_list(_run([exe, "--mpi=list"]))
    if types:
        return types
    prefix = Path(exe).resolve().parent.parent
    for lib in ("lib", "lib64"):
        for folder in (prefix / lib).glob("*slurm*"):
            types = sorted(p.stem.removeprefix("mpi_") for p in folder.glob("mpi_*.so"))
            if types:
                return types
        for folder in (prefix / lib).glob("*/slurm*"):
            types = sorted(p.stem.removeprefix("mpi_") for p in folder.glob("mpi_*.so"))
            if types:
                return types
    return []


def srun() -> dict:
    """The ``srun --mpi=`` value for this MPI (a warning only: mpirun in sbatch still works)."""
    from mpi4py import MPI

    exe = shutil.which("srun")
    if exe is None:
        return _check("srun", True, "not on the PATH (not a Slurm node)", required=False)
    types = srun_plugin_types(exe)
    family, _ = mpi_flavour(MPI.Get_library_version())
    if family == "Open MPI":
        info = shutil.which("ompi_info")
        pmi = openmpi_pmi_support(_run([info, "--parsable"])) if info else {"pmix"}
    else:
        pmi = {"pmi2", "pmix"}
    best, detail = recommend_srun_mpi(types, family, pmi)
    return _check("srun --mpi", best is not None, detail, required=False)


def h5py_parallel() -> dict:
    import h5py

    cfg = h5py.get_config()
    detail = (
        f"h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}, mpio driver: {cfg.mpi}"
    )
    return _check("h5py parallel (mpio)", cfg.mpi, detail)


def gpu() -> dict:
    """Whether Numba sees a GPU; required only when ``LEPTON_REQUIRE_GPU=1`` (GPU nodes)."""
    from .device import cuda_available

    required = os.environ.get("LEPTON_REQUIRE_GPU", "0") == "1"
    if not cuda_available():
        why = "none visible to numba.cuda (CPU kernels)"
        return _check("GPU (numba.cuda)", not required, why, required=required)
    from numba import cuda

    if cuda.is_available() and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return _check("GPU (numba.cuda)", not required, "the CUDA simulator", required=required)
    names = [g.name.decode() if isinstance(g.name, bytes) else str(g.name) for g in cuda.gpus]
    return _check("GPU (numba.cuda)", True, f"{len(names)}: {', '.join(names)}", required=required)


def native_kernels() -> dict:
    """Whether the CPU backend runs its tuned native kernels (a warning when it falls back)."""
    from .kernels import native

    ok, why = native.supported()
    detail = f"on ({why})" if ok else f"off, plain reference kernels ({why})"
    return _check("tuned CPU kernels", ok, detail, required=False)


def horovod() -> dict:
    """Horovod is optional (comm.backend = "horovod"); when present it must be built with MPI."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name in ("horovod", "torch")
        why = "not installed (make install-horovod)" if missing else f"does not import: {exc}"
        return _check("horovod", missing, why, required=False)
    if not hvd.mpi_built():
        return _check("horovod", False, "built without MPI (Gloo only)", required=False)
    libs = loaded_mpi_libraries(_self_maps())
    if len(libs) > 1:
        why = f"brings another MPI than mpi4py's: {', '.join(sorted(libs))}"
        return _check("horovod", False, why, required=False)
    return _check("horovod", True, "built with MPI (the library mpi4py uses)", required=False)


def writable(path: Path) -> dict:
    """The run directory's file system takes a new file; its type and free space are shown."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path) as fh:
            fh.write(b"lepton doctor")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return _check("run directory", False, f"'{path}' is not writable: {exc.strerror}")
    free = shutil.disk_usage(path).free / 2**30
    return _check(
        "run directory", True, f"'{path}' is writable ({fs_type(path)}, {free:.1f} GiB free)"
    )


def fs_type(path: Path) -> str:
    """The file system type of ``path`` from /proc/mounts (the longest matching mount point)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown file system"
    real, best = str(path.resolve()), ("", "unknown file system")
    for line in mounts:
        parts = line.split()
        inside = len(parts) >= 3 and (
            real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")
        )
        if inside and len(parts[1]) >= len(best[0]):
            best = (parts[1], parts[2])
    return best[1]


def _self_maps() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def _guarded(name: str, check: Callable[[], dict], required: bool = True) -> dict:
    """A check that crashes (a broken install) is a failed check, not a crashed doctor."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - any failure of a check is its result
        return _check(name, False, f"{type(exc).__name__}: {exc}", required)


def run_checks(comm: Communicator, run_dir: Path) -> list[dict]:
    """Every check on every rank (launcher checks once per node), merged over the ranks."""
    checks = [
        _check("ranks", True, f"{comm.size} rank(s), {comm.node_size} on this node"),
        _guarded("MPI library", mpi_library),
        _guarded("h5py parallel (mpio)", h5py_parallel),
        _guarded("GPU (numba.cuda)", gpu),
        _guarded("tuned CPU kernels", native_kernels, required=False),
        _guarded("one MPI library", one_mpi_library),
        _guarded("horovod", horovod, required=False),
        _guarded("run directory", lambda: writable(run_dir)),
    ]
    if comm.node_rank == 0:
        checks += [_guarded("mpirun", launcher), _guarded("srun --mpi", srun, required=False)]
    if comm.size == 1:
        return checks
    import socket

    gathered = comm.gather((socket.gethostname(), checks))
    merged = None
    if comm.is_root:
        merged = merge_ranks([g[1] for g in gathered], [g[0] for g in gathered])
    return comm.bcast(merged)
