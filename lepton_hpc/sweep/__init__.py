"""``lepton sweep``: hyperparameter sweeps (grid, random, k-fold) run on the task farm.

- ``spec``: sweep files into a ``SweepSpec`` and its training tasks (pure, no MPI);
- ``command``: the subcommand (``register_sweep``, ``run_sweep``) and one training run per task;
- ``report``: the results into ``sweep.csv``, ``sweep.json`` and ``best.toml``;
- ``plot``: ``sweep.png``;
- ``toml_writer``: configs written back as TOML (``best.toml``).

The farm itself (``lepton_hpc.scheduler``) knows nothing of sweeps: it runs tasks.
"""

from .command import register_sweep, run_sweep

__all__ = ["register_sweep", "run_sweep"]
