"""Benchmarks: ``lepton bench`` measures the toolkit against the machine and its peers."""
