"""The checkpoint mirror (``lepton_hpc.checkpoint.mirror``): background copies with rotation,
``--resume auto`` choosing the newest valid checkpoint of either directory, the refused mirror
paths, and a failed copy that is a warning while the primary keeps its checkpoint."""

import os
import threading

import pytest

from lepton_hpc.checkpoint import (
    MAY_CHANGE,
    Mirror,
    check_mirror,
    mirror_dir,
    read_checkpoint,
    resume_checkpoint,
    write_checkpoint,
)
from lepton_hpc.checkpoint import mirror as mirror_mod
from lepton_hpc.errors import LeptonError
from lepton_hpc.log import Log
from tests.unit.checkpoint_helpers import names, state, truncate

META = {"model": {"kind": "linear"}}


def mirrored_run(run, mirror, steps, keep=100, lineage=""):
    """A run writing a checkpoint at each of ``steps`` as the loop does: primary, then a copy."""
    s = state(steps[0], lineage=lineage, meta=META)
    m = Mirror.open(str(mirror), run, s, Log(), root=True)
    paths = []
    for step in steps:
        s.step = step
        path = write_checkpoint(run / "checkpoints", s, keep, floor=m.floor)
        m.copy(path, s, keep)
        assert m.wait(30)
        paths.append(path)
    return s, m, paths


def test_every_checkpoint_is_copied_with_its_name_and_rotated(tmp_path):
    run, mirror = tmp_path / "run", tmp_path / "backup"
    _, m, paths = mirrored_run(run, mirror, [1, 2, 3, 4], keep=2)
    assert m.directory == mirror_dir(str(mirror), run)
    assert m.directory.parent == mirror and m.directory.name.startswith("run-")
    assert (mirror / mirror_mod.MARKER).is_file()
    assert names(m.directory) == names(run / "checkpoints") == [p.name for p in paths[2:]]
    for p in paths[2:]:
        assert (m.directory / p.name).read_bytes() == p.read_bytes()
    assert not [p for p in m.directory.iterdir() if p.name.endswith(".tmp")]


def test_rotation_in_the_mirror_deletes_only_the_runs_own_checkpoints(tmp_path):
    run, mirror = tmp_path / "run", tmp_path / "backup"
    sub = mirror_dir(str(mirror), run)
    sub.mkdir(parents=True)
    (sub / "notes.txt").write_text("mine")
    s, m, _ = mirrored_run(run, mirror, [1], keep=1)
    foreign = write_checkpoint(sub, state(7, lineage="c3" * 8), 100)
    for step in (2, 3):
        s.step = step
        m.copy(write_checkpoint(run / "checkpoints", s, 1, floor=m.floor), s, 1)
        assert m.wait(30)
    assert (sub / "notes.txt").read_text() == "mine" and foreign.exists()
    assert len(names(sub)) == 2  # the foreign one and the newest of the run


def test_two_runs_mirroring_to_one_path_do_not_mix(tmp_path):
    mirror = tmp_path / "backup"
    mirrored_run(tmp_path / "a" / "run", mirror, [1, 2])
    mirrored_run(tmp_path / "b" / "run", mirror, [1])
    subs = sorted(p for p in mirror.iterdir() if p.is_dir())
    assert len(subs) == 2 and sorted(len(names(d)) for d in subs) == [1, 2]


def test_resume_auto_takes_the_newest_valid_of_either(tmp_path):
    run, mirror = tmp_path / "run", tmp_path / "backup"
    s, m, paths = mirrored_run(run, mirror, [1, 2, 3])
    ckpts = run / "checkpoints"
    # the primary is gone: the mirror's newest
    for p in paths:
        p.unlink()
    path, got = resume_checkpoint("auto", ckpts, META, Log(), m.directory)
    assert path == m.directory / paths[-1].name and got.step == 3 and got.lineage == s.lineage
    # both have it: the primary's file is taken
    _, m2, paths2 = mirrored_run(tmp_path / "run2", mirror, [1, 2])
    path, _ = resume_checkpoint(
        "auto", tmp_path / "run2" / "checkpoints", META, Log(), m2.directory
    )
    assert path == paths2[-1]


