"""The training loop, as the story of a step.

Each rank holds its block of training rows. A step computes the gradient of the rows of the
global batch that live on this rank with one fused kernel pass, reduces [gradient, loss sum,
row count, stop flag, step] in ONE allreduce (so the mean is exact whatever the split, all ranks
agree on stopping, and ranks that went out of step are caught), and updates the flat parameter
buffer. Rank 0 writes the run directory; checkpoints make every step resumable bit for bit.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping

import numpy as np

from .checkpoint import TrainState, resume_checkpoint, write_checkpoint
from .comm import make_backend
from .comm.base import Communicator, agree
from .config import Config
from .data.batches import EpochBatches
from .data.dataset import TrainingData, load_eval_data, load_training_data
from .data.fingerprint import fingerprint
from .data.reader import inspect_shared
from .device import Device, select_device
from .errors import EXIT_FAILED, EXIT_STOPPED, EXIT_WATCHDOG, DataError, LeptonError
from .evaluate import evaluate
from .faults import FaultHooks, StopFlag, Watchdog
from .log import Log
from .metrics import headline
from .models import Model, build_model, target_stats
from .models.io import save_model
from .optim import make_optimizer
from .optim.lbfgs import LBFGS
from .results import RunDir, check_run_dir, create_run_dir, versions, write_json
from .strategies import StepOutcome, check_comm_config, check_step, make_reduction, make_strategy

PROGRESS_EVERY_S = 10.0


class Stopped(LeptonError):
    """Training stopped on a signal after writing a checkpoint (exit code for requeueing)."""

    exit_code = EXIT_STOPPED
    collective = True


class Diverged(LeptonError):
    """The loss or the parameters stopped being finite: the run fails, its last good
    checkpoint is kept (none is written from the bad state)."""

    exit_code = EXIT_FAILED
    collective = True


class Timers:
    """Seconds spent per kind of work (io, compute, comm), summed over the run.

    ``with timers("compute"):`` times a block; a plain class, not a generator context manager,
    because it runs several times per training step.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: list[tuple[str, float]] = []

    def __call__(self, name: str) -> Timers:
        self._open.append((name, time.perf_counter()))
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        name, t0 = self._open.pop()
        self.seconds[name] += time.perf_counter() - t0


