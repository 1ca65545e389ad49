"""Data: row partitions, parallel HDF5 reads and writes, synthetic data, preprocessing."""
