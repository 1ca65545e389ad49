"""Hostile-input helpers: what every safety case asserts.

A case runs a real ``lepton`` command (under mpiexec, with a timeout) the way a careless or hostile
user would, then checks the promise: the exit code, one clear ``lepton: error`` line naming the
culprit, no traceback, and every input file and existing run directory byte for byte unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.conftest import Result


def snapshot(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under ``paths`` (files or directories, links not followed)."""
    digests: dict[str, str] = {}
    for root in map(Path, paths):
        files = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for f in files:
            if f.is_symlink():
                digests[str(f)] = "link:" + str(f.readlink())
            elif f.is_file():
                digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
            elif f.is_dir():
                digests[str(f)] = "dir"
    return digests


def assert_unchanged(before: dict[str, str], *paths: Path) -> None:
    """Every file seen by ``snapshot`` is still there with the same bytes (new files allowed
    only where a test says so: pass the same paths it snapshotted)."""
    after = snapshot(*paths)
    lost = {k for k in before if k not in after}
    changed = {k for k in before if k in after and after[k] != before[k]}
    assert not lost and not changed, f"lost: {sorted(lost)}; changed: {sorted(changed)}"


def check_failure(res: Result, code: int, *needles: str) -> None:
    """Exit ``code``, exactly one error line (not one per rank), no traceback, and each needle
    in stderr (the file, data set, key or value at fault)."""
    out = f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == code, out
    assert "Traceback" not in res.stderr + res.stdout, out
    errors = [line for line in res.stderr.splitlines() if line.startswith("lepton: error")]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in res.stderr, f"{needle!r} missing\n{out}"


def leftover_temporaries(*dirs: Path) -> list[Path]:
    """Temporary files (``.*.tmp``) the toolkit left behind under ``dirs``."""
    return [p for d in dirs for p in Path(d).rglob(".*tmp*")]
