"""A training run from start to end: set up, loop, write the results.

Each rank holds its block of training rows. A step computes the gradient of the rows of the
global batch that live on this rank with one fused kernel pass, reduces [gradient, loss sum,
row count, stop flag, step] in ONE allreduce (so the mean is exact whatever the split, all ranks
agree on stopping, and ranks that went out of step are caught), and updates the flat parameter
buffer. Rank 0 writes the run directory; checkpoints make every step resumable bit for bit.

The pieces live in ``lepton_hpc.training``: ``setup`` (checks, data, model, device, resume),
``step`` (the fused buffer), ``strategies`` (sync, local SGD, overlap), ``loop`` (epochs,
metrics, early stopping, checkpoints). ``Trainer`` owns them for one run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from .comm.base import Communicator, agree
from .config import Config
from .data.dataset import load_eval_data
from .errors import EXIT_WATCHDOG, LeptonError
from .faults import FaultHooks, StopFlag, Watchdog
from .log import Log
from .models import target_stats
from .models.io import save_model
from .optim import make_optimizer
from .results import build_results, peak_rss_mb, write_json
from .training.loop import Diverged, Loop, Stopped, TensorLoop
from .training.setup import prepare
from .training.step import Timers
from .training.streamed import streamed_test_metrics

__all__ = ["Diverged", "Stopped", "Trainer", "train"]


class Trainer:
    """Owns the pieces of one training run: its set-up, step context, optimiser and state."""

    def __init__(
        self,
        cfg: Config,
        comm: Communicator,
        log: Log,
        *,
        resume: str | None = None,
        overwrite: bool = False,
        stop: StopFlag | None = None,
        inputs: Mapping[str, str] | None = None,
        source=None,
    ) -> None:
        self.cfg, self.comm, self.log = cfg, comm, log
        # A stop signal during start-up (data loading can be long) is kept, not fatal: the
        # first step's allreduce carries it and the job checkpoints and stops there.
        self.stop = stop or StopFlag()
        self.stop.install()
        self.timers = Timers()
        self.t_start = time.perf_counter()
        s = self.setup = prepare(
            cfg,
            comm,
            log,
            self.timers,
            resume=resume,
            overwrite=overwrite,
            inputs=inputs,
            source=source,
        )
        self.run = s.run
        # the run's only optimiser; with model.parallel = "tensor", of this rank's slice
        n_params = s.model.n_params if s.grid is None else s.grid.n_local
        self.opt = make_optimizer(cfg.optim, n_params)
        hooks = FaultHooks.from_env()
        self.ctx = s.step_context(self.timers, self.stop, hooks)
        self.watchdog = Watchdog(
            cfg.checkpoint.watchdog_s,
            self._on_watchdog,
            scale=hooks.watchdog_scale,
            on_arm=self._on_watchdog_armed,
        )
        s.check_test_file()
        # Inputs are valid: only now is the run directory created (or an old one cleared).
        agree(comm, lambda: s.create_run_dir(overwrite))
        try:
            self.state = s.initial_state(resume, self.opt)
            if s.grid is not None:  # keep only this rank's slice
                self.state = s.grid.localize(self.state)
        except BaseException:
            s.release()
            raise

    def fit(self) -> dict:
        """Train to the end (or until stopped), then evaluate and write the run directory."""
        self.watchdog.start()
        if self.comm.is_root:
            self.run.status("running", step=self.state.step, ranks=self.comm.size)
        t_loop = time.perf_counter()
        try:
            kind = Loop if self.setup.grid is None else TensorLoop
            loop = kind(self.setup, self.ctx, self.opt, self.state, self.watchdog)
            loop.run()
            loop_s = time.perf_counter() - t_loop
            self.watchdog.pause()
            return self._finish(loop, loop_s)  # writing the outputs can fail too: status says so
        except Stopped:
            raise
        except BaseException as exc:
            self._record_failure(exc)
            raise
        finally:
            self.watchdog.pause()
            self.stop.restore()
            self.setup.release()

    def _finish(self, loop: Loop, loop_s: float) -> dict:
        cfg, st, comm, s = self.cfg, self.state, self.comm, self.setup
        if st.best.get("params") is not None:
            st.params = st.best["params"]
            self.log.info(f"early stopping: restored the parameters of epoch {st.best['epoch']}")
        loop.check_params()
        params = loop.model_params()  # on rank 0 (tensor parallelism: gathered from slices)
        train_metrics, val_metrics = loop.split_metrics()
        final = {"train": train_metrics}
        if val_metrics is not None:
            final["val"] = val_metrics
        if cfg.data.test and s.stream is not None:  # streamed like the training rows
            with self.timers("eval"):
                final["test"] = streamed_test_metrics(s, st.params)
        elif cfg.data.test:
            with self.timers("io"):
                d = cfg.data

                def load():
                    return load_eval_data(
                        d.test, d.x, d.y, s.data.scaler, s.data_comm, self.log, d.nonfinite
                    )

                # a grid's data groups read alone: an error one finds is shared with all
                test, info = load() if s.grid is None else agree(comm, load)
            stats = target_stats(test.y, comm)
            agree(comm, lambda: s.check_test(info, stats))
            final["test"] = loop.metrics(s.device.place(test.X), test.y)
        rows_train = s.data.train.n_global
        rows_val = s.data.val.n_global if s.data.val else 0
        if cfg.comm.strategy == "fedavg":  # each client's split counts its own file's rows
            counts = np.array([s.data.train.n, s.data.val.n if s.data.val else 0], np.float64)
            rows_train, rows_val = (int(v) for v in comm.allreduce_(counts))
        results = build_results(
            ranks=comm.size,
            device=s.device.name,
            threads=s.device.threads,
            epochs=st.epoch,
            steps=st.step,
            model=s.model.spec(),
            n_params=s.model.n_params,
            rows_train=rows_train,
            rows_val=rows_val,
            metrics=final,
            seconds=self.timers.seconds,
            loop_s=loop_s,
            total_s=time.perf_counter() - self.t_start,
            rows_seen=loop.rows_seen,
            config=cfg.to_dict(),
            ranks_timing=comm.allgather(loop.rank_timing()),  # one small gather per run
            memory=_memory(comm, s, st),
        )
        if comm.is_root:
            save_model(self.run.model_file, s.model, params, s.data.scaler, s.meta())
            write_json(self.run.results_file, results)
            if cfg.output.plot and st.history:
                from .plot import plot_history

                plot_history(st.history, self.run.plot_file, s.model.is_classifier)
            self.run.status("completed", step=st.step, epoch=st.epoch)
        comm.barrier()
        return results

    # ---- failures -----------------------------------------------------------------------
    def _record_failure(self, exc: BaseException) -> None:
        """status.json says failed, with the rank and error; rank 0 writes an error all share.

        Best effort: when the file system refuses the write (full, quota), the original error
        still ends the job."""
        collective = isinstance(exc, LeptonError) and exc.collective
        if self.comm.is_root or not collective:
            self._status_best_effort(
                "failed",
                step=self.state.step,
                rank=self.comm.rank,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _status_best_effort(self, state: str, **fields) -> None:
        try:
            self.run.status(state, **fields)
        except Exception as exc:  # noqa: BLE001 - the job is ending anyway; say why not written
            self.log.warning(f"could not write {self.run.status_file}: {exc}", all_ranks=True)

    def _on_watchdog_armed(self, limit: float) -> None:
        self.log.info(f"watchdog: auto, ending the job if a step takes over {limit:.3g} s")

    def _on_watchdog(self, step: int, idle: float) -> None:
        setting = self.cfg.checkpoint.watchdog_s
        limit = self.watchdog.limit()
        shown = f"auto, limit {limit:.3g} s" if setting == "auto" else f"{setting:g}"
        msg = (
            f"watchdog: step {step} has not advanced for {idle:.0f} s "
            f"(checkpoint.watchdog_s = {shown}); ending the job"
        )
        # Any rank's watchdog may fire first (rank 0 may be the frozen one): each tries to write
        # the status (per-process temporary name), and ends the job whatever that gave.
        try:
            self.log.error(msg)
            self._status_best_effort("failed", step=step, rank=self.comm.rank, error=msg)
        finally:
            self.comm.abort(EXIT_WATCHDOG)


def _memory(comm: Communicator, setup, state) -> dict:
    """results.json's ``memory``: each rank's peak resident MiB, the MiB of rows it holds
    (streamed rows: its two read buffers) and the MiB of parameters and optimiser state it
    holds (with tensor parallelism, its slices)."""
    data = setup.data
    if setup.stream is not None:
        held = setup.stream.buffer_bytes() / 2**20
    else:
        parts = [data.train] + ([data.val] if data.val is not None else [])
        held = sum(p.X.nbytes + p.y.nbytes for p in parts) / 2**20
    arrays = [state.params, *state.optimizer.values()]
    model = sum(a.nbytes for a in arrays if isinstance(a, np.ndarray)) / 2**20
    peaks = comm.allgather((peak_rss_mb(), held, model))
    return {
        "peak_rss_mb": [p[0] for p in peaks],
        "data_mb": [p[1] for p in peaks],
        "model_mb": [p[2] for p in peaks],
    }


def train(
    cfg: Config,
    comm: Communicator,
    log: Log,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    stop: StopFlag | None = None,
    inputs: Mapping[str, str] | None = None,
    source=None,
) -> dict:
    """Run one training job described by ``cfg`` on the ranks of ``comm``; returns results.

    ``inputs``: further files the run reads (the config), named by role, that the run
    directory's guards protect besides the data files. ``source``: training rows already in
    memory (``data.memory.ArraySource``), used instead of ``cfg.data.train``."""
    trainer = Trainer(
        cfg,
        comm,
        log,
        resume=resume,
        overwrite=overwrite,
        stop=stop,
        inputs=inputs,
        source=source,
    )
    return trainer.fit()
