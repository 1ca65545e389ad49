#!/usr/bin/env bash
# The demo job under mpirun: generate the demo data in parallel, train, evaluate, predict.
#   NP=4 bash jobs/mpirun_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
LEPTON=${LEPTON:-.venv/bin/lepton}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1   # harmless when not root
MPIRUN=(mpirun -n "$NP" --oversubscribe)

[ -f runs/data/demo_train.h5 ] || "${MPIRUN[@]}" "$LEPTON" datagen --task logistic --rows 200000 \
  --features 32 --seed 7 --out runs/data/demo_train.h5
[ -f runs/data/demo_test.h5 ] || "${MPIRUN[@]}" "$LEPTON" datagen --task logistic --rows 50000 \
  --start-row 200000 --features 32 --seed 7 --out runs/data/demo_test.h5
"${MPIRUN[@]}" "$LEPTON" train jobs/configs/demo.toml --overwrite
"${MPIRUN[@]}" "$LEPTON" evaluate --model runs/demo/model.h5 --data runs/data/demo_test.h5
"${MPIRUN[@]}" "$LEPTON" predict --model runs/demo/model.h5 --data runs/data/demo_test.h5 \
  --out runs/demo/predictions.h5 --force