class Trainer:
    """Owns the pieces of one training run and the loop that drives them."""

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
    ) -> None:
        self.cfg, self.comm, self.log = cfg, comm, log
        # Files this run reads: never written or deleted, nor a directory holding one cleared.
        self.inputs = {"data.train": cfg.data.train, **(inputs or {})}
        if cfg.data.test:
            self.inputs["data.test"] = cfg.data.test
        if resume not in (None, "auto"):
            self.inputs["resume"] = resume
        self.lock = None  # rank 0's lock on the run directory, from its creation to the end
        # A stop signal during start-up (data loading can be long) is kept, not fatal: the
        # first step's allreduce carries it and the job checkpoints and stops there.
        self.stop = stop or StopFlag()
        self.stop.install()
        self.timers = Timers()
        self.t_start = time.perf_counter()
        self.run = RunDir(cfg.output.dir)
        agree(comm, lambda: check_comm_config(cfg))  # [comm] x [optim] combinations
        self.reducer = agree(comm, lambda: make_backend(cfg.comm.backend, comm))
        fresh = {"resume": resume is not None, "overwrite": overwrite, "inputs": self.inputs}
        agree(comm, lambda: check_run_dir(self.run.path, **fresh) if comm.is_root else None)
        with self.timers("io"):
            self.data: TrainingData = load_training_data(
                cfg.data, cfg.train.seed, comm, log, reproducible=cfg.comm.reproducible
            )
            # What the data hold (shapes, types, a hash of sampled rows): checkpoints and the
            # model carry it, and a resume on other data is refused.
            self.fingerprint = comm.bcast(
                agree(comm, lambda: self._fingerprint() if comm.is_root else None)
            )
        train = self.data.train
        val_rows = self.data.val.n_global if self.data.val is not None else 0
        self.dropped = self.data.info.n_rows - train.n_global - val_rows
        if self.dropped:
            log.warning(
                f"dropped {self.dropped} of {self.data.info.n_rows} rows of '{cfg.data.train}' "
                'holding NaN or Inf (data.nonfinite = "drop")'
            )
        agree(comm, self._check_rows)
        y_dim = 1 if train.y.ndim == 1 else train.y.shape[1]
        stats = target_stats(train.y, comm)
        where = f"'{cfg.data.train}:{cfg.data.y}'"
        self.model: Model = agree(
            comm, lambda: build_model(cfg.model, self.data.info.n_features, y_dim, stats, where)
        )
        self.device: Device = agree(
            comm, lambda: select_device(cfg.train.device, cfg.train.threads, comm)
        )
        self.X = self.device.place(train.X)
        self.y = self.device.place(train.y)
        self.X_val = None if self.data.val is None else self.device.place(self.data.val.X)
        self.sizes = np.asarray(self.model.sizes, dtype=np.int64)
        self.l2_mask = self.model.weight_mask() * cfg.model.l2
        self.l2_any = bool(self.l2_mask.any())
        P = self.model.n_params
        self.buf = np.zeros(P + 4)  # [grad (P), loss sum, rows, stop flag, step]
        self._sums = self.buf[: P + 2]  # what the kernel fills: [grad, loss sum, rows]
        self.reduction = make_reduction(self)  # how buf is summed (compressed, block-ordered)
        self.rows_seen = 0.0
        self.hooks = FaultHooks.from_env()
        self.watchdog = Watchdog(cfg.checkpoint.watchdog_s, self._on_watchdog)
        if cfg.data.test:  # a wrong test file fails now, not after hours of training
            test = inspect_shared(cfg.data.test, cfg.data.x, cfg.data.y, comm)
            agree(comm, lambda: self._check_test(test, None))
        # Inputs are valid: only now is the run directory created (or an old one cleared).
        agree(comm, lambda: self._create_run_dir(overwrite))
        try:
            self.state = self._initial_state(resume)
        except BaseException:
            self._release()
            raise

    # ---- set-up -------------------------------------------------------------------------
    def _check_rows(self) -> None:
        """Nothing left to train on (every row dropped or held out) is an error, not a run."""
        train, val = self.data.train, self.data.val
        if train.n_global == 0:
            held = f", {val.n_global} held out for validation" if val is not None else ""
            raise DataError(
                f"'{self.cfg.data.train}:{self.cfg.data.x}' leaves no training rows "
                f"({self.dropped} dropped as NaN or Inf{held})"
            )

    def _create_run_dir(self, overwrite: bool) -> None:
        if self.comm.is_root:
            self.lock = create_run_dir(self.run.path, overwrite=overwrite, inputs=self.inputs)
            if self.lock.warning:  # a file system without flock
                self.log.warning(self.lock.warning)

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _fingerprint(self) -> dict:
        d = self.cfg.data
        return fingerprint(d.train, d.x, d.y)

    def meta(self) -> dict:
        """What identifies this run's state: config, model, data, scaler and optimiser."""
        config = self.cfg.to_dict()
        return {
            "config": config,
            "model": self.model.spec(),
            "ranks": self.comm.size,
            "scaler": self.data.scaler.kind,
            "n_features": self.model.n_features,
            "data": self.fingerprint,
            "optimizer": {k: v for k, v in config["optim"].items() if k != "lr"},
        }

    def _initial_state(self, resume: str | None) -> TrainState:
        """A fresh state, or the checkpoint ``--resume`` names (``auto``: the newest good one)."""
        cfg = self.cfg
        if resume is not None:
            found = agree(
                self.comm, lambda: self._find_checkpoint(resume) if self.comm.is_root else None
            )
            found = self.comm.bcast(found)
            if found is not None:
                path, state = found
                self.log.info(f"resuming from {path} (epoch {state.epoch}, step {state.step})")
                return state
            self.log.info("no checkpoint to resume from: starting a new run")
        params = self.model.init_params(cfg.model.init, cfg.train.seed)
        opt = self._new_optimizer()
        return TrainState(params, opt.state(), meta=self.meta())

    def _find_checkpoint(self, resume: str):
        """Rank 0: the checkpoint to resume from, checked against this run (before any file of
        the directory is moved), on its branch; None when ``auto`` finds no checkpoint."""
        return resume_checkpoint(resume, self.run.checkpoints, self.meta(), self.log)

    def _new_optimizer(self):
        if self.cfg.optim.name == "lbfgs":
            return LBFGS(self.cfg.optim.history, self.cfg.optim.lr)
        return make_optimizer(self.cfg.optim, self.model.n_params)

    # ---- one step -----------------------------------------------------------------------
    def gradient(
        self, params: np.ndarray, X, y, step: int, batch: np.ndarray | None = None
    ) -> tuple[np.ndarray, StepOutcome]:
        """Global mean gradient of the batch (with L2) via one fused allreduce.

        ``batch``: the local row positions of X (None: all local rows), for block-ordered sums.
        """
        P = params.size
        buf = self.buf
        with self.timers("compute"):
            self.reduction.local_sums(params, X, y, self._sums, batch)
        buf[P + 2] = 1.0 if self.stop.requested else 0.0
        buf[P + 3] = self.hooks.before_step(self.comm.rank, step)
        with self.timers("comm"):
            self.reduction.reduce_(buf)
        loss, rows, stop, reported = buf[P:].tolist()  # Python floats: cheap to use below
        check_step(reported, step, self.comm.size)
        self.rows_seen += rows
        grad = buf[:P] / max(rows, 1.0)
        if self.l2_any:
            grad += self.l2_mask * params
        return grad, StepOutcome(loss, rows, stop > 0)

    # ---- the loops ----------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the end (or until stopped), then evaluate and write the run directory."""
        self.watchdog.start()
        if self.comm.is_root:
            self.run.status("running", step=self.state.step, ranks=self.comm.size)
        t_loop = time.perf_counter()
        try:
            if self.cfg.optim.name == "lbfgs":
                self._loop_lbfgs()
            else:
                self._loop_sgd()
            loop_s = time.perf_counter() - t_loop
            self.watchdog.pause()
            return self._finish(loop_s)  # writing the outputs can fail too: status says so
        except Stopped:
            raise
        except BaseException as exc:
            self._record_failure(exc)
            raise
        finally:
            self.watchdog.pause()
            self.stop.restore()
            self._release()

    def _loop_sgd(self) -> None:
        cfg, st = self.cfg, self.state
        opt = make_optimizer(cfg.optim, self.model.n_params)
        opt.load_state(st.optimizer)
        strategy = make_strategy(self, opt)  # sync, local_sgd or overlap
        train = self.data.train
        index = train.index()
        gather = self.device.batch_gather(train.X, train.y, self.X, self.y)
        plan = EpochBatches(index, train.n_global, cfg.train.batch_size, cfg.train.seed)
        while st.epoch < cfg.train.epochs:
            t_epoch = time.perf_counter()  # the epoch's time includes drawing its batches
            batches = plan(st.epoch)
            next_report = t_epoch + PROGRESS_EVERY_S
            while st.batch < len(batches):
                rows = self.reduction.arrange(batches[st.batch])
                X, y = self._batch(gather, rows, len(batches) == 1)
                out = strategy.step(st.params, X, y, st.step, rows)
                st.step += 1
                st.batch += 1
                every = cfg.checkpoint.every_steps
                if (
                    out.stop
                    or (every and st.step % every == 0)
                    or st.batch == len(batches)
                    or (cfg.train.max_steps and st.step >= cfg.train.max_steps)
                ):  # about to save or stop: local SGD averages, overlap drains its pipeline
                    out = out + strategy.settle(st.params, st.step)
                self._check_finite(out.loss_sum, st.step)
                st.epoch_loss += out.loss_sum
                st.epoch_rows += out.rows
                self.watchdog.beat(st.step)
                st.optimizer = opt.state()
                if out.stop:
                    self._stop_now()
                if cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0:
                    self.checkpoint()
                if cfg.train.max_steps and st.step >= cfg.train.max_steps:
                    break
                if time.perf_counter() > next_report:  # long epochs show progress (rank 0)
                    next_report += PROGRESS_EVERY_S
                    self.log.info(
                        f"  epoch {st.epoch + 1}: batch {st.batch}/{len(batches)}, "
                        f"loss {st.epoch_loss / max(st.epoch_rows, 1.0):.6g}"
                    )
            done = self._end_epoch(
                st.epoch_loss / max(st.epoch_rows, 1.0), time.perf_counter() - t_epoch
            )
            if done or (cfg.train.max_steps and st.step >= cfg.train.max_steps):
                break

    def _batch(self, gather, rows: np.ndarray, full: bool):
        if full:
            return self.X, self.y
        return gather(rows)

    def _loop_lbfgs(self) -> None:
        """Full-batch L-BFGS: an iteration is an "epoch"; each evaluation one pass and allreduce."""
        cfg, st = self.cfg, self.state
        opt = LBFGS(cfg.optim.history, cfg.optim.lr)
        opt.load_state(st.optimizer)
        stop_seen = False

        def fg(x: np.ndarray) -> tuple[float, np.ndarray]:
            nonlocal stop_seen
            grad, out = self.gradient(x, self.X, self.y, st.step)
            st.step += 1
            self.watchdog.beat(st.step)
            stop_seen |= out.stop
            penalty = 0.5 * float(np.sum(self.l2_mask * x * x))
            self._check_finite(out.loss_sum + penalty, st.step)
            return out.loss_sum / max(out.rows, 1.0) + penalty, grad

        if "g" in st.optimizer:
            f, g = float(st.optimizer["f"]), st.optimizer["g"]
        else:
            f, g = fg(st.params)
        while st.epoch < cfg.train.epochs and not opt.converged:
            t_epoch = time.perf_counter()
            f, g = opt.iterate(fg, st.params, f, g)
            st.optimizer = {**opt.state(), "f": np.array(f), "g": g.copy()}
            st.epoch_loss, st.epoch_rows = f, 1.0
            if stop_seen:
                self._stop_now()
            if self._end_epoch(f, time.perf_counter() - t_epoch):
                break

    def _end_epoch(self, loss: float, seconds: float) -> bool:
        """Metrics line, history, checkpoint, early stopping; True when training should end."""
        cfg, st = self.cfg, self.state
        entry = {"epoch": st.epoch + 1, "step": st.step, "loss": loss, "seconds": round(seconds, 6)}
        entry["train"] = self._metrics(self.X, self.data.train.y)
        if self.data.val is not None:
            entry["val"] = self._metrics(self.X_val, self.data.val.y)
        st.history.append(entry)
        st.epoch += 1
        st.batch = 0
        st.epoch_loss = st.epoch_rows = 0.0
        stop = self._early_stop(entry)
        if (st.epoch) % cfg.train.log_every == 0 or stop or st.epoch == cfg.train.epochs:
            shown = entry.get("val", entry["train"])
            part = "val" if "val" in entry else "train"
            self.log.info(
                f"epoch {st.epoch:>3}/{cfg.train.epochs}  step {st.step:>6}  loss {loss:.6g}  "
                f"{part} {headline(shown)}  ({seconds:.2f} s)"
            )
        if self.comm.is_root:
            self.run.write_history(st.history)
        if cfg.checkpoint.every_steps == 0:
            self.checkpoint()
        return stop

    def _metrics(self, X, y) -> dict:
        with self.timers("eval"):
            return evaluate(self.model, self.state.params, X, y, self.device, self.comm)

    def _early_stop(self, entry: dict) -> bool:
        patience = self.cfg.train.patience
        if patience == 0 or "val" not in entry:
            return False
        key = "mse" if self.model.head == "squared" else "log_loss"
        value, best = entry["val"][key], self.state.best
        if not best or value < best["value"]:
            self.state.best = {
                "value": value,
                "epoch": entry["epoch"],
                "params": self.state.params.copy(),
            }
            return False
        return entry["epoch"] - best["epoch"] >= patience

    # ---- checkpoints, stopping, the end -------------------------------------------------
    def _check_finite(self, loss: float, step: int) -> None:
        """A NaN or Inf loss (the same reduced value on every rank) ends the run as failed."""
        if not math.isfinite(loss):
            raise Diverged(
                f"training diverged at step {step}: the loss is {loss}; the last good checkpoint "
                f"is kept in {self.run.checkpoints}/ (lower optim.lr, or check the data's scale)"
            )

    def _check_params(self) -> None:
        """Settled parameters are the same on every rank, so every rank decides alike."""
        if not np.isfinite(self.state.params).all():
            raise Diverged(
                f"training diverged by step {self.state.step}: the parameters are not finite; "
                f"the last good checkpoint is kept in {self.run.checkpoints}/ (lower optim.lr)"
            )

    def checkpoint(self) -> None:
        self._check_params()
        if self.comm.is_root:
            with self.timers("checkpoint"):
                write_checkpoint(self.run.checkpoints, self.state, self.cfg.checkpoint.keep)
        self.comm.barrier()

    def _stop_now(self) -> None:
        """All ranks saw the stop flag in the same allreduce: checkpoint and leave together."""
        self.checkpoint()
        step = self.state.step
        if self.comm.is_root:
            self.run.status(
                "stopped",
                step=step,
                epoch=self.state.epoch,
                signal=self.stop.signum,
                resume="lepton train CONFIG --resume auto",
            )
        raise Stopped(
            f"stopped by signal at step {step}; checkpoint written, resume with --resume auto"
        )

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

    def _on_watchdog(self, step: int, idle: float) -> None:
        msg = (
            f"watchdog: step {step} has not advanced for {idle:.0f} s "
            f"(checkpoint.watchdog_s = {self.cfg.checkpoint.watchdog_s:g}); ending the job"
        )
        # Any rank's watchdog may fire first (rank 0 may be the frozen one): each tries to write
        # the status (per-process temporary name), and ends the job whatever that gave.
        try:
            self.log.error(msg)
            self._status_best_effort("failed", step=step, rank=self.comm.rank, error=msg)
        finally:
            self.comm.abort(EXIT_WATCHDOG)

    def _finish(self, loop_s: float) -> dict:
        cfg, st, comm = self.cfg, self.state, self.comm
        if st.best.get("params") is not None:
            st.params = st.best["params"]
            self.log.info(f"early stopping: restored the parameters of epoch {st.best['epoch']}")
        self._check_params()
        final = {"train": self._metrics(self.X, self.data.train.y)}
        if self.data.val is not None:
            final["val"] = self._metrics(self.X_val, self.data.val.y)
        if cfg.data.test:
            with self.timers("io"):
                test, info = load_eval_data(
                    cfg.data.test,
                    cfg.data.x,
                    cfg.data.y,
                    self.data.scaler,
                    comm,
                    self.log,
                    cfg.data.nonfinite,
                )
            stats = target_stats(test.y, comm)
            agree(comm, lambda: self._check_test(info, stats))
            final["test"] = self._metrics(self.device.place(test.X), test.y)
        total = time.perf_counter() - self.t_start
        secs = self.timers.seconds
        results = {
            "status": "completed",
            "ranks": comm.size,
            "device": self.device.name,
            "threads_per_rank": self.device.threads,
            "epochs": st.epoch,
            "steps": st.step,
            "model": self.model.spec(),
            "n_params": self.model.n_params,
            "rows": {
                "train": self.data.train.n_global,
                "val": self.data.val.n_global if self.data.val else 0,
            },
            "metrics": final,
            "timing": {
                "io_s": secs["io"],
                "compute_s": secs["compute"],
                "comm_s": secs["comm"],
                "eval_s": secs["eval"],
                "checkpoint_s": secs["checkpoint"],
                "loop_s": loop_s,
                "total_s": total,
            },
            "throughput": {"rows_per_s": self.rows_seen / max(loop_s, 1e-12)},
            "config": cfg.to_dict(),
            "versions": versions(),
        }
        if comm.is_root:
            save_model(self.run.model_file, self.model, st.params, self.data.scaler, self.meta())
            write_json(self.run.results_file, results)
            if cfg.output.plot and st.history:
                from .plot import plot_history

                plot_history(st.history, self.run.plot_file, self.model.is_classifier)
            self.run.status("completed", step=st.step, epoch=st.epoch)
        comm.barrier()
        return results

    def _check_test(self, info, stats) -> None:
        from .models import check_labels
        from .models.io import check_features

        check_features(
            self.model, info.n_features, f"'{info.path}:{info.x}'", str(self.run.model_file)
        )
        if stats is not None:
            check_labels(self.model, stats, f"'{info.path}:{info.y}'")


def train(
    cfg: Config,
    comm: Communicator,
    log: Log,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    stop: StopFlag | None = None,
    inputs: Mapping[str, str] | None = None,
) -> dict:
    """Run one training job described by ``cfg`` on the ranks of ``comm``; returns results.

    ``inputs``: further files the run reads (the config), named by role, that the run
    directory's guards protect besides the data files."""
    trainer = Trainer(cfg, comm, log, resume=resume, overwrite=overwrite, stop=stop, inputs=inputs)
    return trainer.fit()
