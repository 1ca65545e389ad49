"""The ``lepton`` command: one entry point, one guard around every subcommand.

``main`` installs the guard that mpi4py's ``python -m mpi4py`` stands for: an exception that
escapes on one rank is printed once with its rank id and the whole job is aborted, instead of
leaving the other ranks blocked in their next collective. Errors every rank raised together are
printed once by rank 0 and end the job cleanly with their exit code.

Before the subcommand runs, every rank reads the test hooks (``lepton_hpc.testhooks``) from its
environment, once; when any is set, rank 0 says so in one warning line.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .errors import EXIT_FAILED, LeptonError
from .safety import REFUSED as REFUSED_WRITES


def launcher_rank() -> int:
    """This process's rank as the launcher tells it (before MPI is up), for printing only."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class Parser(argparse.ArgumentParser):
    """argparse that prints usage errors once (rank 0), not once per rank."""

    def error(self, message: str):  # type: ignore[override]
        if launcher_rank() == 0:
            self.print_usage(sys.stderr)
            print(f"lepton: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    p = Parser(
        prog="lepton", description="MPI data-parallel training and batch prediction from HDF5."
    )
    p.add_argument("--version", action="version", version=f"lepton_hpc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for register in commands.REGISTRY:
        register(sub)
    return p


def run_guarded(func, args: argparse.Namespace) -> int:
    """Run a subcommand on every rank; see the module docstring for what happens on errors."""
    from .comm import SerialComm, world
    from .log import Log

    # An orchestrator (``lepton bench``) launches its own mpiexec jobs: it must not start MPI.
    comm = world() if getattr(args, "needs_mpi", True) else SerialComm()
    log = Log(comm.rank, comm.size)
    try:
        start_hooks(comm, log)
        return int(func(args, comm, log) or 0)
    except LeptonError as exc:
        if exc.collective:
            if comm.is_root:
                print(f"lepton: error: {exc}", file=sys.stderr, flush=True)
            elif log.verbose:
                log.error(str(exc))
            return exc.exit_code
        log.error(str(exc))
        if comm.size > 1:
            comm.abort(exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        if comm.size > 1:
            comm.abort(130)
        return 130
    except BaseException as exc:
        if isinstance(exc, SystemExit) and comm.size == 1:
            raise
        if isinstance(exc, OSError) and exc.errno in REFUSED_WRITES:
            # The system refused a write (full disk, quota, read-only): one line, no traceback.
            where = f" writing '{exc.filename}'" if exc.filename else ""
            log.error(f"the file system refused{where}: {os.strerror(exc.errno)}")
        else:
            tb = "".join(traceback.format_exception(exc))
            where = f"rank {comm.rank} of {comm.size}"
            print(f"lepton: unexpected error on {where}:\n{tb}", file=sys.stderr, flush=True)
        if comm.size > 1:
            comm.abort(EXIT_FAILED)
        return EXIT_FAILED


def start_hooks(comm, log) -> None:
    """Read the test hooks on every rank (a malformed value fails all ranks together) and
    announce the active ones on rank 0."""
    from . import testhooks
    from .comm.base import agree

    hooks = agree(comm, testhooks.load)
    if hooks.active:
        log.warning(hooks.announcement())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # ``lepton train c.toml --resume auto optim.lr=0.1``: overrides may follow the options.
    if extra and isinstance(getattr(args, "overrides", None), list):
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if not stray:
            args.overrides += extra
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_guarded(args.func, args)
