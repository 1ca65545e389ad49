"""One training run, in layers: ``setup`` (checks, data, model, device, resume), ``step`` (the
fused buffer and what a step needs), ``strategies`` (how ranks combine their work), ``loop``
(epochs, metrics, early stopping, checkpoints); ``lepton_hpc.engine`` ties them together."""
