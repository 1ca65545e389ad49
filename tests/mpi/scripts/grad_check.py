"""Under mpiexec: the allreduced gradient of partitioned rows vs the float64 NumPy gradient on all rows.

Usage: grad_check.py DATA.h5 SIZES_JSON ACTIVATION HEAD SEED
Prints one JSON line on rank 0 with the worst relative errors; exits 1 when one exceeds 1e-5.
"""

import json
import sys

import h5py
import numpy as np

from lepton_hpc.comm import world
from lepton_hpc.data.h5 import open_read
from lepton_hpc.data.reader import read_block
from lepton_hpc.device import select_device
from lepton_hpc.log import Log
from lepton_hpc.models import Model

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from tests import reference

path, sizes, act, head, seed = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
comm = world()
log = Log(comm.rank, comm.size)
block = read_block(path, "X", "y", comm, log)
with open_read(path, comm) as fh:
    driver = fh.driver
heads = {0: "squared", 1: "binary", 2: "softmax"}
acts = {0: "sigmoid", 1: "tanh", 2: "relu"}
model = Model("mlp", tuple(sizes), acts[act], heads[head])
params = model.init_params("xavier", seed) + 0.01
dev = select_device("cpu", 0, comm)
buf = np.zeros(model.n_params + 2)
dev.kernels.gradient(block.X, block.y, params, np.asarray(sizes, dtype=np.int64), act, head, buf)
comm.allreduce_(buf)
if comm.is_root:
    with h5py.File(path, "r") as fh:
        X, y = fh["X"][()], fh["y"][()]
    g, loss, n = reference.gradient(X, y, params, sizes, act, head)
    P = model.n_params
    err_g = np.max(np.abs(buf[:P] - g)) / np.max(np.abs(g))
    err_l = abs(buf[P] - loss) / abs(loss)
    report = {
        "ranks": comm.size,
        "rows_local": block.n,
        "driver": driver,
        "grad_rel": float(err_g),
        "loss_rel": float(err_l),
        "count": float(buf[P + 1]),
        "n": n,
    }
    print(json.dumps(report), flush=True)
    sys.exit(0 if err_g < 1e-5 and err_l < 1e-5 and buf[P + 1] == n else 1)
