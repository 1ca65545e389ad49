"""The epochs: the mini-batch loop (sgd, momentum, adam under any strategy) and the full-batch
L-BFGS loop, with epoch metrics, early stopping, checkpoint cadence, stopping on a signal and
the divergence checks. Work between steps (evaluation, checkpoints) runs inside the watchdog's
``hold``; once per epoch each rank's step work is timed and a tiny allgather names stragglers
(and, with ``data.balance = "speed"``, feeds ``training/balance.py``, which may re-cut the
training rows between epochs).

Every decision here (stop, checkpoint, diverged, early stop) is taken from values that are the
same on every rank (reduced losses, settled parameters), so all ranks take it together.
"""

from __future__ import annotations

import math
import socket
import statistics
import time

import numpy as np

from ..checkpoint import Mirror, TrainState, write_checkpoint
from ..compile_clock import compile_clock
from ..data.batches import EpochBatches
from ..data.stream import StreamBatches
from ..errors import EXIT_FAILED, EXIT_STOPPED, LeptonError
from ..faults import STRAGGLER_EPOCHS, Stragglers, Watchdog
from ..inference import evaluate
from ..metrics import headline
from .async_sgd import SharedModel
from .balance import Balancer
from .setup import RunSetup
from .step import StepContext
from .strategies import make_strategy
from .streamed import streamed_metrics

PROGRESS_EVERY_S = 10.0


_ALL = np.zeros(0, dtype=np.int64)


def _streamed_plan(epoch: int) -> list[np.ndarray]:  # noqa: ARG001
    """Streamed rows: one full-batch step an epoch (its rows are the stream's pieces)."""
    return [_ALL]


class Stopped(LeptonError):
    """Training stopped on a signal after writing a checkpoint (exit code for requeueing)."""

    exit_code = EXIT_STOPPED
    collective = True


class Diverged(LeptonError):
    """The loss or the parameters stopped being finite: the run fails, its last good
    checkpoint is kept (none is written from the bad state)."""

    exit_code = EXIT_FAILED
    collective = True


