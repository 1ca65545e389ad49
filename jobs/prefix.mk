# `make install PREFIX=/opt/lepton_hpc`: a self-contained copy of lepton_hpc under PREFIX (its own
# virtual environment, a non-editable install, the sbatch templates) and the Lmod modulefile
# PREFIX/modulefiles/lepton_hpc.lua, by scripts/install_prefix.sh. The build tree's venv ($(VENV),
# which must not depend on PREFIX) is made first: PREFIX installs reuse its parallel h5py as a
# wheel in $(STAMP)/wheels and never compile h5py again.
#
# Included by the Makefile after STAMP is defined (`include jobs/prefix.mk`); the guard makes a
# second inclusion (`make -f Makefile -f jobs/prefix.mk ...`) harmless.
ifndef LEPTON_PREFIX_MK
LEPTON_PREFIX_MK := 1

.PHONY: install-prefix

# A PREFIX other than the build tree: `make install` also installs there.
ifneq ($(abspath $(PREFIX)),$(abspath $(CURDIR)))
install: install-prefix
endif

# PREFIX_WARMUP=0: no `lepton warmup` in the prefix (its kernels then compile on first use)
PREFIX_WARMUP ?= 1

install-prefix: $(STAMP)/package
	@PYTHON=$(PYTHON) DEV_VENV=$(VENV) WHEELS=$(STAMP)/wheels bash scripts/install_prefix.sh "$(PREFIX)"
ifneq ($(PREFIX_WARMUP),0)
	@echo "==> compiling the Numba kernels into $(abspath $(PREFIX))'s cache (lepton warmup)"
	@env -u NUMBA_CACHE_DIR "$(abspath $(PREFIX))/venv/bin/lepton" warmup \
	  || echo "lepton warmup failed: the first run compiles its kernels"
else
	@echo "==> PREFIX_WARMUP=0: the kernels compile on their first run"
endif

endif
