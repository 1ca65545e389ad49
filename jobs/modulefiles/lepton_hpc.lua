-- Lmod modulefile for lepton_hpc. `make install PREFIX=/opt/lepton_hpc` writes a copy with the
-- prefix filled in to $(PREFIX)/modulefiles/lepton_hpc.lua; then:
--   module use /opt/lepton_hpc/modulefiles
--   module load lepton_hpc
--   lepton doctor
help([[
lepton_hpc: MPI data-parallel training and batch prediction from HDF5 (Numba kernels).

Puts `lepton` on the PATH (from a self-contained virtual environment with parallel h5py).
Batch template: $LEPTON_HPC_JOBS/slurm_train.sbatch.
Check a node with `lepton doctor`; launch with mpirun, or srun --mpi=pmix.
]])
whatis("Name: lepton_hpc")
whatis("Version: @VERSION@")
whatis("Description: MPI data-parallel training and batch prediction from HDF5")

local prefix = "@PREFIX@"

-- The MPI that mpi4py and h5py were built against must be the one on the PATH at run time. On
-- a cluster with an MPI module, load it here, for example: depends_on("openmpi/4.1")

prepend_path("PATH", pathJoin(prefix, "bin"))
setenv("LEPTON_HPC_ROOT", prefix)
setenv("LEPTON_HPC_JOBS", pathJoin(prefix, "share", "lepton_hpc", "jobs"))