class Loop:
    """Drives ``state`` to the end of training with ``opt`` on the pieces of ``setup``.

    ``rows_seen``: rows summed by every reduction (for the throughput in results.json);
    ``work_s``, ``comm_s``: this rank's time in the steps outside the reduction,
    in the reduction (mostly waiting for the slowest rank); see ``rank_timing``.
    """

    def __init__(
        self, setup: RunSetup, ctx: StepContext, opt, state: TrainState, watchdog: Watchdog
    ) -> None:
        self.setup, self.ctx, self.opt, self.state = setup, ctx, opt, state
        self.cfg, self.comm, self.log = setup.cfg, setup.comm, setup.log
        self.watchdog = watchdog
        ck = self.cfg.checkpoint  # rank 0 copies each checkpoint to checkpoint.mirror, if set
        self.mirror = Mirror.open(ck.mirror, setup.run.path, state, self.log, self.comm.is_root)
        self.rows_seen = 0.0
        self.work_s = self.comm_s = self.held_s = 0.0  # held_s: checkpoints between steps
        self.first_step = state.step  # rank_timing counts the steps this process ran
        self.stragglers = Stragglers()
        self.fed = None  # the fedavg strategy: epochs end rounds only at its word
        # data.balance = "speed": rows re-cut by the ranks' speeds between epochs
        self.balancer = None
        if self.cfg.data.balance == "speed" and setup.stream is None and setup.grid is None:
            self.balancer = Balancer(setup, ctx)
        self._measured: tuple[list[float], list[int]] | None = None  # the last epoch's
        self.pushes = [0, 0]  # comm.strategy = "async": gradients applied, dropped as too stale
        self.max_staleness = 0  # and the largest staleness of an applied one

    def run(self) -> None:
        """Train to the end (epochs, max_steps, early stopping); raises Stopped on a signal.

        Kernel compilation inside the loop is recorded as ``timers.seconds["compile_loop"]``
        (results.json's throughput leaves it out of the loop's time) and, where no timed block
        counted it (the batch gather runs between them), added to ``seconds["compile"]``.
        """
        self.opt.load_state(self.state.optimizer)
        clock, seconds = compile_clock(), self.ctx.timers.seconds
        c0, timed0 = clock.now(), seconds["compile"]
        try:
            if self.opt.full_batch_line_search:
                self._full_batch()
            elif self.cfg.comm.strategy == "async":
                self._async()
            else:
                self._mini_batch()
        finally:  # however the loop ends, rank 0 waits (bounded) for the last mirror copy
            in_loop = clock.now() - c0
            seconds["compile_loop"] += in_loop
            seconds["compile"] += max(0.0, in_loop - (seconds["compile"] - timed0))
            if self.mirror.directory is not None:
                self.watchdog.pause()
                self.mirror.close()

    # ---- the loops ----------------------------------------------------------------------
    def _mini_batch(self) -> None:
        cfg, st, s, opt = self.cfg, self.state, self.setup, self.opt
        strategy = make_strategy(  # sync, local_sgd, overlap, fedavg
            cfg.comm,
            self.ctx,
            opt,
            st.params,
            seed=cfg.train.seed,
            rows=s.data.train.n,
            epochs=cfg.train.epochs,
        )
        fed = self.fed = strategy if getattr(strategy, "federated", False) else None
        if s.stream is None:
            gather, plan = self._rows_plan()
        elif cfg.train.batch_size == 0:  # one step an epoch; the reduction reads the pieces
            gather, plan = None, _streamed_plan
        else:  # windows of the file read in turn, each shuffled into batches
            gather = None

            def plan(epoch: int) -> StreamBatches:
                return StreamBatches(
                    s.stream, epoch, cfg.train.batch_size, cfg.train.seed, self.ctx.reduction
                )

        every, max_steps = cfg.checkpoint.every_steps, cfg.train.max_steps
        stop_after_round = False
        while st.epoch < cfg.train.epochs:
            t_epoch = time.perf_counter()  # the epoch's time includes drawing its batches
            mark = self._epoch_mark()
            batches = plan(st.epoch)
            take = getattr(batches, "gather", gather)  # streamed windows gather their own rows
            whole = len(batches) == 1 and take is gather  # the rank's rows are the batch
            if fed is not None:  # a round starts: its clients; one empty step for the others
                fed.begin_epoch(st.params, st.epoch, st.step)
                batches = batches if fed.active else [batches[0][:0]]
            next_report = t_epoch + PROGRESS_EVERY_S
            while st.batch < len(batches):
                rows = self.ctx.reduction.arrange(batches[st.batch])
                X, y = (s.X, s.y) if whole else take(rows)
                out = strategy.step(st.params, X, y, st.step, rows)
                st.step += 1
                st.batch += 1
                if (
                    out.stop
                    or (every and st.step % every == 0)
                    or st.batch == len(batches)
                    or (max_steps and st.step >= max_steps)
                ):  # about to save or stop: local SGD averages, overlap drains its pipeline
                    out = out + strategy.settle(st.params, st.step)
                    if fed is not None and fed.round_done:  # client steps of every client
                        st.step = fed.global_step
                    st.optimizer = opt.state()  # what a checkpoint saves (not every step)
                self.rows_seen += out.rows
                self._check_finite(out.loss_sum, st.step)
                st.epoch_loss += out.loss_sum
                st.epoch_rows += out.rows
                self.watchdog.beat(st.step)
                if out.stop and fed is not None:  # after the round's metrics and checkpoint
                    stop_after_round = True
                elif out.stop:
                    self.stop_now()
                if every and st.step % every == 0:
                    self._held_checkpoint()
                if max_steps and st.step >= max_steps:
                    break
                if time.perf_counter() > next_report:  # long epochs show progress (rank 0)
                    next_report += PROGRESS_EVERY_S
                    self.log.info(
                        f"  epoch {st.epoch + 1}: batch {st.batch}/{len(batches)}, "
                        f"loss {st.epoch_loss / max(st.epoch_rows, 1.0):.6g}"
                    )
            if isinstance(batches, StreamBatches):
                batches.close()
            self._epoch_timing(mark)
            done = self._end_epoch(
                st.epoch_loss / max(st.epoch_rows, 1.0), time.perf_counter() - t_epoch
            )
            if stop_after_round and not done and st.epoch < cfg.train.epochs:
                self.stop_now()  # fedavg: the state is the round's end, whole on every rank
            if done or (max_steps and st.step >= max_steps):
                break
            if st.epoch < cfg.train.epochs and self._balance():
                gather, plan = self._rows_plan()  # the rows moved

    def _rows_plan(self) -> tuple:
        """The batch gather and the epochs' batch plan of this rank's training rows in memory
        (made again after ``data.balance`` moved rows)."""
        s, train, ctx = self.setup, self.setup.data.train, self.ctx
        gather = None  # the batch's rows read where they are, where the kernel can
        if getattr(ctx.reduction, "in_place", False):
            gather = s.device.taken_gather(train.X, train.y, ctx.sizes, ctx.head)
        if gather is None:
            gather = s.device.batch_gather(train.X, train.y, s.X, s.y)
        index = range(train.offset, train.offset + train.n)  # this rank's training rows
        row_bytes = train.X[:1].nbytes + train.y[:1].nbytes
        plan = EpochBatches(
            index, train.n_global, self.cfg.train.batch_size, self.cfg.train.seed, row_bytes
        )
        return gather, plan

    def _full_batch(self) -> None:
        """Full-batch L-BFGS: an iteration is an "epoch"; each evaluation one pass and allreduce."""
        cfg, st, s, ctx, opt = self.cfg, self.state, self.setup, self.ctx, self.opt
        stop_seen = False

        def fg(x: np.ndarray) -> tuple[float, np.ndarray]:
            nonlocal stop_seen
            grad, out = ctx.gradient(x, s.X, s.y, st.step)
            self.rows_seen += out.rows
            st.step += 1
            self.watchdog.beat(st.step)
            stop_seen |= out.stop
            penalty = 0.5 * float(np.sum(ctx.l2_mask * x * x))
            self._check_finite(out.loss_sum + penalty, st.step)
            return out.loss_sum / max(out.rows, 1.0) + penalty, grad

        if "g" in st.optimizer:
            f, g = float(st.optimizer["f"]), st.optimizer["g"]
        else:
            f, g = fg(st.params)
        while st.epoch < cfg.train.epochs and not opt.converged:
            t_epoch = time.perf_counter()
            mark = self._epoch_mark()
            f, g = opt.iterate(fg, st.params, f, g)
            self._epoch_timing(mark)
            st.optimizer = {**opt.state(), "f": np.array(f), "g": g.copy()}
            st.epoch_loss, st.epoch_rows = f, 1.0
            if stop_seen:
                self.stop_now()
            if self._end_epoch(f, time.perf_counter() - t_epoch):
                break
            if st.epoch < cfg.train.epochs and not opt.converged:
                self._balance()  # fg reads s.X and s.y at each call

    def _async(self) -> None:
        """``comm.strategy = "async"`` (``training/async_sgd.py``): each rank pushes its
        gradients to the shared model on rank 0 without waiting for the others; an epoch ends
        after as many applied updates as a sync epoch has steps x ranks, then every rank takes
        the shared state and the epoch ends as any other (metrics, checkpoint, stop)."""
        cfg, st, ctx = self.cfg, self.state, self.ctx
        train = self.setup.data.train
        gather, plan = self._rows_plan()
        P, ranks = ctx.n_params, self.comm.size
        shared = SharedModel(self.comm.mpi_comm, self.opt, st.params, st.step)
        bound, max_steps = cfg.comm.max_staleness, cfg.train.max_steps
        out = np.empty(P + 2)
        laps, batches, at = st.epoch, plan(st.epoch), 0  # this rank's own pass over its rows
        while st.epoch < cfg.train.epochs:
            t_epoch = time.perf_counter()
            mark = self._epoch_mark()
            # the same on every rank; st.batch: updates a stopped attempt applied in the epoch
            start = shared.version
            target = start + plan.steps * ranks - st.batch
            if max_steps:
                target = min(target, max_steps)
            while not shared.ended:
                if at == len(batches):
                    laps, at = laps + 1, 0
                    batches = plan(laps)
                rows = batches[at]
                at += 1
                if rows.size == 0 and train.n > 0:  # an empty share of a global batch
                    continue
                ctx.hooks.before_step(self.comm.rank, shared.version)
                grad, loss, n = None, 0.0, 0.0
                if rows.size:
                    X, y = gather(rows)
                    params = shared.params  # the copy the last push or read left here
                    with ctx.timers("compute"):
                        ctx.kernel(X, y, params, out)
                    loss, n = float(out[P]), float(out[P + 1])
                    grad = ctx.mean_gradient(out[:P], n, params)
                else:  # no rows at all: wait for the others' epoch to end
                    time.sleep(0.001)
                with ctx.timers("comm"):
                    applied, staleness = shared.push(
                        grad, loss, n, shared.version, bound, target, ctx.stop.requested
                    )
                self.pushes[0 if applied else 1] += grad is not None
                if applied:
                    self.max_staleness = max(self.max_staleness, staleness)
                self.watchdog.beat(shared.version)
            loss_sum, rows_sum, stop = shared.end_epoch()
            st.params[:] = shared.params
            self.opt.load_state(shared.state())
            st.optimizer = self.opt.state()
            st.step = shared.version
            st.batch += st.step - start
            st.epoch_loss += loss_sum
            st.epoch_rows += rows_sum
            self.rows_seen += rows_sum
            self._check_finite(st.epoch_loss, st.step)
            if stop:  # mid-epoch: a resumed run applies the epoch's remaining updates
                self.stop_now()
            self._epoch_timing(mark)
            done = self._end_epoch(
                st.epoch_loss / max(st.epoch_rows, 1.0), time.perf_counter() - t_epoch
            )
            if done or (max_steps and st.step >= max_steps):
                break
        shared.free()

    # ---- epochs -------------------------------------------------------------------------
    def _end_epoch(self, loss: float, seconds: float) -> bool:
        """Metrics line, history, checkpoint, early stopping; True when training should end."""
        with self.watchdog.hold():  # evaluation and checkpoint: not a step
            return self._epoch_end(loss, seconds)

    def _epoch_end(self, loss: float, seconds: float) -> bool:
        cfg, st, s, fed = self.cfg, self.state, self.setup, self.fed
        if fed is not None and not fed.round_done:  # a local epoch inside a round: no metrics,
            st.epoch += 1  # no checkpoint (the clients' models differ until the round's average)
            st.batch = 0
            st.epoch_loss = st.epoch_rows = 0.0
            return False
        entry = {"epoch": st.epoch + 1, "step": st.step, "loss": loss, "seconds": round(seconds, 6)}
        if fed is not None:  # loss: the sampled clients' mean training loss over the round
            entry.update(round=fed.round + 1, sampled=fed.sampled.tolist(), client_loss=loss)
        entry["train"], val = self.split_metrics()
        if val is not None:
            entry["val"] = val
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
            s.run.write_history(st.history)
        if cfg.checkpoint.every_steps == 0:
            self.checkpoint()
        return stop

    def _epoch_mark(self) -> tuple[float, float, float, float]:
        seconds = self.ctx.timers.seconds
        return time.perf_counter(), seconds["comm"], self.held_s, compile_clock().now()

    def _epoch_timing(self, mark: tuple[float, float, float, float]) -> None:
        """Add this epoch's step work and reduction time; name stragglers (one allgather that
        also carries, for data.balance, the work without kernel compilation and the rows)."""
        t0, comm0, held0, compiled0 = mark
        comm = self.ctx.timers.seconds["comm"] - comm0
        work = time.perf_counter() - t0 - comm - (self.held_s - held0)
        self.work_s += work
        self.comm_s += comm
        if self.comm.size == 1:
            return
        compiled = compile_clock().now() - compiled0
        rows = self.setup.data.train.n if self.balancer is not None else 0
        mine = (work, socket.gethostname(), max(0.0, work - compiled), rows)
        gathered = self.comm.allgather(mine)
        works = [g[0] for g in gathered]
        self._measured = ([g[2] for g in gathered], [g[3] for g in gathered])
        for rank in self.stragglers.update(works):
            median = statistics.median(works[:rank] + works[rank + 1 :])
            self.log.warning(
                f"straggler: rank {rank} on host {gathered[rank][1]} spent {works[rank]:.2f} s "
                f"in its steps in epoch {self.state.epoch + 1}, the other ranks {median:.2f} s "
                f"(median), {STRAGGLER_EPOCHS} epochs in a row: a slow or overloaded node slows "
                "every rank"
            )

    def _balance(self) -> bool:
        """data.balance = "speed": re-cut the rows by the ranks' speeds measured in the epoch
        that just ended (between steps, under the watchdog's hold); True when rows moved."""
        if self.balancer is None or self._measured is None:
            return False
        works, rows = self._measured
        self._measured = None
        with self.watchdog.hold():
            return self.balancer.after_epoch(self.state.epoch, works, rows)

    def rank_timing(self) -> dict:
        """This rank's step work, reduction time and steps, for results.json's ranks_timing."""
        return {
            "host": socket.gethostname(),
            "compute_s": self.work_s,
            "comm_s": self.comm_s,
            "steps": self.state.step - self.first_step,
            **({"rows": self.setup.data.train.n} if self.balancer is not None else {}),
            **(
                {
                    "updates_applied": self.pushes[0],
                    "updates_dropped": self.pushes[1],
                    "max_staleness": self.max_staleness,
                }
                if self.cfg.comm.strategy == "async"
                else {}
            ),
        }

    def split_metrics(self) -> tuple[dict, dict | None]:
        """Metrics of the current parameters on the training and validation rows."""
        s = self.setup
        if s.stream is not None:
            with self.ctx.timers("eval"):
                return streamed_metrics(s, self.state.params)
        train = self.metrics(s.X, s.data.train.y)
        val = self.metrics(s.X_val, s.data.val.y) if s.data.val is not None else None
        return train, val

    def metrics(self, X, y) -> dict:
        """Exact global metrics of the current parameters on these rows (timed as eval)."""
        s = self.setup
        with self.ctx.timers("eval"):
            return evaluate(s.model, self.state.params, X, y, s.device, self.comm)

    def _early_stop(self, entry: dict) -> bool:
        patience = self.cfg.train.patience
        if patience == 0 or "val" not in entry:
            return False
        key = "mse" if self.setup.model.head == "squared" else "log_loss"
        value, best = entry["val"][key], self.state.best
        if not best or value < best["value"]:
            self.state.best = {
                "value": value,
                "epoch": entry["epoch"],
                "params": self.state.params.copy(),
            }
            return False
        return entry["epoch"] - best["epoch"] >= patience

    # ---- checkpoints, stopping, divergence ----------------------------------------------
    def _check_finite(self, loss: float, step: int) -> None:
        """A NaN or Inf loss (the same reduced value on every rank) ends the run as failed."""
        if not math.isfinite(loss):
            raise Diverged(
                f"training diverged at step {step}: the loss is {loss}; the last good checkpoint "
                f"is kept in {self.setup.run.checkpoints}/ (lower optim.lr, or check the data's "
                "scale)"
            )

    def check_params(self) -> None:
        """Settled parameters are the same on every rank, so every rank decides alike."""
        if not np.isfinite(self.state.params).all():
            raise Diverged(
                f"training diverged by step {self.state.step}: the parameters are not finite; "
                f"the last good checkpoint is kept in {self.setup.run.checkpoints}/ "
                "(lower optim.lr)"
            )

    def model_params(self) -> np.ndarray | None:
        """The model's full parameter vector, on rank 0 (model.h5)."""
        return self.state.params

    def checkpoint(self) -> None:
        self.check_params()
        if self.comm.is_root:
            with self.ctx.timers("checkpoint"):
                keep = self.cfg.checkpoint.keep
                path = write_checkpoint(
                    self.setup.run.checkpoints, self.state, keep, floor=self.mirror.floor
                )
            self.mirror.copy(path, self.state, keep)
        self.comm.barrier()

    def _held_checkpoint(self) -> None:
        """A checkpoint between steps: under the watchdog's hold, not counted as step work."""
        t0 = time.perf_counter()
        with self.watchdog.hold():
            self.checkpoint()
        self.held_s += time.perf_counter() - t0

    def stop_now(self) -> None:
        """All ranks saw the stop flag in the same allreduce: checkpoint and leave together."""
        self._held_checkpoint()
        step = self.state.step
        if self.comm.is_root:
            self.setup.run.status(
                "stopped",
                step=step,
                epoch=self.state.epoch,
                signal=self.ctx.stop.signum,
                resume="lepton train CONFIG --resume auto",
            )
        raise Stopped(
            f"stopped by signal at step {step}; checkpoint written, resume with --resume auto"
        )


