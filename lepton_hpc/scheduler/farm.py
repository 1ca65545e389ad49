"""Run a list of tasks on the job's ranks: rank 0 coordinates, worker groups compute.

``run_tasks`` is the one entry point. With one rank it runs the tasks itself, in order. With more,
rank 0 only coordinates: ranks 1.. are split into worker groups of ``ranks_per_task`` ranks (a
task is then itself a data-parallel run over its group), and rank 0 hands the next task to
whichever group is idle first, collects the reports, retries failures on another group, and
journals each result. Every rank returns the same list of results, in task order.

Why a small hand-written protocol instead of ``mpi4py.futures.MPICommExecutor``:
- retry elsewhere: an executor hides which worker ran a future and cannot steer a resubmission
  away from it, so a retry may land on the worker that just failed;
- worker groups: the executor's workers are single ranks reached through an intercommunicator;
  a group of ranks acting as one worker would have to live outside it (followers parked in a
  broadcast) and be found by the pickled task function through process-global state;
- polite waiting and threads: its master runs in a helper thread on rank 0 (serialised by a lock
  below MPI_THREAD_MULTIPLE) and blocking MPI receives spin a core each; here every wait polls
  and sleeps (``lepton_hpc.comm.messages``), which matters when ranks share cores.
The protocol is three tags on the world communicator, all between rank 0 and group leaders:
``TASK`` (task, attempt) and ``STOP`` from rank 0, ``RESULT`` (a ``Report``) back.
A leader re-broadcasts what it received to its group, and the group runs the task on a fresh
duplicate of its communicator, so a failed task's stray messages cannot reach the next one.
The ``LEPTON_FAIL_ONCE`` test hook (``lepton_hpc.testhooks``) is applied by every rank of the
group on its own; nothing about it is in the messages.

A task that raises is caught on every rank (an escaped exception would leave the other ranks
waiting forever). The group then counts its failures with a non-blocking allreduce: a failing
rank waits for its peers at most ``group_sync_s`` seconds; if they do not come they are stuck in
a collective of the failed task, and the job is aborted (a rerun resumes from the journal).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..comm.base import Communicator
from ..errors import EXIT_FAILED, LeptonError
from ..log import Log
from ..testhooks import FAIL_ONCE_ENV, FailOnce, InjectedFailure
from .journal import Journal
from .progress import Progress
from .queue import TaskQueue
from .tasks import Report, Task, TaskFunction, TaskResult

TAG_TASK, TAG_RESULT, TAG_STOP = 11, 12, 13


class SchedulerError(LeptonError):
    """A bad scheduler setting; every rank sees it at the same time."""

    collective = True


@dataclass(frozen=True, slots=True)
class Layout:
    """Rank 0 coordinates; ranks 1.. form groups of ``ranks_per_task``; leftover ranks idle."""

    groups: list[list[int]]
    idle: list[int]

    @classmethod
    def of(cls, size: int, ranks_per_task: int) -> Layout:
        workers = list(range(1, size))
        n = len(workers) // ranks_per_task
        groups = [workers[i * ranks_per_task : (i + 1) * ranks_per_task] for i in range(n)]
        return cls(groups, workers[n * ranks_per_task :])

    @property
    def leaders(self) -> list[int]:
        return [g[0] for g in self.groups]

    def color(self, rank: int) -> int:
        """Split colour: 0 for rank 0, 1 + group index for workers, after that for idle ranks."""
        for i, group in enumerate(self.groups):
            if rank in group:
                return i + 1
        return 0 if rank == 0 else len(self.groups) + 1


def run_tasks(
    tasks: Sequence[Task],
    run_one: TaskFunction,
    comm: Communicator,
    log: Log,
    *,
    ranks_per_task: int = 1,
    retries: int = 1,
    journal: str | Path | None = None,
    title: str = "tasks",
    group_sync_s: float = 60.0,
) -> list[TaskResult]:
    """Run ``run_one(task, group_comm, log)`` for every task; the results, in task order.

    ``journal``: a JSON-lines file (rank 0 writes it); tasks it records as done with the same
    payload are not run again, their results are read back (``from_journal``).
    """
    tasks = list(tasks)
    if ranks_per_task < 1 or retries < 0:
        raise SchedulerError(f"ranks_per_task ({ranks_per_task}) must be >= 1, retries >= 0")
    if len({t.id for t in tasks}) != len(tasks):
        raise SchedulerError("task ids must be unique")
    if comm.size > 1 and comm.size - 1 < ranks_per_task:
        raise SchedulerError(
            f"ranks_per_task = {ranks_per_task} needs at least {ranks_per_task + 1} ranks "
            f"(rank 0 coordinates), this job has {comm.size}"
        )
    if comm.size == 1:
        if ranks_per_task > 1:
            log.warning(
                f"one rank: running each task on it alone (ranks_per_task = {ranks_per_task})"
            )
        return _run_here(tasks, run_one, comm, log, retries, journal, title)
    return _run_farm(
        tasks, run_one, comm, log, ranks_per_task, retries, journal, title, group_sync_s
    )


# ---- one rank: the same queue and journal, the tasks run in place ----------------------------
def _run_here(tasks, run_one, comm, log, retries, journal_path, title) -> list[TaskResult]:
    journal = Journal(journal_path) if journal_path else None
    done = journal.finished(tasks) if journal else {}
    progress = _start(title, tasks, done, 1, 1, log)
    queue = TaskQueue([t for t in tasks if t.id not in done], [0], retries)
    hook = FailOnce.from_env()
    try:
        while not queue.finished:
            for worker, attempt in queue.assign():
                progress.started()
                inject = hook.decide(attempt.task.id, comm)
                report = attempt_task(attempt.task, attempt.number, inject, comm, run_one)
                _record(queue, worker, report, journal, progress)
    finally:
        if journal:
            journal.close()
    progress.close()
    return [done.get(t.id) or queue.results[t.id] for t in tasks]


# ---- several ranks: coordinator and worker groups -----------------------------------------
def _run_farm(tasks, run_one, comm, log, ranks_per_task, retries, journal_path, title, sync_s):
    from ..comm.messages import polite_bcast, release

    layout = Layout.of(comm.size, ranks_per_task)
    group = comm.split(layout.color(comm.rank), key=comm.rank)
    # Threads and GPUs are shared by all ranks of the node, not only by this task's group.
    group.node_rank, group.node_size = comm.node_rank, comm.node_size
    results = None
    if comm.rank == 0:
        if layout.idle:
            log.warning(
                f"{len(layout.idle)} rank(s) idle: {comm.size - 1} workers do not split into "
                f"groups of {ranks_per_task}"
            )
        results = _coordinate(tasks, layout, comm, log, retries, journal_path, title)
    elif layout.color(comm.rank) <= len(layout.groups):  # idle leftover ranks skip this
        _work(run_one, group, comm, sync_s)
    results = polite_bcast(comm, results)
    release(group)
    return results


def _coordinate(tasks, layout, comm, log, retries, journal_path, title) -> list[TaskResult]:
    from ..comm.messages import Mailbox

    journal = Journal(journal_path) if journal_path else None
    done = journal.finished(tasks) if journal else {}
    progress = _start(title, tasks, done, len(layout.groups), len(layout.groups[0]), log)
    queue = TaskQueue([t for t in tasks if t.id not in done], layout.leaders, retries)
    mailbox = Mailbox(comm)
    try:
        while not queue.finished:
            for worker, attempt in queue.assign():
                mailbox.send((attempt.task, attempt.number), worker, TAG_TASK)
                progress.started()
            report, source, _ = mailbox.receive(tag=TAG_RESULT)
            _record(queue, source, report, journal, progress)
        for leader in layout.leaders:
            mailbox.send(None, leader, TAG_STOP)
    finally:
        if journal:
            journal.close()
    progress.close()
    return [done.get(t.id) or queue.results[t.id] for t in tasks]


def _work(run_one: TaskFunction, group: Communicator, world: Communicator, sync_s: float) -> None:
    """A worker group's loop: the leader receives, the group follows, the leader reports."""
    from ..comm.messages import Mailbox, duplicate, polite_bcast, release, sum_flags

    leader = group.rank == 0
    mailbox = Mailbox(world) if leader else None
    hook = FailOnce.from_env()
    while True:
        order = None
        if mailbox is not None:
            message, _, tag = mailbox.receive(source=0)
            if tag == TAG_TASK:
                order = message  # (task, attempt number)
        order = polite_bcast(group, order)
        if order is None:
            return
        task, number = order
        task_comm = duplicate(group)
        inject = hook.decide(task.id, task_comm)
        report = attempt_task(task, number, inject, task_comm, run_one, world_rank=world.rank)
        user_error = not report.ok and not report.retryable
        counts = sum_flags(group, [not report.ok, user_error], None if report.ok else sync_s)
        if counts is None:
            Log(world.rank, world.size).error(
                f"task {task.id}: the other ranks of its group did not finish it within "
                f"{sync_s:g} s (blocked in a collective); ending the job, rerun to resume"
            )
            world.abort(EXIT_FAILED)
        release(task_comm)
        if report.ok and counts[0]:
            report = Report(
                task.id,
                number,
                ok=False,
                error=f"{counts[0]} rank(s) of the group failed (see their error lines)",
                retryable=counts[1] == 0,
                seconds=report.seconds,
            )
        if mailbox is not None:
            mailbox.send(report, 0, TAG_RESULT)


