"""run_tasks on one rank (no MPI): the same queue, retries, journal and test hook as the farm."""

import io

import pytest

from lepton_hpc import testhooks
from lepton_hpc.comm.base import SerialComm
from lepton_hpc.errors import LeptonError
from lepton_hpc.log import Log
from lepton_hpc.scheduler import Task, run_tasks
from lepton_hpc.scheduler.farm import Layout, SchedulerError
from lepton_hpc.scheduler.progress import Progress
from lepton_hpc.scheduler.tasks import TaskResult
from lepton_hpc.testhooks import FailOnce


def quiet_log():
    return Log(0, 1, stream=io.StringIO())


def fail_once(monkeypatch, directory):
    """The hooks as ``lepton`` reads them at start-up with LEPTON_FAIL_ONCE=directory."""
    hooks = testhooks.parse({"LEPTON_FAIL_ONCE": str(directory)})
    monkeypatch.setitem(testhooks._current, "hooks", hooks)


def square(task, comm, log):
    if task.payload == "bug":
        raise ZeroDivisionError("a bug")
    if task.payload == "user":
        raise LeptonError("bad input")
    return task.payload**2


def test_results_come_back_in_task_order():
    tasks = [Task(f"t{i}", i) for i in range(5)]
    results = run_tasks(tasks, square, SerialComm(), quiet_log())
    assert [r.value for r in results] == [0, 1, 4, 9, 16]
    assert all(r.ok and r.attempts == 1 and not r.retried for r in results)


def test_fail_once_hook_fails_the_first_attempt_only(tmp_path, monkeypatch):
    fail_once(monkeypatch, tmp_path / "markers")
    (tmp_path / "markers").mkdir()
    (tmp_path / "markers" / "t1").touch()  # spared
    tasks = [Task(f"t{i}", i) for i in range(3)]
    results = run_tasks(tasks, square, SerialComm(), quiet_log(), retries=1)
    assert [r.value for r in results] == [0, 1, 4]
    assert [r.attempts for r in results] == [2, 1, 2]


def test_without_retries_an_injected_failure_stays_failed(tmp_path, monkeypatch):
    fail_once(monkeypatch, tmp_path)
    (result,) = run_tasks([Task("t", 3)], square, SerialComm(), quiet_log(), retries=0)
    assert result.status == "failed" and "LEPTON_FAIL_ONCE" in result.error


def test_bugs_are_retried_user_errors_are_not(capsys):
    tasks = [Task("bug", "bug"), Task("user", "user"), Task("fine", 2)]
    results = run_tasks(tasks, square, SerialComm(), quiet_log(), retries=2)
    assert [(r.status, r.attempts) for r in results] == [("failed", 3), ("failed", 1), ("ok", 1)]
    assert results[0].error == "ZeroDivisionError: a bug" and results[1].error == "bad input"
    err = capsys.readouterr().err
    assert "Traceback" in err and "task bug (attempt 3" in err and "bad input" in err


def test_the_journal_skips_finished_tasks(tmp_path):
    calls = []
    broken = {"t2": True}

    def counted(task, comm, log):
        calls.append(task.id)
        if broken.get(task.id):
            raise LeptonError("input not there yet")
        return task.payload

    tasks = [Task(f"t{i}", i) for i in range(4)]
    journal = tmp_path / "journal.jsonl"
    first = run_tasks(tasks, counted, SerialComm(), quiet_log(), journal=journal)
    assert [r.status for r in first] == ["ok", "ok", "failed", "ok"]
    calls.clear()
    broken.clear()
    again = run_tasks(tasks, counted, SerialComm(), quiet_log(), journal=journal)
    assert calls == ["t2"]  # only the failed task ran again
    assert [r.from_journal for r in again] == [True, True, False, True]
    assert [r.value for r in again] == [0, 1, 2, 3]


def test_bad_settings_are_errors():
    with pytest.raises(SchedulerError):
        run_tasks([Task("a"), Task("a")], square, SerialComm(), quiet_log())
    with pytest.raises(SchedulerError):
        run_tasks([Task("a", 1)], square, SerialComm(), quiet_log(), retries=-1)


@pytest.mark.parametrize(
    ("size", "per_task", "groups", "idle"),
    [
        (2, 1, [[1]], []),
        (3, 1, [[1], [2]], []),
        (5, 2, [[1, 2], [3, 4]], []),
        (6, 2, [[1, 2], [3, 4]], [5]),
        (4, 3, [[1, 2, 3]], []),
    ],
)
def test_layout_of_worker_groups(size, per_task, groups, idle):
    layout = Layout.of(size, per_task)
    assert layout.groups == groups and layout.idle == idle
    assert layout.leaders == [g[0] for g in groups]
    colors = [layout.color(r) for r in range(size)]
    assert colors[0] == 0 and all(colors[r] == i + 1 for i, g in enumerate(groups) for r in g)
    assert all(colors[r] == len(groups) + 1 for r in idle)


def test_progress_writes_a_line_per_event_when_not_a_terminal():
    out = io.StringIO()
    p = Progress("sweep", total=3, workers=2, stream=out, skipped=1)
    p.started()
    p.retrying("t1", 2, "boom")
    p.started()
    p.finished(TaskResult("t1", "ok", attempts=2, seconds=1.5))
    p.started()
    p.finished(TaskResult("t2", "failed", attempts=1, error="bad"))
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sweep: t1 failed (boom); retry 1")
    assert "t1 done in 1.5 s after 2 attempts" in lines[1]
    assert "t2 FAILED" in lines[2]
    assert lines[-1].startswith("sweep: 2/3 done, 0 running, 1 failed, 1 retried")
    assert "\r" not in out.getvalue()


def test_progress_redraws_one_line_on_a_terminal():
    out = io.StringIO()
    p = Progress("sweep", total=4, workers=2, stream=out, interactive=True)
    p.started()
    p.finished(TaskResult("t1", "ok", attempts=1, seconds=2.0))
    assert p.seconds_left() == pytest.approx(3 * 2.0 / 2)
    p.close()
    assert out.getvalue().count("\n") == 1 and "\r" in out.getvalue()


def test_fail_once_claims_each_id_once(tmp_path):
    hook = FailOnce(tmp_path / "m")
    assert hook.claim("a") and not hook.claim("a") and hook.claim("b")
    assert not FailOnce(None).claim("a")
    # a group: every rank looks before rank 0 claims, so all give the same answer
    group = FailOnce(tmp_path / "g")
    assert group.decide("a", SerialComm()) and not group.decide("a", SerialComm())
    assert (tmp_path / "g" / "a").exists() and not FailOnce(None).decide("a", SerialComm())
