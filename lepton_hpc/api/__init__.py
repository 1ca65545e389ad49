"""The Python interface: train from a script, load a model in-process, scikit-learn estimators.

``import lepton_hpc as lp`` exposes these names lazily (``lepton_hpc.__getattr__``), so the
command line never pays for importing them.
"""