def test_damaged_primary_falls_back_to_the_mirror_and_damaged_mirror_to_the_primary(
    tmp_path, capsys
):
    run, mirror = tmp_path / "run", tmp_path / "backup"
    _, m, paths = mirrored_run(run, mirror, [1, 2, 3])
    ckpts = run / "checkpoints"
    truncate(paths[-1])
    path, got = resume_checkpoint("auto", ckpts, META, Log(), m.directory)
    assert path == m.directory / paths[-1].name and got.step == 3
    assert paths[-1].name in capsys.readouterr().err
    truncate(path)  # now both copies of step 3 are damaged: step 2, from the primary
    path, got = resume_checkpoint("auto", ckpts, META, Log(), m.directory)
    assert path == paths[-2] and got.step == 2
    err = capsys.readouterr().err
    assert err.count("trying the previous one") == 2


def test_damaged_mirror_copy_falls_back_to_the_primary(tmp_path):
    run, mirror = tmp_path / "run", tmp_path / "backup"
    _, m, paths = mirrored_run(run, mirror, [1, 2])
    paths[-1].unlink()
    truncate(m.directory / paths[-1].name)
    path, got = resume_checkpoint("auto", run / "checkpoints", META, Log(), m.directory)
    assert path == paths[0] and got.step == 1


def test_all_damaged_is_an_error_naming_both_directories(tmp_path):
    run, mirror = tmp_path / "run", tmp_path / "backup"
    _, m, paths = mirrored_run(run, mirror, [1])
    truncate(paths[0])
    truncate(m.directory / paths[0].name)
    with pytest.raises(LeptonError, match="none is valid") as info:
        resume_checkpoint("auto", run / "checkpoints", META, Log(), m.directory)
    assert str(m.directory) in str(info.value) and str(run / "checkpoints") in str(info.value)


def test_a_fresh_run_sets_old_copies_aside(tmp_path):
    run, mirror = tmp_path / "run", tmp_path / "backup"
    _, _, paths = mirrored_run(run, mirror, [1, 2, 3])
    for p in paths:  # the run directory is replaced (a new run at the same path)
        p.unlink()
    _, m2, new = mirrored_run(run, mirror, [1])
    assert names(m2.directory) == [new[0].name]
    (aside,) = [d for d in m2.directory.iterdir() if d.name.startswith("aside-")]
    assert sorted(p.name for p in aside.iterdir()) == [p.name for p in paths]
    path, _ = resume_checkpoint("auto", run / "checkpoints", META, Log(), m2.directory)
    assert path == new[0]


def test_new_checkpoints_are_numbered_above_every_name_in_the_mirror(tmp_path):
    run, mirror = tmp_path / "run", tmp_path / "backup"
    sub = mirror_dir(str(mirror), run)
    for step in (5, 6, 7):  # copies of another branch, numbered 1..3
        write_checkpoint(sub, state(step, lineage="c3" * 8), 100)
    _, _, new = mirrored_run(run, mirror, [5], lineage="d4" * 8)  # a resumed branch
    assert new[0].name == "ckpt-00000004-0000000005.h5"  # never the name of another copy
    assert len(names(sub)) == 4


def test_resume_from_an_older_checkpoint_sets_later_copies_aside_in_the_mirror(tmp_path):
    run, mirror = tmp_path / "run", tmp_path / "backup"
    _, m, paths = mirrored_run(run, mirror, [1, 2, 3])
    path, st = resume_checkpoint(str(paths[0]), run / "checkpoints", META, Log(), m.directory)
    assert path == paths[0] and st.parent["seq"] == 1
    assert names(run / "checkpoints") == names(m.directory) == [paths[0].name]
    path, _ = resume_checkpoint("auto", run / "checkpoints", META, Log(), m.directory)
    assert path == paths[0]


