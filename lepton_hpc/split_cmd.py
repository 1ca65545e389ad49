"""``lepton split --by-label``: one HDF5 file into K client files with Dirichlet label skew.

Federated averaging (``comm.strategy = "fedavg"``) trains one client per rank on its own file;
real clients rarely hold the same mix of classes. For each class, its rows are shuffled and cut
into K parts of sizes drawn from Dirichlet(alpha, ..., alpha): a small alpha gives most of a
class to a few clients (strong skew), a large one spreads it evenly. Every row lands in exactly
one client file, in its original order there.

The split is serial: rank 0 writes, the other ranks wait for its verdict (as ``lepton
convert``). The client files are written into a temporary directory next to ``--out`` and that
directory is renamed into place, so ``--out`` appears whole or not at all. An existing ``--out``
is refused; with ``--force`` its ``client-K.h5`` files are replaced (each atomically) and
nothing else in it is touched. The input is never an output, whatever ``--force`` says.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
from pathlib import Path

import numpy as np

from .comm.base import Communicator, agree
from .errors import DataError, LeptonError
from .log import Log

CLIENT_NAME = "client-{k}.h5"


def register_split(sub) -> None:
    p = sub.add_parser(
        "split",
        help="one HDF5 file into client files with Dirichlet label skew (for comm.strategy "
        '= "fedavg")',
    )
    p.add_argument("input", help="INPUT.h5 with features and class labels")
    p.add_argument("--out", required=True, help="directory to write client-0.h5 ... into")
    p.add_argument(
        "--by-label",
        action="store_true",
        required=True,
        help="split each class over the clients by Dirichlet(alpha) proportions",
    )
    p.add_argument("--clients", type=int, required=True, help="number of client files (K)")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration: small = strong label skew, large = near uniform "
        "(default 0.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the proportions")
    p.add_argument("--x", default="X", help="features data set (read and written)")
    p.add_argument("--y", default="y", help="labels data set (read and written)")
    p.add_argument("--force", action="store_true", help="replace client files in an existing --out")
    p.set_defaults(func=run_split)


def dirichlet_split(y: np.ndarray, clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """The rows (ascending) of each client: for each class (ascending label), its rows shuffled
    and cut at the cumulative Dirichlet(alpha) proportions. A partition of ``range(len(y))``."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        share = rng.dirichlet(np.full(clients, alpha))
        cuts = np.floor(np.cumsum(share)[:-1] * rows.size + 0.5).astype(np.int64)
        for k, piece in enumerate(np.split(rows, np.clip(cuts, 0, rows.size))):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def _check_args(args: argparse.Namespace) -> None:
    if args.clients < 1:
        raise LeptonError(f"--clients {args.clients}: must be >= 1")
    if not (args.alpha > 0 and np.isfinite(args.alpha)):
        raise LeptonError(f"--alpha {args.alpha}: must be a finite number > 0")
    if args.seed < 0:
        raise LeptonError(f"--seed {args.seed}: must be >= 0")


def _read(path: str, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            for name in (x, y):
                if name not in fh or not isinstance(fh[name], h5py.Dataset):
                    raise DataError(f"'{path}' has no data set '{name}'")
            X, labels = fh[x][()], fh[y][()]
    except OSError as exc:
        raise DataError(f"cannot read '{path}' as HDF5: {exc}") from None
    if labels.ndim != 1 or labels.shape[0] != X.shape[0]:
        raise DataError(f"'{path}:{y}' must hold one label per row of '{x}'")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
        raise DataError(f"'{path}:{y}': --by-label needs class labels (whole numbers)")
    if labels.dtype.kind not in "iuf":
        raise DataError(f"'{path}:{y}': --by-label needs numeric class labels")
    return X, labels


def split_file(args: argparse.Namespace) -> str:
    """Rank 0's work: read, split, write atomically; a one-line summary."""
    import h5py

    from .safety import check_not_input, commit, fsync_dir

    _check_args(args)
    out = Path(args.out)
    finals = [out / CLIENT_NAME.format(k=k) for k in range(args.clients)]
    for f in finals:  # even with --force
        check_not_input(f, {"data": args.input}, "--out")
    if out.exists() and not out.is_dir():
        raise LeptonError(f"--out '{out}' exists and is not a directory")
    if out.exists() and not args.force:
        raise LeptonError(f"--out '{out}' exists; pass --force to replace its client files")
    X, labels = _read(args.input, args.x, args.y)
    parts = dirichlet_split(labels, args.clients, args.alpha, args.seed)
    empty = [k for k, p in enumerate(parts) if p.size == 0]
    if empty:
        raise DataError(
            f"client {empty[0]} would get no rows ({len(labels)} rows, {args.clients} clients, "
            f"alpha {args.alpha}): use fewer clients, a larger --alpha or another --seed"
        )
    parent = out.parent if str(out.parent) else Path()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeptonError(f"cannot create directory '{parent}': {exc.strerror}") from None
    tmp = parent / f".{out.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        tmp.mkdir()
        for k, rows in enumerate(parts):
            with h5py.File(tmp / CLIENT_NAME.format(k=k), "w") as fh:
                fh.create_dataset(args.x, data=X[rows])
                fh.create_dataset(args.y, data=labels[rows])
        if out.exists():  # --force: each client file replaced atomically, nothing else touched
            for k, final in enumerate(finals):
                commit(tmp / CLIENT_NAME.format(k=k), final)
        else:
            for k in range(args.clients):
                fd = os.open(tmp / CLIENT_NAME.format(k=k), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.rename(tmp, out)  # the whole directory appears at once
            fsync_dir(parent)
    except OSError as exc:
        raise LeptonError(f"cannot write '{out}': {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    sizes = ", ".join(str(p.size) for p in parts)
    return (
        f"wrote {args.clients} client files to '{out}' ({len(labels)} rows; rows per client: "
        f"{sizes}; alpha {args.alpha}, seed {args.seed})"
    )


def run_split(args: argparse.Namespace, comm: Communicator, log: Log) -> int:
    summary = agree(comm, lambda: split_file(args) if comm.is_root else None)
    if summary is not None:
        log.info(summary)
    return 0
