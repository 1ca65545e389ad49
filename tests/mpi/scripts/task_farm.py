"""Run plain-Python tasks through the task farm and print a JSON report (rank 0, last line).

Usage: task_farm.py SPEC.json
SPEC: {"tasks": [{"id": "t0", "cost": 0.1, "value": 3, "fail": "never|always|user|one_rank"}],
       "retries": 1, "ranks_per_task": 1, "journal": path or null, "counters": dir or null,
       "group_sync_s": 60}
A task sleeps ``cost`` seconds, appends a line to counters/<id> (a run counter across reruns)
and returns value**2 plus the size of its group communicator (all ranks of a group must agree).
"""

import json
import sys
import time
from pathlib import Path

from lepton_hpc.comm import world
from lepton_hpc.errors import LeptonError
from lepton_hpc.log import Log
from lepton_hpc.scheduler import Task, run_tasks


def run_one(task, comm, log):
    spec = task.payload
    if spec.get("counters"):
        with open(Path(spec["counters"]) / task.id, "a") as fh:
            fh.write(f"rank {comm.rank}\n")
    time.sleep(spec.get("cost", 0.0))
    if spec.get("fail") == "always":
        raise RuntimeError(f"{task.id} always fails")
    if spec.get("fail") == "user":
        raise LeptonError(f"{task.id}: a user error")
    if spec.get("fail") == "one_rank" and comm.rank == 1:  # its peers go on into a collective
        raise RuntimeError(f"{task.id} fails on one rank of its group")
    sizes = comm.allgather(comm.size)
    return {
        "square": spec.get("value", 0) ** 2,
        "group_size": sizes[0],
        "agree": len(set(sizes)) == 1,
    }


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    comm = world()
    log = Log(comm.rank, comm.size)
    tasks = [Task(t["id"], {**t, "counters": spec.get("counters")}) for t in spec["tasks"]]
    results = run_tasks(
        tasks,
        run_one,
        comm,
        log,
        ranks_per_task=spec.get("ranks_per_task", 1),
        retries=spec.get("retries", 1),
        journal=spec.get("journal"),
        title="farm",
        group_sync_s=spec.get("group_sync_s", 60.0),
    )
    if comm.rank == 0:
        report = [
            {
                "id": r.id,
                "status": r.status,
                "value": r.value,
                "attempts": r.attempts,
                "workers": r.workers,
                "retried": r.retried,
                "from_journal": r.from_journal,
                "error": r.error,
            }
            for r in results
        ]
        print(json.dumps({"size": comm.size, "results": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
