"""Sharded data sets: several HDF5 files read as the concatenation of their rows.

``data.train``, ``data.test`` and ``--data`` name one file, a glob pattern (its files sorted by
name) or a list of files (in list order). Rows are numbered across the files, so everything that
depends on a global row number (the validation split, mini-batch order, reproducible mode's
global blocks) is exactly what one file holding the same rows in the same order gives.

This module holds what does not read rows: resolving a specification to files (done once, on
rank 0, by the caller), checking that the shards' metadata agree, and the map from global rows
to (file, local row). ``reader.read_block`` reads each piece of a rank's block from its file with
the per-file fast path.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DataError

GLOB_CHARS = "*?["


def is_pattern(text: str) -> bool:
    """Whether ``text`` holds glob characters (then it is a pattern unless such a file exists)."""
    return any(c in text for c in GLOB_CHARS)


def is_multi(spec: Any) -> bool:
    """Whether ``spec`` may name several files (a list, or a glob pattern): cheap, no I/O."""
    if isinstance(spec, str | os.PathLike):
        return is_pattern(os.fspath(spec))
    return True


def resolve(spec: str | os.PathLike | Sequence[str | os.PathLike], what: str = "data") -> list[str]:
    """The files of ``spec``, in row order: ``[spec]`` for a path, the sorted matches of a glob
    pattern (a file whose name holds glob characters is taken as itself), a list as given.

    A pattern matching no file, or an empty list, is a DataError naming ``what`` and the pattern.
    """
    if isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        if is_pattern(text) and not os.path.isfile(text):
            found = sorted(f for f in glob.glob(text) if os.path.isfile(f))
            if not found:
                raise DataError(f"{what} '{text}': no file matches the pattern")
            return found
        return [text]
    paths = [os.fspath(p) for p in spec]
    if not paths:
        raise DataError(f"{what}: the list of files is empty")
    for p in paths:
        if not isinstance(p, str) or not p:
            raise DataError(f"{what}: {p!r} is not a file path")
    return paths


def label(spec: Any, paths: Sequence[str] | None = None) -> str:
    """A short name of the data for messages: the path, the pattern, or the first and last file
    of a list with their count."""
    if isinstance(spec, str | os.PathLike):
        return os.fspath(spec)
    items = [os.fspath(p) for p in (paths if paths is not None else spec)]
    if len(items) == 1:
        return items[0]
    if len(items) <= 3:
        return "[" + ", ".join(items) + "]"
    return f"[{items[0]}, ..., {items[-1]}] ({len(items)} files)"


def input_roles(role: str, paths: Sequence[str]) -> dict[str, str]:
    """``{role: path}`` for one file, ``{role[i]: path}`` for shards: the inputs no output may
    be, nor lie inside (``safety.check_not_input`` and ``check_no_input_inside``)."""
    if len(paths) == 1:
        return {role: paths[0]}
    return {f"{role}[{i}]": p for i, p in enumerate(paths)}


def _family(dtype: str | None) -> str | None:
    """ "float" or "integer" (integers and bools): shards of one data set share the family."""
    if dtype is None:
        return None
    return "float" if np.dtype(dtype).kind == "f" else "integer"


def combine(infos: Sequence[Any], name: str, ranks: int, feature_dtype) -> Any:
    """One ``reader.DataInfo`` for the concatenated rows of ``infos`` (one per shard, in order),
    after checking that they agree: feature count, dtype family (float or integer) of features
    and targets, target shape beyond the rows. A disagreement is a DataError naming the shard.

    ``feature_dtype``: ``reader._feature_dtype`` (the type a data set's features are read as); the
    shards' features are read as the widest of theirs (float32 and float64: float64), which
    holds every shard's values exactly.
    """
    first = infos[0]
    x, y = first.x, first.y
    for info in infos[1:]:
        where = f"shard '{info.path}'"
        if info.n_features != first.n_features:
            raise DataError(
                f"{where}: '{x}' has {info.n_features} features but shard '{first.path}' has "
                f"{first.n_features}; every shard needs the same features"
            )
        for part, mine, theirs in (
            (x, info.x_dtype, first.x_dtype),
            (y, info.y_dtype, first.y_dtype),
        ):
            if _family(mine) != _family(theirs):
                raise DataError(
                    f"{where}: '{part}' holds {_family(mine)} values ({mine}) but shard "
                    f"'{first.path}' holds {_family(theirs)} values ({theirs}); every shard "
                    "needs the same kind of values"
                )
        if (info.y_shape is None) != (first.y_shape is None) or (
            info.y_shape is not None and info.y_shape[1:] != first.y_shape[1:]
        ):
            raise DataError(
                f"{where}: '{y}' has {_outputs(info.y_shape)} per row but shard '{first.path}' "
                f"has {_outputs(first.y_shape)}; every shard needs the same target shape"
            )
    n = sum(info.n_rows for info in infos)
    if n < ranks:
        raise DataError(f"'{name}:{x}' has {n} rows, fewer than the {ranks} ranks")
    read_as = np.result_type(*(feature_dtype(info.x_dtype) for info in infos))
    dtypes = {info.x_dtype for info in infos}
    return dataclasses.replace(
        first,
        path=name,
        n_rows=int(n),
        x_dtype=first.x_dtype if len(dtypes) == 1 else str(read_as),
        y_shape=None if first.y_shape is None else (int(n), *first.y_shape[1:]),
        x_offset=None,
        y_offset=None,
        x_ndim=2,
        independent=True,
        identity=None,
        shards=tuple(infos),
    )


def _outputs(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "no targets"
    return "one target" if len(shape) == 1 else f"{shape[1]} targets"


def offsets(infos: Sequence[Any]) -> np.ndarray:
    """Global row number of each shard's first row, and the total last (int64, n_shards + 1)."""
    return np.concatenate([[0], np.cumsum([info.n_rows for info in infos])]).astype(np.int64)


def locate(starts: np.ndarray, rows: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, row within that shard) of global ``rows``, with ``starts = offsets(...)``."""
    rows = np.asarray(rows, dtype=np.int64)
    shard = np.searchsorted(starts, rows, side="right") - 1
    return shard, rows - starts[shard]


def pieces(starts: np.ndarray, start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """The parts of global rows ``[start, stop)`` in each shard, in order: (shard, first local
    row, end local row, position of the first row in the block). Shards without rows of the
    block (and empty shards) are left out."""
    out = []
    for i in range(len(starts) - 1):
        lo, hi = max(start, int(starts[i])), min(stop, int(starts[i + 1]))
        if lo < hi:
            out.append((i, lo - int(starts[i]), hi - int(starts[i]), lo - start))
    return out
