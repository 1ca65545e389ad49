"""Atomic, checksummed checkpoints written by rank 0, on branches that are never lost.

- ``files``: the training state, the HDF5 layout, checkpoint names, the checksum (``digest``,
  shared with ``model.h5``), reading and atomic writing.
- ``lineage``: writing with rotation of the current lineage, ``--resume auto``'s choice of the
  newest valid checkpoint, moving newer checkpoints aside when an older one is resumed.
- ``resume``: the state ``--resume`` names, refused when its settings differ from this run's.
- ``mirror``: ``checkpoint.mirror``, a copy of every checkpoint in a second directory, written
  in the background; ``--resume auto`` takes the newest valid checkpoint of either.
"""

from ..safety import fsync_dir
from .files import (
    FORMAT,
    PATTERN,
    DamagedCheckpoint,
    TrainState,
    digest,
    new_lineage,
    read_checkpoint,
)
from .lineage import ASIDE, latest_valid, set_aside_newer, write_checkpoint
from .mirror import Mirror, check_mirror, mirror_dir
from .resume import MAY_CHANGE, check_resume, resume_checkpoint

__all__ = [
    "ASIDE",
    "FORMAT",
    "MAY_CHANGE",
    "PATTERN",
    "DamagedCheckpoint",
    "Mirror",
    "TrainState",
    "check_mirror",
    "check_resume",
    "digest",
    "fsync_dir",
    "latest_valid",
    "mirror_dir",
    "new_lineage",
    "read_checkpoint",
    "resume_checkpoint",
    "set_aside_newer",
    "write_checkpoint",
]
