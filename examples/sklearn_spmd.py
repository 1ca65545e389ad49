"""Fit scikit-learn estimators on every rank's own rows: one model from all of them.

    python examples/sklearn_spmd.py                 # one process
    mpiexec -n 3 python examples/sklearn_spmd.py    # three ranks, one model

Each rank makes (or would load) only its own block of rows; every rank ends with the same model.
"""

import numpy as np
from sklearn.model_selection import train_test_split

import lepton_hpc as lp
from lepton_hpc.comm import world

comm = world()
rng = np.random.default_rng(1234 + comm.rank)  # each rank's own rows (here: synthetic)
n = 2_000 + 500 * comm.rank  # uneven blocks are fine
X = rng.normal(size=(n, 8))
y = np.where(X[:, 0] + 0.5 * X[:, 1] ** 2 > 0.5, "spam", "ham")
X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0)

clf = lp.LogisticRegression(scale="zscore", l2=1e-4).fit(X_train, y_train)
mlp = lp.MLPClassifier(hidden=(16,), epochs=20, batch_size=256, scale="zscore")
mlp.fit(X_train, y_train)

# predict/score run locally on each rank's rows; sum the counts for a global accuracy.
for name, model in (("logistic", clf), ("mlp", mlp)):
    right = comm.allgather(int((model.predict(X_test) == y_test).sum()))
    total = comm.allgather(len(y_test))
    if comm.rank == 0:
        accuracy = sum(right) / sum(total)
        print(f"{name}: classes {model.classes_.tolist()}, test accuracy {accuracy:.3f}")
