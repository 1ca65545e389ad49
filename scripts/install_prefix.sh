#!/usr/bin/env bash
# Install a self-contained copy of lepton_hpc under PREFIX, with an Lmod modulefile:
#
#   PREFIX/venv/                       its own virtual environment (non-editable install)
#   PREFIX/bin/lepton                  the only command put on the PATH by the module
#   PREFIX/share/lepton_hpc/jobs/      the sbatch templates and configs
#   PREFIX/modulefiles/lepton_hpc.lua  `module use PREFIX/modulefiles; module load lepton_hpc`
#
#   scripts/install_prefix.sh /opt/lepton_hpc        (make install PREFIX=/opt/lepton_hpc)
#
# Parallel h5py is not compiled again: it comes from a wheel in WHEELS (default: the build
# tree's .venv/.lepton-stamps/wheels). When that folder has none, the wheel is made from the
# build tree's venv if its h5py is parallel (repacked from the installed files, seconds), else
# compiled once against Debian's parallel HDF5 (about 3 minutes on 2 cores), and kept there.
# Running it again updates the package and changes nothing else.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 PREFIX" >&2; exit 2; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=$(realpath -m "$1")
[ "$PREFIX" != "$SRC" ] || { echo "install_prefix.sh: PREFIX must not be the build tree" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
DEV_VENV=${DEV_VENV:-$SRC/.venv}
WHEELS=${WHEELS:-$DEV_VENV/.lepton-stamps/wheels}
VENV=$PREFIX/venv
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)

# ---- the parallel h5py wheel -----------------------------------------------------------------
h5py_wheel() { find "$WHEELS" -maxdepth 1 -name 'h5py-*.whl' 2>/dev/null | sort | tail -n 1; }
mkdir -p "$WHEELS"
if [ -z "$(h5py_wheel)" ]; then
  if "$DEV_VENV/bin/python" -c 'import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; then
    echo "==> parallel h5py wheel from $DEV_VENV (repacked, no compile)"
    "$DEV_VENV/bin/python" - "$WHEELS" <<'EOF'
"""Pack the installed (compiled, parallel) h5py back into a wheel, from its RECORD."""
import base64, hashlib, importlib.metadata as md, sys, zipfile
from pathlib import Path

dist = md.distribution("h5py")
tag = next(l.split(":", 1)[1].strip() for l in dist.read_text("WHEEL").splitlines() if l.startswith("Tag:"))
info = f"h5py-{dist.version}.dist-info"
skip = ("INSTALLER", "REQUESTED", "RECORD", "direct_url.json")
out = Path(sys.argv[1]) / f"h5py-{dist.version}-{tag}.whl"
tmp = out.with_suffix(".tmp")
record = []
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as whl:
    for f in dist.files:
        name = str(f)
        if name.startswith("..") or "__pycache__" in name or name.rsplit("/", 1)[-1] in skip:
            continue
        data = Path(dist.locate_file(f)).read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        whl.writestr(name, data)
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
tmp.replace(out)
print(out)
EOF
  else
    echo "==> parallel h5py wheel: compiling against parallel HDF5 (about 3 minutes)"
    CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=hdf5-openmpi \
      "$DEV_VENV/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation \
      --no-binary=h5py -w "$WHEELS" h5py
  fi
fi
WHEEL=$(h5py_wheel)
[ -n "$WHEEL" ] || { echo "install_prefix.sh: no h5py wheel in $WHEELS" >&2; exit 1; }

# ---- the virtual environment and the package -------------------------------------------------
echo "==> lepton_hpc into $PREFIX"
mkdir -p "$PREFIX/bin" "$PREFIX/modulefiles" "$PREFIX/share/lepton_hpc"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" -c 'import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; then
  "${PIP[@]}" install "mpi4py>=4" numpy
  "${PIP[@]}" install --no-deps --force-reinstall "$WHEEL"
fi
# Non-editable: a copy of the package, built from the tree in a temporary folder (the tree is
# left as it is, other engineers' build/ and egg-info untouched).
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
tar -C "$SRC" --exclude=./.venv --exclude=./runs --exclude=./.git --exclude='*.egg-info' \
  --exclude=./build --exclude=__pycache__ -cf - . | (mkdir "$BUILD/src" && tar -C "$BUILD/src" -xf -)
"${PIP[@]}" wheel --no-deps -w "$BUILD/dist" "$BUILD/src" > /dev/null
PKG=$(find "$BUILD/dist" -name 'lepton_hpc-*.whl' | head -n 1)
"${PIP[@]}" install "$PKG[plot]"                       # dependencies; h5py is already there
"${PIP[@]}" install --no-deps --force-reinstall "$PKG" # this tree's code, even at the same version
"$VENV/bin/python" -c 'import h5py; assert h5py.get_config().mpi, "h5py in the prefix is not parallel"'

# ---- what the module exposes -----------------------------------------------------------------
ln -sfn ../venv/bin/lepton "$PREFIX/bin/lepton"
rm -rf "$PREFIX/share/lepton_hpc/jobs"
mkdir -p "$PREFIX/share/lepton_hpc/jobs"
cp -r "$SRC/jobs/configs" "$SRC"/jobs/*.sbatch "$SRC"/jobs/*.sh "$PREFIX/share/lepton_hpc/jobs/"
VERSION=$("$VENV/bin/python" -c 'import lepton_hpc; print(lepton_hpc.__version__)')
sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@VERSION@|$VERSION|g" "$SRC/jobs/modulefiles/lepton_hpc.lua" \
  > "$PREFIX/modulefiles/lepton_hpc.lua"
echo "==> done: module use $PREFIX/modulefiles; module load lepton_hpc; lepton doctor"
