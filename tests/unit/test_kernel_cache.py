"""``kernel_cache``: users of an installation they cannot write to load its compiled kernels.

A fake installation (a package with a copy of ``kernel_cache`` and one cached kernel) is compiled
into its ``__pycache__`` by a first process; later processes see that folder as read-only (the
writability test is patched: these tests may run as root, who can write anywhere) and must load
the kernel from the seeded user cache, never compile it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
from numba import njit


@njit(cache=True)
def f(x):
    return x * 2.0 + 1.0
"""

RUN = """
import json, sys
import fakepkg.kernel_cache as kc
site = sys.argv[1]
if sys.argv[2] == "readonly":
    writable = kc._writable
    kc._writable = lambda p: False if p.startswith(site) else writable(p)
kc.install()
from fakepkg import probe
assert probe.f(1.0) == 3.0
st = probe.f.stats
print(json.dumps({"hits": sum(st.cache_hits.values()), "misses": sum(st.cache_misses.values()),
                  "path": st.cache_path}))
"""


def _run(site: Path, mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    res = subprocess.run(
        [sys.executable, "-c", RUN, str(site), mode],
        env={**clean, "PYTHONPATH": str(site), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A fake site-packages whose package has one kernel, compiled by its installer."""
    site = tmp_path / "site"
    pkg = site / "fakepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copy(ROOT / "lepton_hpc" / "kernel_cache.py", pkg / "kernel_cache.py")
    (pkg / "probe.py").write_text(PROBE)
    first = _run(site, "writable", XDG_CACHE_HOME=str(tmp_path / "installer-home"))
    assert first["misses"] == 1 and first["path"] == str(pkg / "__pycache__")
    return site


def test_readonly_install_cache_is_loaded_not_compiled(installed: Path, tmp_path: Path) -> None:
    cache = installed / "fakepkg" / "__pycache__"
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    home = tmp_path / "user-home"
    user = _run(installed, "readonly", XDG_CACHE_HOME=str(home))
    assert user["misses"] == 0 and user["hits"] == 1
    assert Path(user["path"]).is_relative_to(home)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before  # untouched
    again = _run(installed, "readonly", XDG_CACHE_HOME=str(home))  # already seeded
    assert again["misses"] == 0 and again["hits"] == 1


def test_users_numba_cache_dir_is_seeded(installed: Path, tmp_path: Path) -> None:
    own = tmp_path / "own-cache"
    user = _run(installed, "readonly", NUMBA_CACHE_DIR=str(own))
    assert user["misses"] == 0 and user["hits"] == 1
    assert Path(user["path"]).is_relative_to(own)


def test_without_the_locator_the_user_compiles(installed: Path, tmp_path: Path) -> None:
    """The control: a user cache that was not seeded compiles (what install() prevents)."""
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fakepkg import probe; probe.f(1.0); print(sum(probe.f.stats.cache_misses.values()))",
        ],
        env={
            **os.environ,
            "PYTHONPATH": str(installed),
            "NUMBA_CACHE_DIR": str(tmp_path / "unseeded"),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"
