"""The orchestrator of ``lepton bench``: generates the data set once, starts every part in its own
process (``mpiexec -n k`` where ranks are needed), and collects what they measured.

It never initialises MPI itself: each ``mpiexec`` gets an environment free of the singleton's
OMPI_*/PMIX_* variables. Ranks are launched unbound (``--bind-to none``): one rank may use every
core, and k ranks share the node's cores (the toolkit gives each cores // k threads).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..log import Log
from .common import GLOBAL_BATCH, L2, evict, figure
from .kernel_parts import (
    AVX2_D,
    MLP_QUICK_ROWS,
    MLP_ROWS,
    QUICK_SWEEP_BYTES,
    SWEEP_BYTES,
    SWEEP_TRAIN32_D,
    SWEEP_TRAIN_D,
    sweep_rows,
)
from .launch import (
    PY,
    BackgroundLoad,
    bench_env,
    flags,
    free_port,
    horovod_importable,
    mpiexec,
    run_command,
)
from .tensor_rows import CLASSES as TENSOR_CLASSES
from .tensor_rows import FEATURES as TENSOR_FEATURES
from .tensor_rows import GRIDS as TENSOR_GRIDS
from .tensor_rows import add_figures as tensor_figures
from .tensor_rows import overrides as tensor_overrides
from .tensor_rows import shape as tensor_shape

# X bytes of each layout file: small, so the part stays near half a minute on two cores
LAYOUT_BYTES = 128 << 20
LAYOUT_QUICK_BYTES = 16 << 20


@dataclass
class Plan:
    """What one bench run measures, from the command line."""

    rows: int
    features: int
    ranks: list[int]
    out: Path
    quick: bool = False
    repeats: int = 7
    epochs: int = 8
    seed: int = 1
    cores: int = 2
    timeout_s: float = 900.0
    skip: list[str] = field(default_factory=list)

    @property
    def compare_ranks(self) -> int:
        """The rank count at which ours meets DDP: the most ranks that fit on the cores."""
        fitting = [k for k in self.ranks if k <= self.cores]
        return max(fitting) if fitting else 1


class Bench:
    """Runs the parts of one benchmark and keeps every result with the command that made it."""

    def __init__(self, plan: Plan, log: Log) -> None:
        self.plan, self.log = plan, log
        self.env = bench_env()
        self.parts: dict[str, dict] = {}
        for sub in ("parts", "runs", "data", "configs"):
            (plan.out / sub).mkdir(parents=True, exist_ok=True)

    # ---- launching ----------------------------------------------------------------------
    def skipped(self, name: str, reason: str) -> dict:
        self.log.info(f"  {name:<24} skipped: {reason}")
        entry = {"status": "skipped", "reason": reason}
        self.parts[name] = entry
        return entry

    def launch(self, name: str, argv: list[str], k: int | None = None, **env: str) -> dict:
        """Run one part (``argv`` after ``python -m``); its JSON becomes ``parts[name]``."""
        if any(name.startswith(s) for s in self.plan.skip):
            return self.skipped(name, "--skip")
        out = self.plan.out / "parts" / f"{name}.json"
        out.unlink(missing_ok=True)
        cmd = [*(mpiexec(k, self.plan.cores) if k else []), PY, "-m", *argv, "--out", str(out)]
        return self._run(name, cmd, lambda: json.loads(out.read_text()), env)

    def _run(self, name: str, cmd: list[str], collect, env: dict[str, str]) -> dict:
        load = BackgroundLoad()
        t0 = time.perf_counter()
        full_env = {k: v for k, v in {**self.env, **env}.items() if v is not None}  # None: unset
        rc, stdout, stderr = run_command(cmd, self.plan.timeout_s, full_env)
        seconds = time.perf_counter() - t0
        entry: dict = {"command": shlex.join(cmd), "wall_s": round(seconds, 3), "load": load.end()}
        if env:
            entry["env"] = env
        try:
            if rc != 0:
                raise RuntimeError(f"exit code {rc}")
            results = collect()
            if "skipped" in results:  # the part found its peer missing
                self.log.info(f"  {name:<24} skipped: {results['skipped']}")
                entry.update(status="skipped", reason=results["skipped"])
                self.parts[name] = entry
                return entry
            entry.update(status="ok", results=results)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
            entry.update(status="failed", reason=f"{exc}: {tail}")
            self.log.warning(f"bench part {name} failed ({exc}):\n{tail}")
        else:
            self.log.info(f"  {name:<24} {seconds:6.1f} s")
        self.parts[name] = entry
        return entry

    def micro(
        self, name: str, module: str, part: str, k: int | None = None, *extra: str, **env: str
    ) -> dict:
        """A part that takes the data set's files (``extra``: more arguments)."""
        d, p = self.data, self.plan
        argv = [f"lepton_hpc.bench.{module}", part, *flags(h5=d["h5"], x_bin=d["x_bin"])]
        argv += flags(y_bin=d["y_bin"], rows=p.rows, features=p.features, repeats=p.repeats)
        if part == "ddp":
            argv += ["--port", str(free_port())]
        return self.launch(name, [*argv, *extra], k, **env)

    # ---- data ---------------------------------------------------------------------------
    def datagen(self, rows: int, features: int | None = None) -> tuple[Path, list[str], bool]:
        """The logistic data set of ``rows`` rows (the first rows of the seed's stream), its
        command, and whether an earlier run's file was reused."""
        p = self.plan
        d = features or p.features
        path = p.out / "data" / f"logistic_{rows}x{d}_seed{p.seed}.h5"
        k = min(2, p.cores)
        cmd = [*mpiexec(k, p.cores), PY, "-m", "lepton_hpc", "datagen", "--task", "logistic"]
        cmd += [*flags(rows=rows, features=d, seed=p.seed, out=path), "--force"]
        reused = _has_shape(path, rows, d)
        if not reused:
            rc, _, err = run_command(cmd, p.timeout_s, self.env)
            if rc != 0:
                raise RuntimeError(f"datagen failed ({rc}): {err.strip()[-2000:]}")
        return path, cmd, reused

    def prepare_data(self) -> None:
        """The data set, its raw copy (flat X and y files), and the weak-scaling subsets."""
        import h5py
        import numpy as np

        p = self.plan
        t0 = time.perf_counter()
        h5, cmd, reused = self.datagen(p.rows)
        x_bin, y_bin = h5.with_suffix(".X.bin"), h5.with_suffix(".y.bin")
        fresh = x_bin.exists() and x_bin.stat().st_mtime >= h5.stat().st_mtime
        if not (fresh and x_bin.stat().st_size == p.rows * p.features * 4):
            with h5py.File(h5, "r") as fh, open(x_bin, "wb") as fx, open(y_bin, "wb") as fy:
                for s in range(0, p.rows, 1 << 18):
                    fx.write(np.ascontiguousarray(fh["X"][s : s + (1 << 18)]).tobytes())
                    fy.write(np.asarray(fh["y"][s : s + (1 << 18)], dtype=np.float64).tobytes())
        weak = {}
        per_rank = p.rows // max(p.ranks)
        for k in p.ranks:
            weak[k] = h5 if per_rank * k == p.rows else self.datagen(per_rank * k)[0]
        self.data = {"h5": str(h5), "x_bin": str(x_bin), "y_bin": str(y_bin)}
        self.weak = weak
        self.parts["data"] = {
            "status": "ok",
            "command": shlex.join(cmd),
            "wall_s": round(time.perf_counter() - t0, 3),
            "results": {
                **self.data,
                "rows": p.rows,
                "features": p.features,
                "bytes_X": p.rows * p.features * 4,
                "bytes_y": p.rows * 8,
                "weak_scaling_files": {str(k): str(v) for k, v in weak.items()},
                "weak_rows_per_rank": per_rank,
                "raw_copy": "X (float32) and y (float64) as flat little-endian files",
                "reused": reused,
            },
        }
        self.log.info(f"  {'data':<24} {time.perf_counter() - t0:6.1f} s  ({h5})")

    # ---- lepton train ---------------------------------------------------------------------
    def config(self) -> Path:
        path = self.plan.out / "configs" / "bench.toml"
        path.write_text(
            '[model]\nkind = "logistic"\n\n[optim]\nname = "sgd"\nlr = 0.05\n\n'
            "[train]\nbatch_size = 0\nseed = 42\n\n[checkpoint]\nkeep = 1\n\n"
            "[output]\nplot = false\n"
        )
        return path

    def train(self, name: str, k: int, data: str | Path, *overrides: str) -> dict:
        """``mpiexec -n k lepton train`` on ``data`` (later overrides win)."""
        if any(name.startswith(s) for s in self.plan.skip):
            return self.skipped(name, "--skip")
        return self._train(name, k, data, overrides)

    def _train(self, name: str, k: int, data: str | Path, overrides) -> dict:
        run_dir = self.plan.out / "runs" / name
        cmd = [*mpiexec(k, self.plan.cores), PY, "-m", "lepton_hpc", "train", str(self.config())]
        cmd += [f"data.train={data}", f"output.dir={run_dir}", *overrides, "--overwrite"]
        return self._run(name, cmd, lambda: read_run(run_dir), {})

    # ---- the whole run --------------------------------------------------------------------
    def run(self) -> dict:
        p, log = self.plan, self.log
        log.info(
            f"lepton bench: {p.rows:,} x {p.features} float32 logistic, ranks {p.ranks}, "
            f"{p.cores} cores, results in {p.out}/"
        )
        self.prepare_data()
        self.micro("memory", "micro", "memory")
        self.micro("numpy", "micro", "numpy")
        torch_missing = None if importlib.util.find_spec("torch") else "torch is not installed"
        sk_missing = None if importlib.util.find_spec("sklearn") else "sklearn is not installed"
        if torch_missing:
            self.skipped("torch_cpu", torch_missing)
        else:
            self.micro("torch_cpu", "peers", "torch")
        for k in p.ranks:  # the steady full-batch step, split into compute and comm
            self.micro(f"step_k{k}", "mpi_parts", "step", k, "--weak-h5", str(self.weak[k]))
        full = (f"train.epochs={p.epochs}", "train.batch_size=0")
        for k in p.ranks:
            self.train(f"train_full_k{k}", k, self.data["h5"], *full)
        for k in p.ranks:
            self.train(f"train_weak_k{k}", k, self.weak[k], *full, "train.threads=1")
        fitting = [k for k in p.ranks if k <= p.cores]
        mini = ("train.epochs=6", f"train.batch_size={GLOBAL_BATCH}", "optim.name=sgd")
        for k in fitting:
            self.train(f"train_minibatch_k{k}", k, self.data["h5"], *mini)
        for k in fitting:  # the same step taken apart, and its floor
            self.micro(f"minibatch_k{k}", "mpi_parts", "minibatch", k)
        for k in fitting:
            if torch_missing:
                self.skipped(f"ddp_k{k}", torch_missing)
            else:
                self.micro(
                    f"ddp_k{k}", "peers", "ddp", k, OMP_NUM_THREADS=str(max(1, p.cores // k))
                )
        multi = [k for k in fitting if k > 1]
        for k in multi:
            self.micro(f"allreduce_k{k}", "mpi_parts", "allreduce", k)
        hvd_missing = torch_missing or horovod_importable(self.env)
        for k in multi:
            if hvd_missing:
                self.skipped(f"horovod_k{k}", hvd_missing)
                self.skipped(f"step_horovod_k{k}", hvd_missing)
                self.skipped(f"train_horovod_k{k}", hvd_missing)
                continue
            self.micro(f"horovod_k{k}", "peers", "horovod", k, OMP_NUM_THREADS="1")
            self.micro(f"step_horovod_k{k}", "mpi_parts", "step", k, "--backend", "horovod")
            hvd = (*full, "comm.backend=horovod")
            self.train(f"train_horovod_k{k}", k, self.data["h5"], *hvd)
        for k in fitting:
            self.micro(f"hdf5_k{k}", "mpi_parts", "hdf5", k)
        for k in fitting:  # data.stream: the epoch from the page cache, and the cold read
            # The stream's first pass reads the file from the device, as for data larger than
            # memory; its later epochs then read the page cache that pass filled (in 2 MiB
            # folios: a file cached by other readers in small ones maps more slowly).
            evict(self.data["h5"])
            self.train(f"train_stream_k{k}", k, self.data["h5"], *full, "data.stream=true")
            self.micro(f"stream_k{k}", "mpi_parts", "stream", k)
        self.layouts()
        self.tensor()
        if sk_missing:
            self.skipped("sklearn", sk_missing)
        else:
            self.micro("sklearn", "peers", "sklearn")
        lbfgs = (
            "optim.name=lbfgs",
            "optim.lr=1.0",
            f"model.l2={L2}",
            "train.batch_size=0",
            f"train.epochs={50 if p.quick else 100}",  # L-BFGS stops when converged
            "train.log_every=10",
        )
        for k in fitting:
            self.train(f"train_lbfgs_k{k}", k, self.data["h5"], *lbfgs)
        self.kernel_parts()
        return {
            "settings": {**asdict(p), "out": str(p.out), "global_batch": GLOBAL_BATCH, "l2": L2},
            "parts": self.parts,
        }

    # ---- the layouts table -------------------------------------------------------------------
    def layouts(self) -> None:
        """Load rate of contiguous, chunked and compressed copies of one small data set against a
        raw read (``layouts``): 1 rank at 1 and 2 threads, then 2 ranks at 1 thread each. The
        files are written here, once; a failure to write them skips both parts."""
        p = self.plan
        names = ("layouts_k1", "layouts_k2")
        if all(any(n.startswith(s) for s in p.skip) for n in names):
            for n in names:
                self.skipped(n, "--skip")
            return
        nbytes = LAYOUT_QUICK_BYTES if p.quick else LAYOUT_BYTES
        rows = max(1, nbytes // (4 * p.features))
        root = p.out / "data" / "layouts"
        t0 = time.perf_counter()
        try:
            from .layouts import make

            make(root, rows, p.features)
        except Exception as exc:  # noqa: BLE001 - any failure here is this part's, not the run's
            for n in names:
                self.parts[n] = {"status": "failed", "reason": f"writing the layout files: {exc}"}
            self.log.warning(f"bench part layouts failed: writing the files: {exc}")
            return
        self.log.info(f"  {'layouts data':<24} {time.perf_counter() - t0:6.1f} s  ({root})")
        base = ["lepton_hpc.bench.layouts", "layouts", "--dir", str(root)]
        base += flags(rows=rows, features=p.features, repeats=min(3, p.repeats))
        two = "1,2" if p.cores >= 2 else "1"
        self.launch("layouts_k1", [*base, "--threads", two], 1)
        if p.cores >= 2:
            self.launch("layouts_k2", [*base, "--threads", "1"], 2)
        else:
            self.skipped("layouts_k2", "one core: 2 ranks would share it")

    # ---- tensor parallelism: a 1 x 2 grid against a 2 x 1 grid -------------------------------
    def tensor(self) -> None:
        """The wide MLP (``tensor_rows``) on 2 ranks as a tensor grid and as a data grid, on a
        generated 10-class data set of 256 features."""
        p = self.plan
        if all(any(n.startswith(s) for s in p.skip) for n in TENSOR_GRIDS):
            for n in TENSOR_GRIDS:
                self.skipped(n, "--skip")
            return
        if p.cores < 2:
            for n in TENSOR_GRIDS:
                self.skipped(n, "one core: 2 ranks would share it")
            return
        rows, epochs = tensor_shape(p.quick)
        path = p.out / "data" / f"blobs_{rows}x{TENSOR_FEATURES}_seed{p.seed}.h5"
        cmd = [*mpiexec(2, p.cores), PY, "-m", "lepton_hpc", "datagen", "--task", "blobs"]
        cmd += flags(rows=rows, features=TENSOR_FEATURES, classes=TENSOR_CLASSES)
        cmd += [*flags(seed=p.seed, out=path), "--force"]
        rc, _, err = run_command(cmd, p.timeout_s, self.env)
        if rc != 0:
            for n in TENSOR_GRIDS:
                self.parts[n] = {"status": "failed", "reason": f"datagen: {err.strip()[-500:]}"}
            return
        for name, k in TENSOR_GRIDS.items():
            entry = self.train(name, 2, path, *tensor_overrides(k, epochs))
            if entry.get("status") == "ok":
                tensor_figures(entry, rows, k)

    # ---- the feature sweep, AVX2 code, MLP against torch, Heat and oneDAL ---------------------
    def kernel_parts(self) -> None:
        """Parts on generated arrays (``kernel_parts``) and the distributed peers
        (``mpi_peers``) on the data set's first rows, each against ours in the same process."""
        p = self.plan
        nbytes = QUICK_SWEEP_BYTES if p.quick else SWEEP_BYTES
        sweep = ["lepton_hpc.bench.kernel_parts", "dsweep", *flags(bytes=nbytes)]
        self.launch("dsweep", [*sweep, *flags(repeats=p.repeats)])
        for d in SWEEP_TRAIN_D:
            self.sweep_train(d, sweep_rows(d, nbytes))
            if d in SWEEP_TRAIN32_D:
                self.sweep_train(d, sweep_rows(d, nbytes), "float32")
        # at most 3 repeats: where the check refuses the tuned kernels, the fallback is slow
        avx2 = ["lepton_hpc.bench.kernel_parts", "avx2"]
        avx2 += flags(bytes=nbytes, repeats=min(3, p.repeats))
        avx2 += flags(sizes=",".join(map(str, AVX2_D)))
        if not any("avx2".startswith(s) for s in p.skip):
            with tempfile.TemporaryDirectory(prefix="lepton-bench-numba-") as cache:
                # AVX2-only code: haswell's own features (with the name alone Numba keeps the
                # host's, AVX-512 included), in its own cache
                env = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}
                self.launch("avx2", avx2, None, NUMBA_CACHE_DIR=cache, **env)
        else:
            self.skipped("avx2", "--skip")
        if importlib.util.find_spec("torch") is None:
            self.skipped("mlp", "torch is not installed")
        else:
            rows = MLP_QUICK_ROWS if p.quick else MLP_ROWS
            mlp = ["lepton_hpc.bench.kernel_parts", "mlp", *flags(rows=rows, repeats=p.repeats)]
            self.launch("mlp", mlp)
        k = 2
        for name, module in (("heat", "heat"), ("onedal", "daal4py")):
            if importlib.util.find_spec(module) is None:
                self.skipped(name, f"{module} is not installed (make bench-peers)")
                continue
            threads = str(max(1, p.cores // k))
            self.micro(name, "mpi_peers", name, k, OMP_NUM_THREADS=threads)

    def sweep_train(self, d: int, rows: int, products: str = "float64") -> dict:
        """``lepton train`` full-batch epochs at 2 ranks on a ``rows`` x ``d`` data set, with
        ``train.products`` = ``products``."""
        name = f"dsweep_train{'32' if products == 'float32' else ''}_d{d}"
        if any(name.startswith(s) for s in self.plan.skip):
            return self.skipped(name, "--skip")
        try:
            path = self.datagen(rows, d)[0]
        except RuntimeError as exc:
            entry = {"status": "failed", "reason": str(exc)}
            self.parts[name] = entry
            return entry
        epochs = 3 if self.plan.quick else 5
        overrides = (f"train.epochs={epochs}", "train.batch_size=0", f"train.products={products}")
        return self._train(name, 2, path, overrides)


def _has_shape(path: Path, rows: int, features: int) -> bool:
    """True when ``path`` is a finished data set of this shape (reused between runs)."""
    if not path.exists():
        return False
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            return fh["X"].shape == (rows, features) and fh["y"].shape == (rows,)
    except (OSError, KeyError):
        return False


def read_run(run_dir: Path) -> dict:
    """results.json and metrics.jsonl of a ``lepton train`` run, reduced to what the bench uses,
    with the per-epoch figures (see ``epoch_figures``)."""
    res = json.loads((run_dir / "results.json").read_text())
    history = [
        {k: e[k] for k in ("epoch", "step", "loss", "seconds")}
        for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    ]
    out = {k: res[k] for k in ("ranks", "threads_per_rank", "epochs", "steps", "timing", "rows")}
    out["throughput"] = res["throughput"]
    out["history"] = history
    out["figures"] = epoch_figures(res, history)
    memory = res.get("memory") or {}
    for key, unit in (("peak_rss_mb", "MiB"), ("data_mb", "MiB"), ("model_mb", "MiB")):
        if memory.get(key):
            out["figures"][key] = figure(max(memory[key]), unit, note="the largest rank's")
    return out


def epoch_figures(res: dict, history: list[dict]) -> dict:
    """Steady epoch time of a run (the median of the epochs after the first), and its totals.

    The first epoch also loads Numba's compiled kernels and absorbs the ranks' start skew (a rank
    waits in its first allreduce for the slower one): ``compute_s``/``comm_s`` of results.json
    include that, so the steady split of a step comes from the ``step`` part instead.
    """
    secs = [e["seconds"] for e in history]
    if not secs:
        return {}
    epoch_s = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
    t = res["timing"]
    note = "results.json timing: all epochs, the first included"
    return {
        "epoch_s": figure(epoch_s, "s", note="median of the epochs after the first"),
        "step_s": figure(epoch_s * len(history) / max(1, res["steps"]), "s"),
        "first_epoch_extra_s": figure(secs[0] - epoch_s, "s"),
        "io_s": figure(t["io_s"], "s", note="loading the data set, once"),
        "compute_s_total": figure(t["compute_s"], "s", note=note),
        "comm_s_total": figure(t["comm_s"], "s", note=note),
        "rows_per_s": figure(res["rows"]["train"] / epoch_s, "rows/s"),
        "eval_per_epoch_s": figure(
            t.get("eval_s", 0.0) / max(1, len(history)),
            "s",
            note="the metrics computed after each epoch (a forward pass and exact sums)",
        ),
    }