# ---- shared by both paths -------------------------------------------------------------------
def attempt_task(
    task: Task,
    number: int,
    inject: bool,
    comm: Communicator,
    run_one: TaskFunction,
    *,
    world_rank: int = 0,
) -> Report:
    """Run one attempt of ``task`` on ``comm``; every exception is caught and reported."""
    log = Log(comm.rank, comm.size)
    where = f"task {task.id} (attempt {number}, rank {world_rank})"
    t0 = time.perf_counter()
    try:
        if inject:
            raise InjectedFailure(f"injected failure ({FAIL_ONCE_ENV} test hook)")
        value = run_one(task, comm, log)
    except InjectedFailure as exc:
        return Report(task.id, number, False, error=str(exc), seconds=time.perf_counter() - t0)
    except LeptonError as exc:  # the user's to fix: it would fail again, so it is not retried
        if comm.is_root or not exc.collective:
            print(f"lepton: error in {where}: {exc}", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - t0
        return Report(task.id, number, False, error=str(exc), retryable=False, seconds=seconds)
    except Exception as exc:  # noqa: BLE001 - a bug or transient failure: shown, then retried
        tb = "".join(traceback.format_exception(exc))
        print(f"lepton: unexpected error in {where}:\n{tb}", file=sys.stderr, flush=True)
        error = f"{type(exc).__name__}: {exc}"
        return Report(task.id, number, False, error=error, seconds=time.perf_counter() - t0)
    return Report(task.id, number, True, value=value, seconds=time.perf_counter() - t0)


def _start(title, tasks, done, n_groups, group_size, log) -> Progress:
    todo = len(tasks) - len(done)
    skipped = f", {len(done)} already done (journal)" if done else ""
    where = (
        "on this rank"
        if n_groups == 1 and group_size == 1 and log.size == 1
        else f"on {n_groups} worker group(s) of {group_size} rank(s)"
    )
    log.info(f"{title}: {len(tasks)} task(s){skipped}; running {todo} {where}")
    return Progress(title, len(tasks), n_groups, log.stream, skipped=len(done))


def _record(queue: TaskQueue, worker: int, report: Report, journal, progress: Progress) -> None:
    result, retry = queue.complete(worker, report)
    if retry is not None:
        progress.retrying(retry.task.id, retry.number, report.error)
        return
    assert result is not None
    if journal is not None:
        journal.append(result, queue.tasks[result.id].key)
    progress.finished(result)