class TensorLoop(Loop):
    """The loop of a tensor-parallel run (``training/tensor.py``): ``state`` holds this rank's
    slice. Metrics come from the slices (a tensor group's ranks hold the same rows, so they are
    summed over the data group); checkpoints and the model hold the full vector, gathered by
    rank 0."""

    def model_params(self) -> np.ndarray | None:
        return self.setup.grid.gather_params(self.state.params)

    def metrics(self, X, y) -> dict:
        s, local = self.setup, self.state.params
        with self.ctx.timers("eval"):
            return evaluate(
                s.model,
                None,
                X,
                y,
                s.device,
                s.grid.data,
                outputs=lambda rows: s.grid.outputs(local, rows, s.model, s.device),
            )

    def check_params(self) -> None:
        if not self.setup.grid.all_finite(self.state.params):
            raise Diverged(
                f"training diverged by step {self.state.step}: the parameters are not finite; "
                f"the last good checkpoint is kept in {self.setup.run.checkpoints}/ "
                "(lower optim.lr)"
            )

    def checkpoint(self) -> None:
        """The full state, gathered from the slices, written by rank 0 as data parallelism
        writes it."""
        self.check_params()
        whole = self.setup.grid.full_state(self.state)
        if self.comm.is_root:
            with self.ctx.timers("checkpoint"):
                keep = self.cfg.checkpoint.keep
                path = write_checkpoint(
                    self.setup.run.checkpoints, whole, keep, floor=self.mirror.floor
                )
            st = self.state  # the branch and sequence the write gave
            st.lineage, st.parent, st.seq = whole.lineage, whole.parent, whole.seq
            self.mirror.copy(path, whole, keep)
        self.comm.barrier()
