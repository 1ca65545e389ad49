"""Ratios between figures measured in the same run, each with its definition, which way is
better, and the project's target for it (where there is one); and the L-BFGS time-to-loss figure."""

from __future__ import annotations

import math

from .common import figure

TOLERANCE = 1e-6  # "reached sklearn's loss": within this relative distance of it


def value(parts: dict, part: str, name: str) -> float | None:
    """A figure of a part that ran, or None."""
    entry = parts.get(part, {})
    if entry.get("status") != "ok":
        return None
    fig = entry["results"].get("figures", {}).get(name)
    return None if fig is None else float(fig["value"])


def latency(parts: dict, part: str, nbytes: int | None = None) -> float | None:
    """Median seconds of one allreduce of ``nbytes`` (default: the training buffer) in a sweep."""
    entry = parts.get(part, {})
    if entry.get("status") != "ok":
        return None
    res = entry["results"]
    want = res.get("train_buffer_bytes") if nbytes is None else nbytes
    for row in res["allreduce"]:
        if row["bytes"] == want:
            return float(row["median_s"])
    return None


def time_to_loss(history: list[dict], target: float) -> tuple[float, int] | None:
    """Seconds of our L-BFGS until its objective is within TOLERANCE of ``target``, and the
    iteration: the sum of iteration times, plus one evaluation for the initial gradient (made
    before the first timed iteration; costed at the median seconds per evaluation)."""
    per_eval, prev = [], 1
    for e in history:
        per_eval.append(e["seconds"] / max(1, e["step"] - prev))
        prev = e["step"]
    if not per_eval:
        return None
    elapsed = sorted(per_eval)[len(per_eval) // 2]
    for e in history:
        elapsed += e["seconds"]
        if e["loss"] <= target * (1.0 + TOLERANCE):
            return elapsed, int(e["epoch"])
    return None


def add_time_to_loss(parts: dict, ks: list[int]) -> None:
    """Figures of each L-BFGS run: time to scikit-learn's objective, and the objectives."""
    sk = parts.get("sklearn", {})
    if sk.get("status") != "ok":
        return
    target = sk["results"]["lbfgs_objective"]
    for k in ks:
        run = parts.get(f"train_lbfgs_k{k}", {})
        if run.get("status") != "ok":
            continue
        res = run["results"]
        found = time_to_loss(res["history"], target)
        figs = res["figures"]
        figs["final_objective"] = figure(res["history"][-1]["loss"], "mean log-loss + l2/2|w|^2")
        figs["sklearn_objective"] = figure(target, "mean log-loss + l2/2|w|^2")
        if found is not None:
            figs["time_to_sklearn_loss_s"] = figure(found[0], "s", iteration=found[1])


def ratio_specs(ks: list[int], kc: int) -> list[tuple]:
    """(key, numerator, denominator, definition, target, better); a term is (part, figure) or a
    callable on parts; denominator None for figures that are already fractions."""
    specs = [
        (
            "ours_vs_read_ceiling",
            ("memory", "ceiling_s"),
            ("memory", "ours_s"),
            (
                "read-ceiling time / our fused gradient time, same array, all cores (1 = at memory "
                "bandwidth)"
            ),
            ">= 0.70",
            "higher",
        ),
        (
            "ours_vs_read_ceiling_best",
            ("memory", "ceiling_best_s"),
            ("memory", "ours_best_s"),
            "the same from the fastest repeat of each (less sensitive to other processes)",
            None,
            "higher",
        ),
        (
            "ours_vs_read_ceiling_1thread",
            ("memory", "ceiling_1thread_s"),
            ("memory", "ours_1thread_s"),
            "the same with one thread",
            None,
            "higher",
        ),
        (
            "ours_speedup_vs_numpy_f64",
            ("numpy", "numpy_f64_s"),
            ("memory", "ours_s"),
            "float64 NumPy reference gradient time / ours (float32 data)",
            ">= 1.5",
            "higher",
        ),
        (
            "ours_speedup_vs_torch_cpu",
            ("torch_cpu", "torch_manual_s"),
            ("memory", "ours_s"),
            "PyTorch CPU float32 gradient by hand (all threads) / ours",
            None,
            "higher",
        ),
        (
            "ours_speedup_vs_torch_autograd",
            ("torch_cpu", "torch_autograd_s"),
            ("memory", "ours_s"),
            "PyTorch CPU autograd gradient / ours",
            None,
            "higher",
        ),
        (
            f"ours_speedup_vs_ddp_fullbatch_k{kc}",
            (f"ddp_k{kc}", "ddp_full_epoch_s"),
            (f"train_full_k{kc}", "epoch_s"),
            f"DDP (gloo) full-batch epoch / ours via lepton train, {kc} rank(s)",
            ">= 2",
            "higher",
        ),
        (
            f"ours_speedup_vs_ddp_minibatch_k{kc}",
            (f"ddp_k{kc}", "ddp_minibatch_epoch_s"),
            (f"train_minibatch_k{kc}", "epoch_s"),
            f"DDP (gloo) mini-batch epoch / ours, global batch 4,096, {kc} rank(s)",
            ">= 15",
            "higher",
        ),
        (
            f"minibatch_floor_vs_ddp_k{kc}",
            (f"ddp_k{kc}", "ddp_minibatch_step_s"),
            (f"minibatch_k{kc}", "load_floor_step_s"),
            (
                f"DDP (gloo) mini-batch step / the floor of ours: loading the cache lines of the "
                f"batch's random rows, no copy, no compute ({kc} rank(s)): the most a step can gain"
            ),
            None,
            "higher",
        ),
        (
            f"minibatch_gather_share_k{kc}",
            (f"minibatch_k{kc}", "gather_step_s"),
            (f"minibatch_k{kc}", "step_s"),
            (
                f"the batch gather's share of our mini-batch step ({kc} rank(s)); about 0 where "
                "the gradient reads the batch's rows in place"
            ),
            None,
            "lower",
        ),
        (
            f"comm_share_fullbatch_k{kc}",
            (f"step_k{kc}", "strong_comm_share"),
            None,
            (
                f"allreduce / (gradient + allreduce) of a steady full-batch step at {kc} ranks "
                "(includes waiting for the slower rank; mean over ranks)"
            ),
            "<= 0.05",
            "lower",
        ),
        (
            f"comm_share_wire_fullbatch_k{kc}",
            lambda p: latency(p, f"allreduce_k{kc}"),
            (f"step_k{kc}", "strong_step_s"),
            f"one allreduce of the training buffer (from the sweep) / full-batch step, {kc} ranks",
            "<= 0.05",
            "lower",
        ),
        (
            "ours_speedup_vs_sklearn_sgd_epoch",
            ("sklearn", "sklearn_sgd_epoch_s"),
            ("train_minibatch_k1", "epoch_s"),
            "SGDClassifier one epoch / ours one mini-batch epoch (batch 4,096), 1 process",
            None,
            "higher",
        ),
        (
            f"gloo_vs_mpi_allreduce_k{kc}",
            lambda p: latency(p, f"ddp_k{kc}", _train_bytes(p)),
            lambda p: latency(p, f"allreduce_k{kc}"),
            "gloo all_reduce / MPI Allreduce latency, training-buffer size",
            None,
            "higher",
        ),
        (
            f"horovod_vs_mpi_allreduce_k{kc}",
            lambda p: latency(p, f"horovod_k{kc}"),
            lambda p: latency(p, f"allreduce_k{kc}"),
            "Horovod allreduce_ / MPI Allreduce latency, training-buffer size",
            None,
            "higher",
        ),
        (
            f"horovod_vs_mpi_step_comm_k{kc}",
            (f"step_horovod_k{kc}", "strong_comm_step_s"),
            (f"step_k{kc}", "strong_comm_step_s"),
            "allreduce time in a full-batch step with comm.backend=horovod / with mpi",
            None,
            "lower",
        ),
    ]
    for k in ks:
        specs.append(
            (
                f"eval_vs_epoch_k{k}",
                (f"train_full_k{k}", "eval_per_epoch_s"),
                (f"train_full_k{k}", "epoch_s"),
                f"the epoch's metrics / the full-batch epoch itself, {k} rank(s)",
                None,
                "lower",
            )
        )
        specs.append(
            (
                f"stream_epoch_vs_memory_k{k}",
                (f"train_stream_k{k}", "epoch_s"),
                (f"train_full_k{k}", "epoch_s"),
                f"full-batch epoch with data.stream (from the page cache) / in memory, {k} rank(s)",
                "<= 1.25",
                "lower",
            )
        )
        specs.append(
            (
                f"stream_cold_vs_dd_k{k}",
                (f"stream_k{k}", "cold_vs_dd"),
                None,
                (
                    f"streamed read of a cold file ({k} rank(s)) / one sequential 8 MiB read of "
                    "it: the median of alternating rounds, each against the read before it"
                ),
                ">= 0.9",
                "higher",
            )
        )
        specs.append(
            (
                f"stream_peak_vs_memory_peak_k{k}",
                (f"train_stream_k{k}", "peak_rss_mb"),
                (f"train_full_k{k}", "peak_rss_mb"),
                f"peak resident memory of a rank, streamed / in memory, {k} rank(s)",
                None,
                "lower",
            )
        )
        specs.append(
            (
                f"train_epoch_vs_read_ceiling_k{k}",
                ("memory", "ceiling_s"),
                (f"train_full_k{k}", "epoch_s"),
                (
                    f"read ceiling / full-batch epoch of lepton train at {k} rank(s) (gradient + "
                    "allreduce + update)"
                ),
                None,
                "higher",
            )
        )
        specs.append(
            (
                f"hdf5_vs_raw_k{k}",
                (f"hdf5_k{k}", "ours_GBps"),
                (f"hdf5_k{k}", "raw_fresh_GBps"),
                (
                    f"read_block rate (X and y, NaN/Inf screen) / raw read of the same bytes into "
                    f"new memory, {k} rank(s), same threads, warm cache (like for like: a load "
                    "returns new arrays)"
                ),
                ">= 0.80",
                "higher",
            )
        )
        specs.append(
            (
                f"hdf5_vs_raw_touched_k{k}",
                (f"hdf5_k{k}", "ours_GBps"),
                (f"hdf5_k{k}", "raw_GBps"),
                "read_block rate / raw read into a preallocated, already touched buffer",
                None,
                "higher",
            )
        )
        specs.append(
            (
                f"raw_fresh_vs_raw_touched_k{k}",
                (f"hdf5_k{k}", "raw_fresh_GBps"),
                (f"hdf5_k{k}", "raw_GBps"),
                (
                    "raw read into new memory / into a touched buffer: the bound on the line "
                    "above for any load into new memory (the kernel zeroes each new page)"
                ),
                None,
                "higher",
            )
        )
        specs.append(
            (
                f"hdf5_h5py_vs_raw_k{k}",
                (f"hdf5_k{k}", "h5py_GBps"),
                (f"hdf5_k{k}", "raw_GBps"),
                "bare h5py read (fresh arrays, no checks) / raw preallocated",
                None,
                "higher",
            )
        )
        specs.append(
            (
                f"ours_speedup_vs_sklearn_lbfgs_k{k}",
                ("sklearn", "sklearn_lbfgs_fit_s"),
                (f"train_lbfgs_k{k}", "time_to_sklearn_loss_s"),
                (
                    f"LogisticRegression(lbfgs) fit / our L-BFGS time to the same objective, {k} "
                    "rank(s)"
                ),
                None,
                "higher",
            )
        )
        if k > 1:
            specs.append(
                (
                    f"strong_speedup_k{k}",
                    ("train_full_k1", "epoch_s"),
                    (f"train_full_k{k}", "epoch_s"),
                    (
                        f"full-batch epoch, 1 rank using every core / {k} ranks sharing them "
                        "(same data, same cores: ideal 1)"
                    ),
                    None,
                    "higher",
                )
            )
            specs.append(
                (
                    f"weak_efficiency_k{k}",
                    ("train_weak_k1", "epoch_s"),
                    (f"train_weak_k{k}", "epoch_s"),
                    (
                        f"epoch at 1 rank / at {k} ranks with {k}x the rows, one thread per rank "
                        "(ideal 1 while ranks <= cores)"
                    ),
                    None,
                    "higher",
                )
            )
    specs += [
        (
            "tensor_model_memory_1x2_vs_2x1",
            ("tensor_1x2", "model_mb"),
            ("tensor_2x1", "model_mb"),
            (
                "parameters + optimizer state a rank holds, MLP 256-4096-4096-10 on a 1 x 2 "
                "tensor grid / a 2 x 1 data-parallel grid (about half)"
            ),
            "<= 0.55",
            "lower",
        ),
        (
            "tensor_epoch_1x2_vs_2x1",
            ("tensor_1x2", "epoch_s"),
            ("tensor_2x1", "epoch_s"),
            "full-batch epoch of that MLP, 1 x 2 tensor grid / 2 x 1 data-parallel grid",
            None,
            "lower",
        ),
    ]
    return specs + kernel_ratio_specs()


def kernel_ratio_specs() -> list[tuple]:
    """Ratios of the feature sweep, the AVX2 code, the MLP and the distributed peers."""
    from .kernel_parts import (
        AVX2_D,
        MLP_CASES,
        SWEEP32_D,
        SWEEP_D,
        SWEEP_TRAIN32_D,
        SWEEP_TRAIN_D,
        mlp_tag,
    )

    specs: list[tuple] = [
        (
            f"dsweep_ours_vs_read_ceiling_d{d}",
            ("dsweep", f"ceiling_s_d{d}"),
            ("dsweep", f"ours_s_d{d}"),
            f"read ceiling / our logistic gradient, {d} features, same array, all cores",
            ">= 0.70",
            "higher",
        )
        for d in SWEEP_D
    ]
    specs += [
        (
            f"dsweep_ours_vs_read_ceiling_best_d{d}",
            ("dsweep", f"ceiling_best_s_d{d}"),
            ("dsweep", f"ours_best_s_d{d}"),
            "the same from the fastest repeat of each (less sensitive to other processes)",
            None,
            "higher",
        )
        for d in SWEEP_D
    ]
    specs += [
        (
            f"dsweep_ours32_vs_read_ceiling_d{d}",
            ("dsweep", f"ceiling_s_d{d}"),
            ("dsweep", f"ours32_s_d{d}"),
            f'the same with train.products = "float32" (float32 products), {d} features',
            ">= 0.80",
            "higher",
        )
        for d in SWEEP32_D
    ]
    specs += [
        (
            f"dsweep_train32_epoch_vs_read_ceiling_d{d}_k2",
            ("dsweep", f"ceiling_s_d{d}"),
            (f"dsweep_train32_d{d}", "epoch_s"),
            f"read ceiling / lepton train epoch at 2 ranks with float32 products, {d} features",
            ">= 0.80",
            "higher",
        )
        for d in SWEEP_TRAIN32_D
    ]
    specs += [
        (
            f"avx2_ours32_vs_read_ceiling_d{d}",
            ("avx2", f"ceiling_s_d{d}"),
            ("avx2", f"ours32_s_d{d}"),
            f"AVX2 code (NUMBA_CPU_NAME=haswell) with float32 products, {d} features",
            ">= 0.80",
            "higher",
        )
        for d in AVX2_D
        if d in SWEEP32_D
    ]
    for d in SWEEP_TRAIN_D:
        specs.append(
            (
                f"dsweep_train_epoch_vs_read_ceiling_d{d}_k2",
                ("dsweep", f"ceiling_s_d{d}"),
                (f"dsweep_train_d{d}", "epoch_s"),
                (
                    f"read ceiling of the same bytes / full-batch epoch of lepton train at 2 "
                    f"ranks, {d} features"
                ),
                None,
                "higher",
            )
        )
    for d in AVX2_D:
        specs.append(
            (
                f"avx2_ours_vs_read_ceiling_d{d}",
                ("avx2", f"ceiling_s_d{d}"),
                ("avx2", f"ours_s_d{d}"),
                (
                    f"the same on code for an AVX2-only CPU (NUMBA_CPU_NAME=haswell), {d} "
                    "features, the kernels the toolkit picks there"
                ),
                ">= 0.70",
                "higher",
            )
        )
        specs.append(
            (
                f"avx2_tuned_vs_read_ceiling_d{d}",
                ("avx2", f"ceiling_s_d{d}"),
                ("avx2", f"tuned_s_d{d}"),
                f"the same with the tuned kernels for haswell (forced on if refused), {d} features",
                None,
                "higher",
            )
        )
        specs.append(
            (
                f"avx2_generic_vs_read_ceiling_d{d}",
                ("avx2", f"ceiling_s_d{d}"),
                ("avx2", f"generic_s_d{d}"),
                f"the same with the generic reference kernels for haswell, {d} features",
                None,
                "higher",
            )
        )
    for d, hidden in MLP_CASES:
        tag = mlp_tag(d, hidden)
        for kind, what in (("full", "full-batch step"), ("mini", "mini-batch epoch (batch 256)")):
            specs.append(
                (
                    f"mlp_speedup_vs_torch_{kind}_{tag}",
                    ("mlp", f"torch_{kind}_s_{tag}"),
                    ("mlp", f"ours_{kind}_s_{tag}"),
                    (
                        f"PyTorch CPU / ours, MLP {d}->{'->'.join(map(str, hidden))}->1 ReLU, "
                        f"logistic loss, Adam, {what}, same threads"
                    ),
                    None,
                    "higher",
                )
            )
            specs.append(
                (
                    f"mlp32_speedup_vs_torch_{kind}_{tag}",
                    ("mlp", f"torch_{kind}_s_{tag}"),
                    ("mlp", f"ours32_{kind}_s_{tag}"),
                    'the same with train.products = "float32" (float32 GEMMs, float64 sums)',
                    None,
                    "higher",
                )
            )
    specs += [
        (
            "ours_speedup_vs_heat_k2",
            ("heat", "heat_s"),
            ("heat", "ours_s"),
            "Heat (split=0 arrays, the faster of two gradient forms) / ours, 2 ranks",
            None,
            "higher",
        ),
        (
            "ours_speedup_vs_heat_matmul_k2",
            ("heat", "heat_matmul_s"),
            ("heat", "ours_s"),
            "Heat with ht.matmul(X.T, r) / ours, 2 ranks",
            None,
            "higher",
        ),
        (
            "ours_speedup_vs_onedal_k2",
            ("onedal", "onedal_s"),
            ("onedal", "ours_s"),
            "daal4py logistic_loss per rank + Allreduce / ours, 2 ranks",
            None,
            "higher",
        ),
    ]
    return specs


def _train_bytes(parts: dict) -> int | None:
    for entry in parts.values():
        res = entry.get("results") or {}
        if "train_buffer_bytes" in res:
            return int(res["train_buffer_bytes"])
    return None


def _term(parts: dict, term) -> float | None:
    if term is None:
        return 1.0
    if callable(term):
        return term(parts)
    return value(parts, *term)


def _meets(v: float, target: str | None) -> bool | None:
    if target is None:
        return None
    op, bound = target.split()
    return v >= float(bound) if op == ">=" else v <= float(bound)


def compute_ratios(parts: dict, ks: list[int], kc: int) -> tuple[dict, dict]:
    """(ratios, skipped): every ratio whose two figures were measured, finite and positive."""
    ratios, skipped = {}, {}
    for key, num, den, definition, target, better in ratio_specs(ks, kc):
        a, b = _term(parts, num), _term(parts, den)
        if a is None or b is None:
            skipped[key] = "a figure it needs was not measured (part skipped or failed)"
            continue
        if not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
            skipped[key] = f"not a positive finite ratio ({a} / {b})"
            continue
        v = a / b
        ratios[key] = {
            "value": v,
            "definition": definition,
            "better": better,
            "target": target,
            "meets_target": _meets(v, target),
        }
    return ratios, skipped


def agreement(parts: dict) -> dict:
    """That every implementation timed computes the same thing: the largest difference of each
    mean gradient from NumPy's float64 one, relative to the largest component of NumPy's."""
    ref = parts.get("numpy", {})
    if ref.get("status") != "ok":
        return {}
    g_ref = ref["results"]["gradient"]
    scale = max(abs(v) for v in g_ref) or 1.0
    out = {}
    for name in ("memory", "torch_cpu"):
        entry = parts.get(name, {})
        if entry.get("status") == "ok":
            g = entry["results"]["gradient"]
            diff = max(abs(a - b) for a, b in zip(g, g_ref, strict=True)) / scale
            out[f"{name}_gradient_vs_numpy_f64"] = figure(diff, "relative (max-norm)")
            loss = entry["results"]["loss"]
            out[f"{name}_loss_vs_numpy_f64"] = figure(
                abs(loss - ref["results"]["loss"]) / abs(ref["results"]["loss"]), "relative"
            )
    return out
