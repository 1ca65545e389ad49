#!/usr/bin/env bash
# Install Horovod 0.28.1 with its PyTorch and MPI parts into the virtual environment VENV.
#
# Horovod 0.28.1 asks CMake for C++14, but PyTorch 2.x headers need C++17: the sdist is patched
# (CMAKE_CXX_STANDARD 14 -> 17 in the two CMakeLists.txt that set it) and built against the
# already installed torch, with no build isolation so pip never brings a second torch.
# Idempotent: when `horovod.torch` imports and was built with MPI, nothing is done.
#
#   scripts/install_horovod.sh .venv   (about 2.5 minutes of compiling with HOROVOD_BUILD_JOBS=2)
set -euo pipefail

VENV=${1:?usage: scripts/install_horovod.sh VENV}
[[ -d "$VENV" ]] || { echo "install_horovod: no virtual environment at $VENV" >&2; exit 1; }
VENV=$(cd "$VENV" && pwd) # absolute: the build runs in another directory
PY="$VENV/bin/python"
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0 # the CPU build on this machine's disk; never let pip pick another torch

[[ -x "$PY" ]] || { echo "install_horovod: no python at $PY" >&2; exit 1; }

horovod_ok() {
  "$PY" -c 'import horovod.torch as h; assert h.mpi_built()' >/dev/null 2>&1
}

if horovod_ok; then
  echo "==> horovod $("$PY" -c 'import horovod; print(horovod.__version__)') with MPI already in $VENV"
  exit 0
fi

PIP=("$PY" -m pip --disable-pip-version-check --quiet)
command -v mpicxx >/dev/null || { echo "install_horovod: mpicxx not found (apt-get install libopenmpi-dev)" >&2; exit 1; }

echo "==> torch==$TORCH_VERSION and Horovod's runtime dependencies"
"${PIP[@]}" install "torch==$TORCH_VERSION" cloudpickle psutil pyyaml packaging setuptools wheel
command -v cmake >/dev/null || "${PIP[@]}" install "torch==$TORCH_VERSION" cmake

work=$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "==> horovod==$HOROVOD_VERSION source, patched for C++17"
"${PIP[@]}" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
src="$work/horovod-$HOROVOD_VERSION"
for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
  grep -q 'set(CMAKE_CXX_STANDARD 14)' "$src/$f" || { echo "install_horovod: $f has no C++14 line to patch" >&2; exit 1; }
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/$f"
done

echo "==> building horovod (PyTorch + MPI, no TensorFlow/MXNet/Gloo; a few minutes)"
log="$work/build.log"
if ! (cd "$src" && HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
  HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GLOO=1 HOROVOD_CPU_OPERATIONS=MPI \
  MAKEFLAGS="-j${HOROVOD_BUILD_JOBS:-2}" "${PIP[@]}" install --no-build-isolation --no-deps --no-cache-dir . \
  >"$log" 2>&1); then
  tail -n 60 "$log" >&2
  echo "install_horovod: the horovod build failed (last lines above)" >&2
  exit 1
fi

if ! horovod_ok; then
  "$PY" -c 'import horovod.torch as h; print("mpi_built:", h.mpi_built())' >&2 || true
  echo "install_horovod: horovod installed but horovod.torch is not usable with MPI" >&2
  exit 1
fi
echo "==> horovod $HOROVOD_VERSION with MPI installed in $VENV"
