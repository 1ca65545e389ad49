#!/usr/bin/env bash
# Time to sync's final loss: `lepton train` with comm.strategy = sync, then async, on 3 ranks.
#   scripts/async_vs_sync.sh DATA.h5 EPOCHS [LEPTON_FAULT] [extra lepton train overrides...]
# e.g. scripts/async_vs_sync.sh big.h5 6 slow=3@2
#      scripts/async_vs_sync.sh big.h5 8 slow=3@2 model.kind=mlp 'model.hidden=[32]' \
#          optim.name=adam optim.lr=0.003
# The target is sync's final training log-loss + 1 %; the time is the sum of the epoch times
# (metrics.jsonl) until the first epoch at or under it. Runs go to a temporary directory.
set -euo pipefail
data=$1 epochs=$2 fault=${3:-}
shift $(( $# < 3 ? $# : 3 ))
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
printf '[model]\nkind = "logistic"\n[optim]\nname = "sgd"\nlr = 0.5\n[train]\nbatch_size = 30000\nseed = 1\nthreads = 1\n[output]\nplot = false\n' > "$out/job.toml"
for s in sync async; do
  LEPTON_FAULT=$fault mpiexec --oversubscribe --bind-to none -n 3 "$py" -m lepton_hpc train \
    "$out/job.toml" "data.train=$data" "output.dir=$out/$s" "comm.strategy=$s" \
    "train.epochs=$epochs" "$@" > "$out/$s.log" 2>&1 || { tail -5 "$out/$s.log"; exit 1; }
done
"$py" - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def history(s):
    t, rows = 0.0, []
    for line in open(f"{out}/{s}/metrics.jsonl"):
        e = json.loads(line)
        t += e["seconds"]
        rows.append((t, e["train"]["log_loss"]))
    return rows
sync, asy = history("sync"), history("async")
target = sync[-1][1] * 1.01
def reach(h):
    return next((t for t, loss in h if loss <= target), None)
ts, ta = reach(sync), reach(asy)
print(f"sync: final {sync[-1][1]:.5f}, target {target:.5f} reached at {ts:.3f} s")
print(f"async: final {asy[-1][1]:.5f}, target reached at {ta if ta is None else f'{ta:.3f} s'}")
if ta:
    print(f"speed-up {ts / ta:.2f}x")
r = json.load(open(f"{out}/async/results.json"))
print("updates applied / dropped / max staleness per rank:",
      [(t["updates_applied"], t["updates_dropped"], t["max_staleness"]) for t in r["ranks_timing"]])
PY
