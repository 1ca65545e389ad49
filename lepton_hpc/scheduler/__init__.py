"""The task farm: many independent tasks (sweep points, folds, files) over the ranks of one job.

- ``tasks``: ``Task`` (id + payload), attempt ``Report``, final ``TaskResult``;
- ``queue``: the coordinator's policy (dynamic assignment, retries on another worker), no MPI;
- ``journal``: finished tasks, appended and fsynced, so a rerun skips what is done;
- ``progress``: the rank-0 display (one redrawn line on a terminal, a line per event otherwise);
- ``farm``: ``run_tasks``, the coordinator and worker-group loops.

What the tasks are is the caller's business: ``lepton_hpc.sweep`` (training runs) and
``lepton_hpc.batch_predict`` (one file each) build tasks and hand them to ``run_tasks``.
"""

from .farm import run_tasks
from .journal import Journal
from .tasks import Task, TaskResult

__all__ = ["Journal", "Task", "TaskResult", "run_tasks"]
