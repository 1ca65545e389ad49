"""``lepton bench``: one small end-to-end run (structure of results.json and results.md, every
ratio finite and positive), and the pure pieces (time to loss, ratios, epoch figures).

Speed is what the benchmark shows, never what a test asserts: no thresholds on any figure here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from lepton_hpc.bench import ratios
from lepton_hpc.bench.common import buffer_sizes, time_it
from lepton_hpc.bench.runner import epoch_figures
from tests.conftest import ROOT, mpi_env

HAS_TORCH = importlib.util.find_spec("torch") is not None
TORCH_PARTS = ("torch_cpu", "ddp_k1", "ddp_k2")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """``lepton bench --quick --rows 20000`` once, alone (it launches its own mpiexec jobs)."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "lepton_hpc", "bench", "--quick", "--rows", "20000"]
    cmd += [
        "--skip",
        "dsweep,avx2,mlp,heat,onedal",
    ]  # timed in tests/unit/test_bench_kernel_parts.py
    proc = subprocess.run(
        [*cmd, "--repeats", "2", "--out", str(out)],
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=600,  # about 200 s on a 2-core machine: thirty short jobs, each its own mpiexec
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def test_results_json_structure(bench_run):
    _, _, res = bench_run
    assert res["schema"] == "lepton-bench/1"
    assert res["settings"]["rows"] == 20000
    assert res["settings"]["ranks"] == [1, 2]
    assert {"cores", "loadavg_start", "loadavg_end"} <= set(res["host"])
    parts = res["parts"]
    for name in (
        "data",
        "memory",
        "numpy",
        "step_k1",
        "step_k2",
        "train_full_k1",
        "train_full_k2",
        "train_minibatch_k2",
        "minibatch_k1",
        "minibatch_k2",
        "allreduce_k2",
        "hdf5_k1",
        "hdf5_k2",
        "train_lbfgs_k1",
    ):
        assert parts[name]["status"] == "ok", (name, parts[name])
    for name, entry in parts.items():
        assert entry["status"] in ("ok", "skipped"), (name, entry.get("reason"))
        if entry["status"] == "skipped":
            assert entry["reason"]
            continue
        assert entry["command"]  # every figure can be traced to the command that made it
        for fig_name, fig in entry["results"].get("figures", {}).items():
            assert set(fig) >= {"value", "unit"}, (name, fig_name)
            assert math.isfinite(fig["value"]), (name, fig_name, fig)
    sweep = parts["allreduce_k2"]["results"]["allreduce"]
    assert sweep[0]["bytes"] == 8 and sweep[-1]["bytes"] == 8 << 20
    assert all(r["median_s"] > 0 for r in sweep)


def test_every_implementation_timed_computes_the_same_gradient(bench_run):
    _, _, res = bench_run
    checks = res["checks"]
    assert checks["memory_gradient_vs_numpy_f64"]["value"] < 1e-8  # float64 accumulation
    if HAS_TORCH:
        assert checks["torch_cpu_gradient_vs_numpy_f64"]["value"] < 1e-3  # float32 throughout


def test_every_ratio_is_finite_and_positive(bench_run):
    _, stdout, res = bench_run
    assert res["ratios"], "no ratio was computed"
    for key in (
        "ours_vs_read_ceiling",
        "ours_speedup_vs_numpy_f64",
        "comm_share_fullbatch_k2",
        "comm_share_wire_fullbatch_k2",
        "hdf5_vs_raw_k1",
        "hdf5_vs_raw_k2",
        "hdf5_vs_raw_touched_k2",
        "raw_fresh_vs_raw_touched_k2",
        "strong_speedup_k2",
        "weak_efficiency_k2",
    ):
        assert key in res["ratios"], (key, res["skipped_ratios"].get(key))
    for key, r in res["ratios"].items():
        assert math.isfinite(r["value"]) and r["value"] > 0, (key, r)
        assert r["definition"] and r["better"] in ("higher", "lower")
        assert r["meets_target"] in (True, False, None)
        assert key in stdout  # the ratios are printed
    for key, why in res["skipped_ratios"].items():
        assert why, key


def test_minibatch_step_is_taken_apart(bench_run):
    """The mini-batch step's pieces add up to no more than the step, the floor (loading the
    rows only) is below the step, and the ratios to the step and to DDP are reported."""
    _, _, res = bench_run
    for k in (1, 2):
        figs = {
            n: f["value"] for n, f in res["parts"][f"minibatch_k{k}"]["results"]["figures"].items()
        }
        pieces = ("plan", "gather", "gradient", "allreduce", "update")
        assert all(figs[f"{p}_step_s"] > 0 for p in pieces), figs
        assert sum(figs[f"{p}_step_s"] for p in pieces) <= figs["step_s"] * 1.05, figs
        assert 0 < figs["load_floor_step_s"] < figs["step_s"], figs
    assert "minibatch_gather_share_k2" in res["ratios"]
    if HAS_TORCH:
        assert "minibatch_floor_vs_ddp_k2" in res["ratios"]


def test_peers_run_or_are_skipped_with_a_reason(bench_run):
    _, _, res = bench_run
    parts = res["parts"]
    for name in TORCH_PARTS:
        if HAS_TORCH:
            assert parts[name]["status"] == "ok", parts[name]
        else:
            assert parts[name]["status"] == "skipped" and "torch" in parts[name]["reason"]
    if HAS_TORCH:
        assert "ours_speedup_vs_ddp_minibatch_k2" in res["ratios"]
        assert parts["ddp_k2"]["results"]["allreduce"]  # gloo's latency for contrast


def test_a_peer_that_does_not_import_is_skipped_with_the_reason(tmp_path):
    shadow = tmp_path / "shadow" / "torch"  # a torch whose import fails
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no torch in this test')\n")
    out = tmp_path / "bench"
    # the peers only: not the kernel parts (the avx2 part compiles every kernel for haswell in a
    # cache of its own, 150 s on a 2-core AMD EPYC guest)
    only_peers = "memory,numpy,step,train,allreduce,hdf5,layouts,stream,tensor,sklearn"
    only_peers += ",dsweep,avx2,mlp"
    cmd = [sys.executable, "-m", "lepton_hpc", "bench", "--quick", "--rows", "10000"]
    proc = subprocess.run(
        [*cmd, "--skip", only_peers, "--out", str(out)],
        cwd=ROOT,
        env=mpi_env(PYTHONPATH=str(tmp_path / "shadow")),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    parts = json.loads((out / "results.json").read_text())["parts"]
    for name in ("torch_cpu", "ddp_k1", "ddp_k2", "horovod_k2", "train_horovod_k2"):
        assert parts[name]["status"] == "skipped", (name, parts[name])
        assert "torch" in parts[name]["reason"], (name, parts[name]["reason"])


def test_markdown_and_plots(bench_run):
    out, _, res = bench_run
    md = (out / "results.md").read_text()
    headings = ("## Ratios (same run)", "## Timings", "## Scaling", "## Allreduce latency")
    for heading in (*headings, "## Memory per rank"):
        assert heading in md
    for key in res["ratios"]:
        assert f"| {key} |" in md
    for plot in ("scaling.png", "allreduce.png"):
        assert (out / plot).stat().st_size > 1000
        assert str(out / plot) in res["plots"]


def test_bench_refuses_to_run_under_mpiexec(tmp_path):
    env = mpi_env(OMPI_COMM_WORLD_SIZE="2")
    proc = subprocess.run(
        [sys.executable, "-m", "lepton_hpc", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "alone" in proc.stderr


# ---- pure pieces ----------------------------------------------------------------------------
def test_time_to_loss_counts_iterations_until_the_target():
    history = [
        {"epoch": 1, "step": 3, "loss": 0.50, "seconds": 0.2},  # 2 evaluations: 0.1 s each
        {"epoch": 2, "step": 4, "loss": 0.40, "seconds": 0.1},
        {"epoch": 3, "step": 6, "loss": 0.30, "seconds": 0.2},
    ]
    seconds, epoch = ratios.time_to_loss(history, target=0.40)
    assert epoch == 2 and seconds == pytest.approx(0.1 + 0.2 + 0.1)  # initial eval + 2 iterations
    assert ratios.time_to_loss(history, target=0.1) is None
    # within the relative tolerance counts as reached
    assert ratios.time_to_loss(history, target=0.30 / (1 + 0.5 * ratios.TOLERANCE))[1] == 3


def test_ratios_need_both_figures_and_positive_values():
    def part(**figs):
        return {
            "status": "ok",
            "results": {"figures": {k: {"value": v, "unit": "s"} for k, v in figs.items()}},
        }

    parts = {
        "memory": part(ceiling_s=0.05, ours_s=0.1, ceiling_1thread_s=0.1, ours_1thread_s=0.0),
        "numpy": {"status": "skipped", "reason": "test"},
    }
    got, skipped = ratios.compute_ratios(parts, [1], 1)
    assert got["ours_vs_read_ceiling"]["value"] == pytest.approx(0.5)
    assert got["ours_vs_read_ceiling"]["meets_target"] is False
    assert "ours_vs_read_ceiling_1thread" in skipped  # a zero time is not a ratio
    assert "ours_speedup_vs_numpy_f64" in skipped


def test_epoch_figures_use_the_epochs_after_the_first():
    res = {
        "timing": {"io_s": 0.5, "compute_s": 1.0, "comm_s": 0.01, "eval_s": 0.6},
        "steps": 4,
        "rows": {"train": 1000},
    }
    history = [{"seconds": s} for s in (0.9, 0.1, 0.3, 0.2)]
    figs = epoch_figures(res, history)
    assert figs["epoch_s"]["value"] == pytest.approx(0.2)
    assert figs["step_s"]["value"] == pytest.approx(0.2)
    assert figs["first_epoch_extra_s"]["value"] == pytest.approx(0.7)
    assert figs["rows_per_s"]["value"] == pytest.approx(5000)
    assert figs["eval_per_epoch_s"]["value"] == pytest.approx(0.15)  # metrics after each epoch


def test_buffer_sizes_and_timing_helpers():
    assert buffer_sizes("")[0] == 8 and buffer_sizes("")[-1] == 8 << 20
    assert buffer_sizes("8,64") == [8, 64]
    calls = []
    stats = time_it(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and stats["repeats"] == 3 and stats["min_s"] <= stats["median_s"]


def test_tensor_grids_are_measured(bench_run):
    """The wide MLP on a 1 x 2 tensor grid and a 2 x 1 data grid: a tensor rank holds about half
    the parameters and optimizer state, the epoch is split into compute and communication, and
    the crossover is reported."""
    out, _, res = bench_run
    parts = res["parts"]
    for name in ("tensor_1x2", "tensor_2x1"):
        assert parts[name]["status"] == "ok", parts[name]
        figs = parts[name]["results"]["figures"]
        for key in ("epoch_s", "compute_per_epoch_s", "comm_per_epoch_s", "model_mb"):
            assert figs[key]["value"] > 0, (name, key)
    half = res["ratios"]["tensor_model_memory_1x2_vs_2x1"]
    assert 0.45 < half["value"] <= 0.55 and half["meets_target"]
    assert "tensor_epoch_1x2_vs_2x1" in res["ratios"]
    cross = res["tensor_crossover"]
    assert cross["one_node_crossover_rows"]["value"] == pytest.approx(17_874_954 / 4096)
    assert cross["multi_node_crossover_rows"]["value"] > 0
    assert "## Tensor parallelism" in (out / "results.md").read_text()


def test_tensor_crossover_model():
    """The multi-node estimate from its stated model: a node fast enough makes the hybrid grid's
    in-node sums free, so the crossover batch grows without bound; a slow one shrinks it."""
    from lepton_hpc.bench import tensor_rows

    P, w = tensor_rows.n_params(), tensor_rows.HIDDEN[1]
    assert P == 256 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10

    def parts(gbps):
        figs = {"comm_GBps": {"value": gbps}}
        return {"tensor_1x2": {"status": "ok", "results": {"figures": figs}}}

    fast = tensor_rows.crossover(parts(1000.0))["multi_node_crossover_rows"]["value"]
    slow = tensor_rows.crossover(parts(1.0))["multi_node_crossover_rows"]["value"]
    assert fast > 100 * slow > 0
    # at the crossover batch the two costs meet: 8 (B / N) w / beta_node = dp - fixed
    m = tensor_rows.crossover(parts(5.0))["multi_node_crossover_rows"]
    in_node = 8 * (m["value"] / m["nodes"]) * w / 5e9
    assert in_node == pytest.approx(m["data_parallel_comm_s"] - m["hybrid_fixed_comm_s"])
    assert "multi_node_crossover_rows" not in tensor_rows.crossover({})
