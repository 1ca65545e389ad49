"""``lepton_hpc.api.run.train`` from a script, on every rank (SPMD).

Usage: api_train.py CONFIG RUN_DIR. Trains CONFIG into RUN_DIR (a keyword override), checks the
returned Run on every rank, then checks that a bad override is raised on every rank together
(a ConfigError the script can catch, not an exit).
"""

from __future__ import annotations

import json
import sys

from lepton_hpc.api.run import train
from lepton_hpc.comm import world
from lepton_hpc.errors import ConfigError


def main() -> None:
    comm = world()
    config, run_dir = sys.argv[1], sys.argv[2]
    run = train(config, output__dir=run_dir, overrides={"output.plot": False})
    assert str(run.dir) == run_dir, run.dir
    assert run.model_path.is_file() if comm.rank == 0 else True
    assert len(run.history) == run.results["epochs"], (len(run.history), run.results["epochs"])
    every = comm.allgather(json.dumps(run.history, sort_keys=True))
    assert len(set(every)) == 1, "ranks hold different histories"
    try:
        train(config, overrides={"optim.lr": -1.0, "output.dir": run_dir + "-bad"})
    except ConfigError as exc:
        if "optim.lr" not in str(exc):
            raise AssertionError(f"unexpected message: {exc}") from None
        print(f"rank {comm.rank}: caught {type(exc).__name__}", flush=True)
    else:
        raise AssertionError("a negative learning rate was accepted")
    if comm.rank == 0:
        print("api_train: ok", flush=True)


if __name__ == "__main__":
    main()
