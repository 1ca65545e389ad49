"""The coordinator's policy without MPI: dynamic assignment, retries elsewhere, user errors."""

import pytest

from lepton_hpc.scheduler.queue import TaskQueue
from lepton_hpc.scheduler.tasks import Report, Task


def tasks(n):
    return [Task(f"t{i}", {"i": i}) for i in range(n)]


def ok(attempt):
    return Report(attempt.task.id, attempt.number, True, value=attempt.task.payload["i"])


def fail(attempt, retryable=True):
    return Report(attempt.task.id, attempt.number, False, error="boom", retryable=retryable)


def test_idle_workers_get_tasks_in_order_and_freed_workers_get_the_next():
    q = TaskQueue(tasks(5), workers=[1, 2], retries=1)
    handed = q.assign()
    assert [(w, a.task.id) for w, a in handed] == [(1, "t0"), (2, "t1")]
    assert q.assign() == []  # nobody idle
    q.complete(2, ok(handed[1][1]))
    assert [(w, a.task.id) for w, a in q.assign()] == [(2, "t2")]  # the free worker, not 1


def test_dynamic_assignment_keeps_a_slow_worker_to_its_one_task():
    q = TaskQueue(tasks(11), workers=[1, 2], retries=0)
    first = dict(q.assign())
    slow = first[1]  # worker 1 never finishes until the end
    while q.pending:
        (worker, attempt), = [(w, a) for w, a in q.running.items() if w == 2]  # fmt: skip
        q.complete(worker, ok(attempt))
        q.assign()
    q.complete(2, ok(q.running[2]))
    q.complete(1, ok(slow))
    assert q.finished
    assert [q.results[t.id].workers for t in tasks(11)].count([1]) == 1


def test_retry_goes_elsewhere_and_the_next_task_fills_the_idle_worker():
    q = TaskQueue(tasks(3), workers=[1, 2], retries=2)
    handed = dict(q.assign())
    q.complete(1, fail(handed[1]))
    assert [a.task.id for a in q.pending] == ["t0", "t2"]  # the retry goes first...
    handed2 = dict(q.assign())
    assert handed2[1].task.id == "t2"  # ...but not back to worker 1, which takes the next
    q.complete(2, ok(handed[2]))
    handed3 = dict(q.assign())
    assert handed3[2].task.id == "t0" and handed3[2].number == 2
    result, _ = q.complete(2, ok(handed3[2]))
    assert result.attempts == 2 and result.workers == [1, 2] and result.retried


def test_with_one_worker_the_retry_runs_there():
    q = TaskQueue(tasks(1), workers=[0], retries=1)
    ((w, a),) = q.assign()
    q.complete(w, fail(a))
    ((w, a),) = q.assign()
    assert w == 0 and a.number == 2


def test_retries_are_bounded_and_the_last_error_is_kept():
    q = TaskQueue(tasks(1), workers=[1, 2], retries=1)
    for _ in range(2):
        ((w, a),) = q.assign()
        result, _ = q.complete(w, fail(a))
    assert q.finished and result.status == "failed" and result.attempts == 2
    assert result.error == "boom" and sorted(result.workers) == [1, 2]


def test_user_errors_are_not_retried():
    q = TaskQueue(tasks(1), workers=[1, 2], retries=3)
    ((w, a),) = q.assign()
    result, retry = q.complete(w, fail(a, retryable=False))
    assert retry is None and result.status == "failed" and result.attempts == 1


def test_a_report_for_the_wrong_task_is_a_bug():
    q = TaskQueue(tasks(2), workers=[1, 2], retries=0)
    handed = dict(q.assign())
    with pytest.raises(RuntimeError):
        q.complete(1, ok(handed[2]))