def test_refused_mirrors(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    data = tmp_path / "train.h5"
    data.write_bytes(b"x")
    for bad, said in (
        (run / "checkpoints", "inside the run's checkpoints directory"),
        (run / "checkpoints" / "copy", "inside the run's checkpoints directory"),
        (data, "is a file"),
    ):
        with pytest.raises(LeptonError, match=said):
            check_mirror(str(bad), run, {"data.train": str(data)})
    inputs_dir = tmp_path / "inputs"
    inputs_dir.mkdir()
    with pytest.raises(LeptonError, match="is the input"):
        check_mirror(str(inputs_dir), run, {"data.train": str(inputs_dir)})
    check_mirror(str(tmp_path / "backup"), run, {"data.train": str(data)})
    check_mirror("", run, {})
    assert "checkpoint.mirror" in MAY_CHANGE


def test_a_failed_copy_is_a_warning_and_the_primary_keeps_its_checkpoint(tmp_path, capsys):
    run, mirror = tmp_path / "run", tmp_path / "backup"
    mirror.mkdir()
    mirror.chmod(0o500)  # read-only: the run's subdirectory cannot be made
    if os.access(mirror, os.W_OK):  # root writes anyway: a mirror below a file fails alike
        (tmp_path / "plain").write_text("")
        mirror = tmp_path / "plain" / "backup"
    try:
        _, _, paths = mirrored_run(run, mirror, [1, 2])
    finally:
        (tmp_path / "backup").chmod(0o700)
    assert read_checkpoint(paths[-1]).step == 2
    assert names(run / "checkpoints") == [p.name for p in paths]
    err = capsys.readouterr().err
    assert err.count("checkpoint mirror: could not copy") == 2


def test_an_oserror_while_copying_is_a_warning(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mirror_mod.shutil, "copyfileobj", refuse)
    run, mirror = tmp_path / "run", tmp_path / "backup"
    _, m, paths = mirrored_run(run, mirror, [1])
    assert read_checkpoint(paths[0]).step == 1 and names(m.directory) == []
    assert "No space left on device" in capsys.readouterr().err
    assert not list(m.directory.glob(".*.tmp"))


def test_a_hanging_mirror_is_waited_for_a_bounded_time(tmp_path, capsys, monkeypatch):
    release = threading.Event()

    def hang(src, dst, *args):
        release.wait(10)

    monkeypatch.setattr(mirror_mod.shutil, "copyfileobj", hang)
    run, mirror = tmp_path / "run", tmp_path / "backup"
    s = state(1, lineage="", meta=META)
    m = Mirror.open(str(mirror), run, s, Log(), root=True)
    path = write_checkpoint(run / "checkpoints", s, 3, floor=m.floor)
    m.copy(path, s, 3)
    assert m.wait(0.2) is False
    assert "still pending after 0.2 s" in capsys.readouterr().err
    release.set()
    thread = m._thread
    assert m.close(10)
    thread.join(10)
    assert not thread.is_alive()  # closed: the copying thread has ended
    s.step = 2
    path = write_checkpoint(run / "checkpoints", s, 3, floor=m.floor)
    m.copy(path, s, 3)  # a copy after close starts a new thread
    assert m.close(10) and (m.directory / path.name).is_file()


def test_no_mirror_and_other_ranks_do_nothing(tmp_path):
    s = state(1, lineage="", meta=META)
    for m in (
        Mirror.open("", tmp_path / "run", s, Log(), root=True),
        Mirror.open(str(tmp_path / "b"), tmp_path / "run", s, Log(), root=False),
    ):
        assert m.directory is None and m.floor == 0
        m.copy(tmp_path / "nothing.h5", s, 3)
        assert m.wait(0)
    assert not (tmp_path / "b").exists()
