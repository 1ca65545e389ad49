"""lepton_hpc estimators inside scikit-learn: a Pipeline, cross-validation and a grid search.

    python examples/sklearn_pipeline.py

The estimators are ordinary scikit-learn estimators (`pip install lepton_hpc[sklearn]`), so they
combine with scikit-learn's transformers and model selection like any other.
"""

from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

import lepton_hpc as lp

X, y = make_classification(n_samples=3_000, n_features=10, n_informative=6, random_state=0)
pipe = make_pipeline(
    StandardScaler(), PolynomialFeatures(degree=2), lp.LogisticRegression(scale="zscore")
)
scores = cross_val_score(pipe, X, y, cv=3)
print(f"pipeline: 3-fold accuracy {scores.mean():.3f} (+/- {scores.std():.3f})")

search = GridSearchCV(
    lp.MLPClassifier(epochs=15, batch_size=128, scale="zscore"),
    {"hidden": [(16,), (32, 16)], "lr": [0.003, 0.01]},
    cv=3,
)
search.fit(X, y)
print(f"grid search: best {search.best_params_}, accuracy {search.best_score_:.3f}")
