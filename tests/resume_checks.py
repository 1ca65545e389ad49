"""Checks that a ``lepton train --resume`` continued from its checkpoint instead of from step 0.

A resumed run ends with the same parameters as a run that restarted from scratch (training is
deterministic), so comparing final parameters alone cannot tell them apart. These checks read what
only a real resume produces: the engine's ``resuming from PATH (epoch E, step S)`` line naming the
checkpoint, epoch lines that begin after epoch E, and in ``results.json`` fewer training rows
processed in this attempt than the run's epochs hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lepton_hpc.checkpoint import TrainState, read_checkpoint
from lepton_hpc.errors import LeptonError

NAME = re.compile(r"ckpt-(?:(\d{8,})-)?(\d{10,})\.h5")
RESUMED = re.compile(r"resuming from (.+?) \(epoch (\d+), step (\d+)\)")
EPOCH_LINE = re.compile(r"epoch +(\d+)/\d+ +step +(\d+)")


def newest_valid(checkpoints: Path) -> tuple[Path, TrainState]:
    """The checkpoint ``--resume auto`` will take: of those that pass their checksum, the one
    with the highest write sequence number (0 for a format-1 name ``ckpt-<step>.h5``)."""
    named = [(NAME.fullmatch(p.name), p) for p in Path(checkpoints).glob("ckpt-*.h5")]
    keys = sorted(((int(m[1] or 0), int(m[2])), p) for m, p in named if m)
    for _, path in reversed(keys):
        try:
            return path, read_checkpoint(path)
        except LeptonError:
            continue
    raise AssertionError(f"no valid checkpoint in '{checkpoints}'")


def rows_this_attempt(run: Path) -> tuple[int, int]:
    """(training rows the last attempt processed, rows all its epochs hold) from results.json."""
    results = json.loads((Path(run) / "results.json").read_text())
    seen = round(results["throughput"]["rows"])
    return seen, results["epochs"] * results["rows"]["train"]


def resumed_at(stdout: str) -> tuple[str, int, int]:
    """(checkpoint, epoch, step) of the one ``resuming from`` line in ``stdout``."""
    said = set(RESUMED.findall(stdout))
    assert len(said) == 1, stdout
    ((path, epoch, step),) = said
    return path, int(epoch), int(step)


def check_continued(stdout: str, run: Path, epoch: int, step: int) -> None:
    """The attempt whose rank-0 output after its ``resuming from`` line is ``stdout`` trained on
    from ``epoch`` and ``step`` (> 0): its epoch lines (``train.log_every`` 1) begin at
    ``epoch + 1`` past ``step`` (at ``step`` itself when the stop came at that epoch's last
    step: the epoch then ends without another), and it processed fewer rows than the run's
    epochs hold (a run from step 0 reads all of them)."""
    assert step > 0, "nothing to resume at step 0"
    epochs = sorted((int(e), int(s)) for e, s in EPOCH_LINE.findall(stdout))
    assert epochs, stdout
    assert epochs[0][0] == epoch + 1, (epoch, epochs)
    assert epochs[0][1] >= step and all(s > step for _, s in epochs[1:]), (step, epochs)
    seen, all_rows = rows_this_attempt(run)
    assert 0 < seen < all_rows, (seen, all_rows)


def check_resumed(stdout: str, run: Path, path: Path, state: TrainState) -> None:
    """The run whose rank-0 output is ``stdout`` resumed from checkpoint ``path`` (read before
    the resume as ``state``) at its epoch and step, and did not start again from step 0."""
    assert resumed_at(stdout) == (str(path), state.epoch, state.step), stdout
    check_continued(stdout, run, state.epoch, state.step)
