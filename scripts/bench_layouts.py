"""Load rate of one data set stored contiguous, chunked, gzip, lzf (and zstd): ``lepton bench``'s
layouts part (``lepton_hpc.bench.layouts``), run by hand in this process, one rank.

``python scripts/bench_layouts.py [--rows 1048576] [--features 32] [--dir TMPDIR/lepton_layouts]
[--repeats 3] [--threads 1 2]``: writes the files once (kept for the next run), then prints the
markdown table ``lepton bench`` puts in results.md. For 2 ranks run the part under mpiexec (see
the module's docstring) or ``lepton bench``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from lepton_hpc.bench import layouts, report
from lepton_hpc.comm.base import SerialComm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lepton_layouts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    paths = layouts.make(args.dir, args.rows, args.features)
    res = layouts.measure(paths, SerialComm(), args.threads, args.repeats)
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("\n".join(report.layouts_section({"layouts_k1": {"status": "ok", "results": res}})))


if __name__ == "__main__":
    main()
