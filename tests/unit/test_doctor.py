"""``lepton doctor``: the parsing and decisions on recorded tool output, then the command itself.

The command-level tests start ``python -m lepton_hpc doctor`` as a child process (alone, as an
MPI singleton), so this pytest process never initialises MPI.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lepton_hpc import doctor
from tests.conftest import PYTHON, ROOT, mpi_env

OMPI_LIB = "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, May 26, 2022"
MPICH_LIB = "MPICH Version:      4.0.2\nMPICH Release date: Thu May  5 15:44:23 CDT 2022\n"
HYDRA = "HYDRA build details:\n    Version:                                 4.0.2\n"
SRUN_22_05 = (
    "MPI plugin types are...\n\tpmix\n\tnone\n\tcray_shasta\n\tpmi2\n"
    "specific pmix plugin versions available: pmix_v4\n"
)
SRUN_OLD = "srun: MPI types are...\nsrun: none\nsrun: mpi/pmi2\nsrun: mpi/pmix_v3\n"
OMPI_INFO = "mca:pmix:ext3x:version:full:4.1.4\nmca:pmix:flux:version:full:4.1.4\nmca:ess:pmi:x\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (OMPI_LIB, ("Open MPI", (4, 1, 4))),
        (
            "mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/",
            ("Open MPI", (4, 1, 4)),
        ),
        ("mpirun (OpenRTE) 3.1.3", ("Open MPI", (3, 1, 3))),
        (MPICH_LIB, ("MPICH", (4, 0, 2))),
        (HYDRA, ("MPICH", (4, 0, 2))),
        ("MVAPICH2 Version :\t2.3.6\nMVAPICH2 Release date", ("MVAPICH", (2, 3, 6))),
        ("Intel(R) MPI Library 2021.6 for Linux* OS", ("Intel MPI", (2021, 6))),
        (
            "Intel(R) MPI Library for Linux* OS, Version 2021.6 Build 20220227",
            ("Intel MPI", (2021, 6)),
        ),
        ("something else", ("unknown", ())),
    ],
)
def test_mpi_flavour_reads_library_and_launcher_banners(text, expected):
    assert doctor.mpi_flavour(text) == expected


def test_launcher_must_belong_to_the_library_mpi4py_loaded():
    ompi4, ompi3 = ("Open MPI", (4, 1, 4)), ("Open MPI", (3, 1, 6))
    assert doctor.launcher_matches(ompi4, ("Open MPI", (4, 1, 2)))[0]
    ok, why = doctor.launcher_matches(ompi4, ("MPICH", (4, 0, 2)))
    assert not ok and "MPICH" in why and "Open MPI" in why
    ok, why = doctor.launcher_matches(ompi4, ompi3)
    assert not ok and "3.1.6" in why
    assert doctor.launcher_matches(("MPICH", (4, 0)), ("Intel MPI", (2021, 6)))[0]  # one ABI
    assert not doctor.launcher_matches(ompi4, ("unknown", ()))[0]


def test_srun_mpi_list_is_parsed_in_both_formats():
    assert doctor.parse_srun_mpi_list(SRUN_22_05) == [
        "pmix",
        "none",
        "cray_shasta",
        "pmi2",
        "pmix_v4",
    ]
    assert doctor.parse_srun_mpi_list(SRUN_OLD) == ["none", "pmi2", "pmix_v3"]
    assert (
        doctor.parse_srun_mpi_list("srun: fatal: Could not establish a configuration source") == []
    )


def test_openmpi_pmi_support_from_ompi_info():
    assert doctor.openmpi_pmi_support(OMPI_INFO) == {"pmix"}  # Debian: PMIx, no Slurm PMI2
    assert doctor.openmpi_pmi_support(OMPI_INFO + "mca:pmix:s2:version:x\n") == {"pmix", "pmi2"}
    assert doctor.openmpi_pmi_support("") == set()


def test_recommended_srun_mpi_value():
    types = doctor.parse_srun_mpi_list(SRUN_22_05)
    assert doctor.recommend_srun_mpi(types, "Open MPI", {"pmix"}) == ("pmix", "use srun --mpi=pmix")
    assert doctor.recommend_srun_mpi(types, "MPICH", {"pmi2", "pmix"})[0] == "pmi2"
    old = doctor.parse_srun_mpi_list(SRUN_OLD)
    assert doctor.recommend_srun_mpi(old, "Open MPI", {"pmix"})[0] == "pmix_v3"
    value, why = doctor.recommend_srun_mpi(["none", "pmi2"], "Open MPI", {"pmix"})
    assert value is None and "mpirun" in why and "none, pmi2" in why


def test_two_mpi_libraries_in_one_process_are_seen_in_the_maps():
    maps = (
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4\n"
        "7f02-7f03 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4\n"
        "7f04-7f05 r-xp 00000000 08:01 2 /opt/mpich/lib/libmpi.so.12.2.0\n"
        "7f06-7f07 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libmpi_cxx.so.40\n"
        "7f08-7f09 rw-p 00000000 00:00 0\n"
    )
    assert doctor.loaded_mpi_libraries(maps) == {
        "/usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4",
        "/opt/mpich/lib/libmpi.so.12.2.0",
    }


def check(name, ok, detail="fine", required=True):
    return {"name": name, "ok": ok, "detail": detail, "required": required}


def test_merge_fails_a_check_that_fails_on_any_rank_and_names_the_rank():
    per_rank = [
        [check("run directory", True), check("mpirun", True)],
        [check("run directory", True)],
        [check("run directory", False, "'runs' is not writable")],
        [check("run directory", False, "'runs' is not writable")],
    ]
    merged = doctor.merge_ranks(per_rank, ["a", "a", "b", "b"])
    runs = merged[0]
    assert not runs["ok"]
    assert "rank 2 on b: 'runs' is not writable" in runs["detail"]
    assert "rank 3" not in runs["detail"]  # the same failure is named once
    assert merged[1] == check("mpirun", True)


def test_merge_caps_the_failing_ranks_shown_and_keeps_node_only_checks():
    per_rank = [[check("gpu", True)]] + [[check("gpu", False, f"bad {r}")] for r in range(1, 7)]
    per_rank[4].append(check("srun --mpi", True, "use srun --mpi=pmix", required=False))
    merged = doctor.merge_ranks(per_rank, [f"n{r}" for r in range(7)], shown=2)
    assert merged[0]["detail"].count("| rank") == 2
    assert merged[0]["detail"].endswith("and 4 more rank(s)")
    assert merged[1]["name"] == "srun --mpi"


def test_run_directory_check(tmp_path):
    good = doctor.writable(tmp_path / "runs")
    assert good["ok"] and "writable" in good["detail"] and "GiB free" in good["detail"]
    (tmp_path / "file").write_text("x")
    bad = doctor.writable(tmp_path / "file" / "runs")
    assert not bad["ok"] and bad["required"]
    assert doctor.fs_type(Path("/")) != "unknown file system"


def test_gpu_is_required_only_on_request(monkeypatch):
    from lepton_hpc.device import cuda_available

    if cuda_available():
        pytest.skip("a GPU (or the simulator) is visible: nothing to require")
    monkeypatch.delenv("LEPTON_REQUIRE_GPU", raising=False)
    assert doctor.gpu()["ok"]
    monkeypatch.setenv("LEPTON_REQUIRE_GPU", "1")
    result = doctor.gpu()
    assert not result["ok"] and result["required"]


def test_tuned_kernels_line_says_on_or_off_and_why(monkeypatch):
    from lepton_hpc.kernels import native

    monkeypatch.setattr(native, "supported", lambda: (True, "numba 0.68.1, llvmlite 0.50.0, AVX2"))
    on = doctor.native_kernels()
    assert on["ok"] and not on["required"] and on["detail"].startswith("on (numba 0.68.1")
    monkeypatch.setattr(native, "supported", lambda: (False, "llvmlite 0.51.0 is outside"))
    off = doctor.native_kernels()
    assert not off["ok"] and not off["required"]  # a warning: the reference kernels still run
    assert off["detail"] == "off, plain reference kernels (llvmlite 0.51.0 is outside)"


# ---- the command, as a child process ------------------------------------------------------------
def doctor_cmd(tmp_path, **env):
    return subprocess.run(
        [PYTHON, "-m", "lepton_hpc", "doctor", "--run-dir", str(tmp_path / "runs")],
        cwd=ROOT,
        env=mpi_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_doctor_passes_here_with_one_line_per_check(tmp_path):
    res = doctor_cmd(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    names = [line[7:29].strip() for line in lines]
    for name in (
        "MPI library",
        "h5py parallel (mpio)",
        "GPU (numba.cuda)",
        "tuned CPU kernels",
        "horovod",
        "run directory",
        "mpirun",
        # with Slurm installed the srun check names the --mpi plugin to use; without, it says so
        "srun --mpi" if shutil.which("srun") else "srun",
    ):
        assert name in names, res.stdout
    assert all(line.startswith(("[  ok]", "[warn]")) for line in lines), res.stdout


def test_doctor_fails_when_mpirun_on_the_path_is_another_mpi(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mpirun").write_text(f"#!/bin/sh\ncat <<'EOF'\n{HYDRA}EOF\n")
    (fake / "mpirun").chmod(0o755)
    res = doctor_cmd(tmp_path, PATH=f"{fake}:{Path(PYTHON).parent}:{os.environ['PATH']}")
    assert res.returncode == 1, res.stdout + res.stderr
    line = next(x for x in res.stdout.splitlines() if "mpirun" in x[:30])
    assert line.startswith("[FAIL]") and "it is MPICH but mpi4py loaded Open MPI" in line


def test_doctor_fails_on_a_run_directory_it_cannot_write(tmp_path):
    (tmp_path / "runs").write_text("a file, not a folder")
    res = doctor_cmd(tmp_path)
    assert res.returncode == 1
    assert any(x.startswith("[FAIL] run directory") for x in res.stdout.splitlines()), res.stdout
