# lepton_hpc: set-up, demo, tests and benchmarks. Every target installs what it needs first.
#   make run     install what is missing, then the demo job under mpirun -n 2
#   make test    install what is missing, then lint and the whole suite (MPI tests included)
#   make bench   install the benchmark peers, then one benchmark run

SHELL      := /bin/bash
PYTHON     ?= python3
PREFIX     ?= $(CURDIR)
VENV       ?= $(CURDIR)/.venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check --quiet
STAMP      := $(VENV)/.lepton-stamps
NP         ?= 2
APT_PKGS   := openmpi-bin libopenmpi-dev libhdf5-openmpi-dev pkg-config libdeflate0


export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
# Keep OpenMPI on shared memory and loopback TCP: no InfiniBand probing on a laptop or CI box.
export OMPI_MCA_btl := self,vader,tcp
export OMPI_MCA_btl_tcp_if_include := lo
export OMPI_MCA_oob_tcp_if_include := lo
export OMPI_MCA_rmaps_base_oversubscribe := 1
export PATH := $(VENV)/bin:$(PATH)

.PHONY: install install-horovod bench-peers run test test-unit test-mpi test-cuda lint bench clean distclean

install: $(STAMP)/package

# Debian packages: installed only when one is missing, so a second run does nothing.
$(STAMP)/system:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "==> apt-get install$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(STAMP) && touch $@

$(VENV)/bin/python: | $(STAMP)/system
	@echo "==> virtual environment in $(VENV)"
	@$(PYTHON) -m venv $(VENV)

# Build tools and the MPI/numeric stack; h5py is then compiled against Debian's parallel HDF5
# (mpio driver). --no-build-isolation reuses the installed mpi4py instead of compiling another.
$(STAMP)/python: $(STAMP)/system | $(VENV)/bin/python
	@echo "==> Python packages (mpi4py, numpy, numba, build tools)"
	@$(PIP) install --upgrade pip
	@$(PIP) install "Cython>=3" "setuptools>=77" pkgconfig wheel "mpi4py>=4" numpy "numba>=0.68,<0.69" "llvmlite>=0.50,<0.51" "threadpoolctl>=3" scipy
	@if ! $(PY) -c 'import h5py,sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; then \
	  echo "==> h5py against parallel HDF5 (compiles, about 2-3 minutes)"; \
	  CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=hdf5-openmpi \
	    $(PIP) install --no-build-isolation --no-binary=h5py --no-cache-dir --force-reinstall --no-deps h5py; \
	  $(PIP) install h5py; \
	fi
	@$(PY) -c 'import h5py; assert h5py.get_config().mpi, "h5py is not parallel"'
	@touch $@

$(STAMP)/package: $(STAMP)/python setup.cfg pyproject.toml
	@echo "==> lepton_hpc (editable) and test tools"
	@$(PIP) install --no-build-isolation --no-deps -e . > $(STAMP)/package.log 2>&1 || { cat $(STAMP)/package.log; exit 1; }
	@$(PIP) install matplotlib pytest pytest-timeout scikit-learn ruff hypothesis onnx onnxruntime pyarrow pandas netCDF4 hdf5plugin zstandard lz4 blosc blosc2
	@echo "==> compiling the Numba kernels into their cache (lepton warmup, 5-12 minutes)"
	@$(VENV)/bin/lepton warmup || echo "lepton warmup failed: the first run compiles its kernels"
	@touch $@

MPIEXEC    ?= mpiexec
DEMO_DATA  := runs/data/demo_train.h5 runs/data/demo_test.h5

# The demo data: 250,000 rows of one synthetic stream, written by $(NP) ranks in parallel; the
# test file is rows 200,000.. of the same stream (same true model, unseen rows).
runs/data/demo_train.h5: | $(STAMP)/package
	@$(MPIEXEC) -n $(NP) $(VENV)/bin/lepton datagen --task logistic --rows 200000 --features 32 --seed 7 --out $@ --force
runs/data/demo_test.h5: | $(STAMP)/package
	@$(MPIEXEC) -n $(NP) $(VENV)/bin/lepton datagen --task logistic --rows 50000 --start-row 200000 --features 32 --seed 7 --out $@ --force

# Horovod 0.28.1 (PyTorch CPU + MPI) for comm.backend = "horovod", patched to build with C++17
# against current PyTorch; does nothing when already installed (about 3 minutes the first time).
install-horovod: $(STAMP)/package
	@bash scripts/install_horovod.sh $(VENV)

run: install $(DEMO_DATA)
	@$(MPIEXEC) -n $(NP) $(VENV)/bin/lepton train jobs/configs/demo.toml --overwrite

lint: install
	@$(VENV)/bin/ruff check lepton_hpc kernels tests examples
	@$(VENV)/bin/ruff format --check lepton_hpc kernels tests examples

test-unit: install
	@$(PY) -m pytest -q tests/unit

test-cuda: install
	@NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest -q tests/cuda

test-mpi: install install-horovod
	@$(PY) -m pytest -q tests/mpi

# The CUDA kernels run on Numba's CUDA simulator (a separate process: the simulator is chosen when
# numba is imported); then everything else, real MPI jobs included.
test: install install-horovod lint
	@NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest -q tests/cuda
	@$(PY) -m pytest tests --ignore=tests/cuda --durations=30

# The benchmark's peers: torch pinned to the CPU build on this machine's disk, resolved in the same
# pip command as scikit-learn so pip never brings another torch; Horovod from its own script.
# Heat 1.9 declares Python >= 3.12 and torchvision (used only by its image helpers): installed
# without dependencies, and the benchmark stubs torchvision for its import. daal4py (oneDAL) where
# PyPI has a wheel for this Python, else the benchmark reports its part as skipped.
bench-peers: install install-horovod
	@$(PIP) install "torch==2.13.0" scikit-learn
	@$(PIP) install --no-deps --ignore-requires-python "heat==1.9.0"
	@$(PIP) install "daal4py==2024.7.0" || echo "daal4py did not install: the onedal part is skipped"

# One benchmark run into bench/ (results.json, results.md, scaling.png, allreduce.png); run it
# alone, it launches its own mpiexec jobs. BENCH_ARGS="--quick" for a small data set.
BENCH_ARGS ?=
bench: bench-peers
	@$(VENV)/bin/lepton bench $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# make install PREFIX=/opt/lepton: a self-contained copy and an Lmod modulefile (jobs/prefix.mk).
include jobs/prefix.mk
