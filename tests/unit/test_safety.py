"""The one owner of writes and deletes (no MPI): atomic files, strict JSON, input guards, run
directories and their lock."""

import errno
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lepton_hpc import rundir, safety
from lepton_hpc.errors import LeptonError
from lepton_hpc.results import RunDir
from lepton_hpc.safety import (
    LOCK,
    MARKER,
    RunLock,
    WriteError,
    atomic_file,
    atomic_write_text,
    check_no_input_inside,
    check_not_input,
    check_run_dir,
    clear_run_dir,
    create_run_dir,
    same_path,
    temp_path,
    write_json,
)

PYTHON = sys.executable


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---- atomic files -------------------------------------------------------------------------
def test_atomic_file_replaces_only_on_success(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("old")

    def fail_halfway():
        with atomic_file(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_halfway()
    assert final.read_text() == "old"
    assert leftovers(tmp_path) == []
    with atomic_file(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp")
        tmp.write_text("new")
    assert final.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


class FullDisk:
    """A file object whose writes fail as on a full disk (after a partial first write)."""

    def __init__(self, path, code):
        self.fh = open(path, "w")  # noqa: SIM115
        self.code = code

    def write(self, text):
        self.fh.write(text[:3])
        self.fh.flush()
        raise OSError(self.code, os.strerror(self.code))

    def close(self):
        self.fh.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_atomic_file_leaves_no_temporary_on_a_full_disk(tmp_path, code):
    final = tmp_path / "status.json"

    def write():
        with atomic_file(final) as tmp:
            fh = FullDisk(tmp, code)
            try:
                fh.write("{ a long document }")
            finally:
                fh.close()

    with pytest.raises(WriteError, match=os.strerror(code)) as info:
        write()
    assert f"cannot write '{final}'" in str(info.value)  # one line naming the file
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_in_a_subprocess_leaves_nothing(tmp_path):
    """A real EFBIG from the kernel (RLIMIT_FSIZE), in a child so the limit stays there."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from lepton_hpc.safety import WriteError, atomic_write_text
        try:
            atomic_write_text(Path({str(tmp_path / "big.txt")!r}), "x" * 100_000)
        except WriteError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    res = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, check=False)
    assert res.returncode == 3, res.stdout + res.stderr
    assert os.strerror(errno.EFBIG) in res.stdout and "big.txt" in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_are_per_process(tmp_path):
    final = tmp_path / "status.json"
    code = f"from lepton_hpc.safety import temp_path; print(temp_path({str(final)!r}))"
    other = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    mine = temp_path(final)
    assert other.stdout.strip() != str(mine)
    assert mine.parent == tmp_path
    assert str(os.getpid()) in mine.name and mine.name.startswith(".status.json.")


def test_run_dir_status_uses_the_per_process_name(tmp_path, monkeypatch):
    seen = []
    real = safety.commit
    monkeypatch.setattr(safety, "commit", lambda tmp, final: (seen.append(tmp), real(tmp, final)))
    RunDir(tmp_path).status("running", step=3)
    assert seen == [temp_path(tmp_path / "status.json")]
    assert json.loads((tmp_path / "status.json").read_text())["step"] == 3


def test_strict_json_nan_and_inf_become_null(tmp_path):
    path = tmp_path / "r.json"
    obj = {
        "loss": float("nan"),
        "hi": float("inf"),
        "np": np.float32("-inf"),
        "ok": np.float64(0.5),
        "n": np.int64(3),
        "arr": np.array([1.0, np.nan]),
        "nested": [{"x": math.nan}, (1, float("inf"))],
        "path": tmp_path,
    }
    write_json(path, obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert back == {
        "loss": None,
        "hi": None,
        "np": None,
        "ok": 0.5,
        "n": 3,
        "arr": [1.0, None],
        "nested": [{"x": None}, [1, None]],
        "path": str(tmp_path),
    }


def test_atomic_write_text_overwrites(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and leftovers(tmp_path) == []


# ---- input guards -------------------------------------------------------------------------
def test_check_not_input_sees_through_symlinks_and_hard_links(tmp_path):
    data = tmp_path / "data.h5"
    data.write_bytes(b"precious")
    link = tmp_path / "link.h5"
    link.symlink_to(data)
    hard = tmp_path / "hard.h5"
    os.link(data, hard)
    for out in (data, link, hard, tmp_path / "sub" / ".." / "data.h5"):
        with pytest.raises(LeptonError) as info:
            check_not_input(out, {"data": data}, "--out")
        msg = str(info.value)
        assert f"--out '{out}' is the input data file '{data}'" in msg
        assert "refusing to overwrite an input" in msg
    check_not_input(tmp_path / "new.h5", {"data": data, "model": tmp_path / "m.h5"}, "--out")
    assert same_path(link, hard) and not same_path(data, tmp_path / "new.h5")


def test_check_no_input_inside(tmp_path):
    (tmp_path / "proj").mkdir()
    cfg = tmp_path / "proj" / "c.toml"
    cfg.write_text("x")
    with pytest.raises(LeptonError, match="holds the input config file"):
        check_no_input_inside(tmp_path / "proj", {"config": cfg}, "run directory")
    with pytest.raises(LeptonError, match="holds the input"):
        check_no_input_inside(tmp_path, {"config": cfg}, "run directory")
    check_no_input_inside(tmp_path / "projX", {"config": cfg}, "run directory")


# ---- run directories ----------------------------------------------------------------------
def fill_run(run):
    """A finished run directory with every kind of toolkit file, plus a user's notes."""
    for name in safety.RUN_FILES:
        (run / name).write_text(name)
    (run / "checkpoints" / "aside-1").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-0000000003.h5").write_text("c")
    (run / "checkpoints" / "aside-1" / "ckpt-0000000001.h5").write_text("c")
    (run / ".status.json.host.1.tmp").write_text("t")
    (run / "notes.txt").write_text("my notes")


def test_overwrite_clears_only_toolkit_files_of_a_marked_run(tmp_path):
    run = tmp_path / "run"
    create_run_dir(run, overwrite=False).release()
    marker = (run / MARKER).read_text()
    info = json.loads(marker)
    assert info["pid"] == os.getpid() and "lepton_version" in info and "host" in info
    fill_run(run)
    (run / "checkpoints" / "mine.txt").write_text("keep")
    check_run_dir(run, resume=False, overwrite=True)
    lock = create_run_dir(run, overwrite=True)
    try:
        assert lock.locked
        left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
        assert left == [LOCK, MARKER, "checkpoints", "checkpoints/mine.txt", "notes.txt"]
        assert (run / "notes.txt").read_text() == "my notes"
        assert (run / MARKER).read_text() == marker
    finally:
        lock.release()


def test_clear_never_removes_an_input(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fill_run(run)
    removed = clear_run_dir(run, {"data": run / "model.h5"})
    assert (run / "model.h5").exists() and run / "model.h5" not in removed
    assert not (run / "results.json").exists()
    assert not (run / "checkpoints").exists()


def test_unmarked_directory_is_refused_and_untouched(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "model.h5").write_text("the user's own model")
    (proj / "notes.txt").write_text("n")
    for resume, overwrite in ((False, False), (False, True)):
        with pytest.raises(LeptonError) as info:
            check_run_dir(proj, resume=resume, overwrite=overwrite)
        msg = str(info.value)
        assert f"'{proj}'" in msg
        if overwrite:
            assert "is not a lepton run directory (no .lepton-run marker)" in msg
        else:
            assert "choose a new output.dir" in msg and "--resume auto" in msg
            assert "--overwrite" not in msg  # never recommended for a directory not ours
    with pytest.raises(LeptonError, match="not a lepton run directory"):
        create_run_dir(proj, overwrite=True)
    assert sorted(p.name for p in proj.iterdir()) == ["model.h5", "notes.txt"]


def test_marked_run_recommends_overwrite_and_refuses_inputs_inside(tmp_path):
    run = tmp_path / "run"
    create_run_dir(run, overwrite=False).release()
    (run / "status.json").write_text("{}")
    with pytest.raises(LeptonError, match="--overwrite"):
        check_run_dir(run, resume=False, overwrite=False)
    cfg = run / "c.toml"
    cfg.write_text("x")
    with pytest.raises(LeptonError, match="holds the input config file"):
        check_run_dir(run, resume=False, overwrite=True, inputs={"config": cfg})
    with pytest.raises(LeptonError, match="holds the input config file"):
        create_run_dir(run, overwrite=True, inputs={"config": cfg})
    assert (run / "status.json").exists() and cfg.exists()


def test_existing_file_and_unwritable_parent(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(LeptonError, match="is a file"):
        check_run_dir(f, resume=False, overwrite=True)
    with pytest.raises(LeptonError, match=f"'{f}' is a file"):
        check_run_dir(f / "run", resume=False, overwrite=False)


HOLD = """
import sys, time
from pathlib import Path
from lepton_hpc.safety import create_run_dir
lock = create_run_dir(Path(sys.argv[1]), overwrite=False)
print("locked", flush=True)
sys.stdin.read()
"""


def test_run_lock_second_process_fails_naming_the_holder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LeptonError) as info:
            RunLock(run)
        msg = str(info.value)
        assert f"run directory '{run}' is in use by pid {holder.pid} on host" in msg
        assert "(Slurm job 4242) since 20" in msg
        with pytest.raises(LeptonError, match=f"in use by pid {holder.pid}"):
            check_run_dir(run, resume=True, overwrite=False)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with RunLock(run) as lock:  # released by the holder's exit: free again
        assert lock.locked and not lock.warning
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    assert (run / LOCK).exists()


def test_run_lock_without_flock_warns(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    lock = create_run_dir(tmp_path / "run", overwrite=False)
    assert not lock.locked
    assert "does not support flock" in lock.warning and "No locks available" in lock.warning
    lock.release()


# ---- temporaries left by a writer that died -------------------------------------------------
def test_only_abandoned_toolkit_temporaries_are_removed(tmp_path):
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead, host = proc.pid, socket.gethostname()
    old = time.time() - 2 * safety.STALE_TEMP_S
    gone = [
        tmp_path / f".ckpt-00000002-0000000020.h5.{host}.{dead}.tmp",
        tmp_path / f".ckpt-0000000020.h5.{host}.{dead}.tmp",  # a format-1 name
        tmp_path / f".status.json.{host}.{dead}.tmp",
        tmp_path / f".model.h5.node7.cluster.example.{dead}.tmp",  # another host, old
    ]
    kept = [
        tmp_path / f".ckpt-00000003-0000000030.h5.{host}.{os.getpid()}.tmp",  # being written
        tmp_path / f".ckpt-00000003-0000000030.h5.node7.{dead}.tmp",  # another host, recent
        tmp_path / f".mydata.h5.{host}.{dead}.tmp",  # not a name the toolkit writes
        tmp_path / ".notes.tmp",
        tmp_path / f"ckpt-00000002-0000000020.h5.{host}.{dead}.tmp",  # no leading dot
    ]
    for f in gone + kept:
        f.write_bytes(b"x")
    os.utime(gone[3], (old, old))
    target = tmp_path / "target"
    target.write_text("the user's")
    link = tmp_path / f".results.json.{host}.{dead}.tmp"
    link.symlink_to(target)  # a link is never followed nor removed
    folder = tmp_path / f".metrics.jsonl.{host}.{dead}.tmp"
    folder.mkdir()
    assert sorted(safety.remove_leftover_temporaries(tmp_path)) == sorted(gone)
    assert not any(f.exists() for f in gone)
    assert all(f.exists() for f in kept) and link.is_symlink() and folder.is_dir()
    assert target.read_text() == "the user's"
    assert safety.remove_leftover_temporaries(tmp_path / "missing") == []


def test_only_scratch_directories_of_the_toolkit_are_removed(tmp_path):
    scratch = safety.make_scratch_dir(tmp_path)
    (scratch / "run").mkdir()
    (scratch / "run" / "model.h5").write_bytes(b"x")
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    link = tmp_path / f"{safety.SCRATCH_PREFIX}link"
    link.symlink_to(mine)
    for wrong in (mine, link, tmp_path):
        with pytest.raises(ValueError, match="not a scratch directory"):
            safety.remove_scratch_dir(wrong)
    assert (mine / "keep.txt").read_text() == "mine"
    safety.remove_scratch_dir(scratch)
    assert not scratch.exists() and link.is_symlink()


# ---- a job killed while it creates its run directory ----------------------------------------
def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_run_dir_is_created_with_its_marker_in_one_step(tmp_path, monkeypatch):
    run = tmp_path / "sweep" / "task-0003"
    seen = []
    real_rename = os.rename

    def watch(src, dst):  # the directory appears only once its marker is in it
        seen.append(sorted(p.name for p in os.scandir(src)))
        real_rename(src, dst)

    monkeypatch.setattr(safety.os, "rename", watch)
    create_run_dir(run, overwrite=False).release()
    assert seen == [[MARKER]]
    assert (run / MARKER).is_file()
    assert sorted(p.name for p in run.parent.iterdir()) == ["task-0003"]  # no temporary left


def test_a_kill_during_creation_leaves_nothing_a_retry_refuses(tmp_path):
    """What a job killed at each point of the creation leaves, and the retry (--overwrite, as
    the sweep does) that must take the directory."""
    host, dead = socket.gethostname(), _dead_pid()
    out = tmp_path / "out"
    out.mkdir()
    # killed after the temporary sibling got its marker, before the rename
    half = out / f".task-0001.{host}.{dead}.tmp"
    half.mkdir()
    (half / MARKER).write_text("{}")
    # killed while writing the marker into the temporary sibling
    early = out / f".task-0002.{host}.{dead}.tmp"
    early.mkdir()
    (early / f".{MARKER}.{host}.{dead}.tmp").write_text("{")
    # an existing empty directory, killed while its marker was written
    empty = out / "task-0003"
    empty.mkdir()
    (empty / f".{MARKER}.{host}.{dead}.tmp").write_text("{")
    for name in ("task-0001", "task-0002", "task-0003"):
        check_run_dir(out / name, resume=False, overwrite=True)
        create_run_dir(out / name, overwrite=True).release()
        assert (out / name / MARKER).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["task-0001", "task-0002", "task-0003"]
    # a sibling that holds more than a marker is not the toolkit's leftover: it stays
    user = out / f".task-0004.{host}.{dead}.tmp"
    user.mkdir()
    (user / "data.h5").write_text("the user's")
    create_run_dir(out / "task-0004", overwrite=False).release()
    assert (user / "data.h5").read_text() == "the user's"
    # a live writer's temporary marker makes the directory in use, not empty
    busy = out / "task-0005"
    busy.mkdir()
    (busy / f".{MARKER}.{host}.{os.getpid()}.tmp").write_text("{")
    with pytest.raises(LeptonError, match="not a lepton run directory"):
        check_run_dir(busy, resume=False, overwrite=True)


def test_a_sweep_task_directory_appears_with_its_marker(tmp_path, monkeypatch):
    """The sweep makes each task's run directory before the run starts: in one step too."""
    from lepton_hpc.sweep import command

    seen = []
    real_rename = os.rename

    def watch(src, dst):
        seen.append(sorted(p.name for p in os.scandir(src)))
        real_rename(src, dst)

    monkeypatch.setattr(safety.os, "rename", watch)
    task = tmp_path / "out" / "task-0003"
    command._make_task_dir(task)
    command._make_task_dir(task)  # an existing one is left as it is
    assert seen == [[MARKER]] and (task / MARKER).is_file()
    assert sorted(p.name for p in task.parent.iterdir()) == ["task-0003"]
