"""From the measurements to ``results.md``, the plots and the printed summary."""

from __future__ import annotations

from pathlib import Path

from .ratios import value
from .tensor_rows import section as tensor_section


# ---- Markdown -----------------------------------------------------------------------------
def _fmt(v: float | None, unit: str = "s") -> str:
    if v is None:
        return "—"
    if unit == "s":
        if v < 1e-3:
            return f"{v * 1e6:.0f} us"
        return f"{v * 1e3:.1f} ms" if v < 10 else f"{v:.1f} s"
    return f"{v:.3g} {unit}"


TIMING_ROWS = [
    (
        "memory",
        "ceiling_s",
        "ceiling_GBps",
        "memory-read ceiling (Numba prange sum of X), all cores",
    ),
    ("memory", "ceiling_1thread_s", "ceiling_1thread_GBps", "memory-read ceiling, 1 thread"),
    ("memory", "ours_s", "ours_GBps", "ours: kernels.cpu.gradient, all cores"),
    ("memory", "ours_1thread_s", "ours_1thread_GBps", "ours: kernels.cpu.gradient, 1 thread"),
    ("numpy", "numpy_f64_s", "numpy_f64_rows_per_s", "NumPy float64 reference gradient"),
    ("torch_cpu", "torch_manual_s", "torch_manual_rows_per_s", "PyTorch CPU gradient (by hand)"),
    ("torch_cpu", "torch_autograd_s", "torch_autograd_rows_per_s", "PyTorch CPU autograd"),
    ("sklearn", "sklearn_sgd_epoch_s", None, "scikit-learn SGDClassifier, one epoch"),
    ("sklearn", "sklearn_lbfgs_fit_s", None, "scikit-learn LogisticRegression(lbfgs) fit"),
]


SHOWN = {  # figures of the training and DDP runs listed under "Timings"
    "ddp_": ("ddp_full_epoch_s", "ddp_minibatch_epoch_s", "ddp_minibatch_step_s"),
    "train_minibatch": ("epoch_s", "step_s"),
    "minibatch_k": (
        "step_s",
        "plan_step_s",
        "gather_step_s",
        "gradient_step_s",
        "allreduce_step_s",
        "update_step_s",
        "other_step_s",
        "load_floor_step_s",
    ),
    "train_lbfgs": ("time_to_sklearn_loss_s",),
}


def markdown(res: dict) -> str:
    parts, ratios, s = res["parts"], res["ratios"], res["settings"]
    host = res["host"]
    lines = [
        "# lepton bench",
        "",
        (
            f"`{res['command']}` — {res['created']}; {s['rows']:,} rows x {s['features']} float32 "
            f"features (logistic), ranks {s['ranks']}, {host['cores']} cores "
            f"({host.get('cpu', '?')}), load average {host['loadavg_start'][0]:.2f} at the start "
            f"and {host['loadavg_end'][0]:.2f} at the end. Each figure: warm-up, then the median "
            f"of {s['repeats']} repeats (fewer for slow peers); every sample is in results.json."
        ),
        "",
        "## Ratios (same run)",
        "",
        "| ratio | value | target | meets | definition |",
        "|---|---:|---|---|---|",
    ]
    for key, r in ratios.items():
        meets = {True: "yes", False: "**no**", None: ""}[r["meets_target"]]
        lines.append(
            f"| {key} | {r['value']:.3g} | {r['target'] or ''} | {meets} | {r['definition']} |"
        )
    checks = res.get("checks", {})
    if checks:
        lines += ["", "Same computation everywhere (difference from the float64 NumPy gradient): "]
        lines[-1] += ", ".join(f"{k} {c['value']:.1e}" for k, c in checks.items()) + "."
    lines += ["", "## Timings", "", "| measurement | median | rate |", "|---|---:|---:|"]
    for part, t_fig, r_fig, label in TIMING_ROWS:
        t = value(parts, part, t_fig)
        if t is not None:
            rate = value(parts, part, r_fig) if r_fig else None
            unit = "GB/s" if r_fig and r_fig.endswith("GBps") else "rows/s"
            lines.append(f"| {label} | {_fmt(t)} | {_fmt(rate, unit) if rate else ''} |")
    for name, entry in parts.items():
        shown = [v for prefix, v in SHOWN.items() if name.startswith(prefix)]
        if entry.get("status") == "ok" and shown:
            figs = entry["results"]["figures"]
            for key in shown[0]:
                if key in figs:
                    lines.append(f"| {name}: {key} | {_fmt(figs[key]['value'])} | |")
    for k in s["ranks"]:
        for key in ("ours", "h5py", "raw", "raw_fresh"):
            t, rate = (value(parts, f"hdf5_k{k}", f"{key}_{u}") for u in ("s", "GBps"))
            if t is not None:
                lines.append(
                    f"| HDF5 load, {k} rank(s): {key} | {_fmt(t)} | {_fmt(rate, 'GB/s')} |"
                )
    lines += [
        "",
        "## Scaling (full batch: epoch from lepton train; step split and load from the step part)",
        "",
        "| data | ranks | threads/rank | epoch | compute/step | comm/step | load (I/O) | comm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in scaling_rows(res):
        lines.append(
            f"| {row['label']} | {row['ranks']} | {row['threads']} | {_fmt(row['epoch'])} | "
            f"{_fmt(row['compute'])} | {_fmt(row['comm'])} | {_fmt(row['io'])} | "
            f"{row['share']:.2%} |"
        )
    lines += _allreduce_table(parts)
    lines += memory_section(parts)
    lines += kernel_sections(parts)
    lines += layouts_section(parts)
    lines += tensor_section(parts)
    lines += [
        "",
        "## Machine load while measuring",
        "",
        (
            "Other processes' CPU use during each part (machine CPU time less ours, in cores), and "
            "the 1-minute load average at its start; figures measured under load are pessimistic."
        ),
        "",
        "| part | wall | other processes (cores) | load average |",
        "|---|---:|---:|---:|",
    ]
    for name, entry in parts.items():
        load = entry.get("load")
        if load:
            other = load.get("other_processes_cores")
            lines.append(
                f"| {name} | {entry['wall_s']:.1f} s | {'' if other is None else f'{other:.2f}'} "
                f"| {load['loadavg_1min_start']:.2f} |"
            )
    off = {n: e["reason"] for n, e in parts.items() if e.get("status") != "ok"}
    if off or res["skipped_ratios"]:
        lines += ["", "## Skipped or failed", ""]
        lines += [f"- part `{n}`: {why.splitlines()[0]}" for n, why in off.items()]
        lines += [f"- ratio `{n}`: {why}" for n, why in res["skipped_ratios"].items()]
    return "\n".join(lines) + "\n"


def memory_section(parts: dict) -> list[str]:
    """Each ``lepton train`` run's peak resident memory (its largest rank) against the rows it
    held (``data.stream``: its two read buffers), from results.json's ``memory``."""
    rows = []
    for name, entry in parts.items():
        if not name.startswith("train_") or entry.get("status") != "ok":
            continue
        figs = entry["results"]["figures"]
        if "peak_rss_mb" in figs and "data_mb" in figs:
            rows.append(
                f"| {name} | {figs['peak_rss_mb']['value']:.0f} MiB | "
                f"{figs['data_mb']['value']:.1f} MiB |"
            )
    if not rows:
        return []
    return [
        "",
        "## Memory per rank (lepton train runs)",
        "",
        (
            "Peak resident memory of the largest rank (interpreter, NumPy, Numba, MPI and h5py "
            "included: about 200 MiB on their own) and the MiB of rows it held."
        ),
        "",
        "| run | peak resident | rows held |",
        "|---|---:|---:|",
        *rows,
    ]


def sweep_rows_md(parts: dict) -> list[dict]:
    """One row per feature count of the sweep: times, fractions of the read ceiling, and the AVX2
    and ``lepton train`` figures where they were measured."""
    from .kernel_parts import SWEEP_D

    rows = []
    for d in SWEEP_D:
        ceiling, ours = (
            value(parts, "dsweep", f"ceiling_s_d{d}"),
            value(parts, "dsweep", f"ours_s_d{d}"),
        )
        if ceiling is None or ours is None:
            continue
        fig = parts["dsweep"]["results"]["figures"][f"ours_s_d{d}"]
        a_ceil = value(parts, "avx2", f"ceiling_s_d{d}")
        a_ours, a_tuned, a_generic = (
            value(parts, "avx2", f"ours_s_d{d}"),
            value(parts, "avx2", f"tuned_s_d{d}"),
            value(parts, "avx2", f"generic_s_d{d}"),
        )
        epoch = value(parts, f"dsweep_train_d{d}", "epoch_s")
        epoch32 = value(parts, f"dsweep_train32_d{d}", "epoch_s")
        rows.append(
            {
                "d": d,
                "rows": int(fig.get("rows", 0)),
                "ceiling": ceiling,
                "ours": ours,
                "fraction": ceiling / ours,
                "fraction_best": _ratio(
                    value(parts, "dsweep", f"ceiling_best_s_d{d}"),
                    value(parts, "dsweep", f"ours_best_s_d{d}"),
                ),
                "avx2_fraction": _ratio(a_ceil, a_ours),
                "avx2_tuned_fraction": _ratio(a_ceil, a_tuned),
                "avx2_generic_fraction": _ratio(a_ceil, a_generic),
                "train_epoch": epoch,
                "train_fraction": _ratio(ceiling, epoch),
                "fraction32": _ratio(ceiling, value(parts, "dsweep", f"ours32_s_d{d}")),
                "avx2_fraction32": _ratio(a_ceil, value(parts, "avx2", f"ours32_s_d{d}")),
                "train_fraction32": _ratio(ceiling, epoch32),
            }
        )
    return rows


def mlp_rows_md(parts: dict) -> list[dict]:
    """One row per MLP configuration: full-batch step and mini-batch epoch, ours and torch."""
    entry = parts.get("mlp", {})
    if entry.get("status") != "ok":
        return []
    out = []
    for case in entry["results"]["cases"]:
        t = {k: v["median_s"] for k, v in case["timings"].items()}
        out.append(
            {
                "model": f"{case['features']}->{'->'.join(map(str, case['hidden']))}->1",
                "rows_full": case["rows_full_batch"],
                "rows_mini": case["rows_minibatch_epoch"],
                **t,
                "speedup_full": t["torch_full"] / t["ours_full"],
                "speedup_mini": t["torch_mini"] / t["ours_mini"],
                "speedup32_full": _ratio(t["torch_full"], t.get("ours32_full")),
                "speedup32_mini": _ratio(t["torch_mini"], t.get("ours32_mini")),
                "loss_rel_diff": case["agreement"]["loss_rel_diff"],
            }
        )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _opt(v: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def kernel_sections(parts: dict) -> list[str]:
    """The feature sweep, the MLP comparison and the distributed peers, where they ran."""
    lines: list[str] = []
    sweep = sweep_rows_md(parts)
    if sweep:
        res = parts["dsweep"]["results"]
        avx2 = parts.get("avx2", {}).get("results", {})
        lines += [
            "",
            (
                f"## Feature sweep (logistic gradient, float32, about {res['bytes_X'] / 2**20:.0f} "
                f"MiB of X each, {res['threads']} threads; fraction = read ceiling / time)"
            ),
            "",
        ]
        if avx2:
            ok, why = avx2["native_supported"]
            lines += [
                (
                    f"AVX2 columns: NUMBA_CPU_NAME={avx2['cpu_name']}, own Numba cache; "
                    f"`kernels.native.supported()` there: {ok} ({why}); 'tuned' = the tuned "
                    "kernels (forced on where that check refuses them); 'generic' = the "
                    "reference kernels."
                ),
                "",
            ]
        lines += [
            (
                "| d | rows | ceiling | ours | fraction | fraction (best) | AVX2 fraction | "
                "AVX2 tuned | AVX2 generic | train epoch (2 ranks) | train fraction | "
                "float32 products: fraction | AVX2 | train |"
            ),
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sweep:
            lines.append(
                f"| {r['d']} | {r['rows']:,} | {_fmt(r['ceiling'])} | {_fmt(r['ours'])} | "
                f"{r['fraction']:.2f} | {_opt(r['fraction_best'])} | {_opt(r['avx2_fraction'])} | "
                f"{_opt(r['avx2_tuned_fraction'])} | {_opt(r['avx2_generic_fraction'])} | "
                f"{_fmt(r['train_epoch'])} | "
                f"{_opt(r['train_fraction'])} | {_opt(r['fraction32'])} | "
                f"{_opt(r['avx2_fraction32'])} | {_opt(r['train_fraction32'])} |"
            )
    mlp = mlp_rows_md(parts)
    if mlp:
        res = parts["mlp"]["results"]
        lines += [
            "",
            (
                f"## MLP training against PyTorch CPU ({res['threads']} threads each, ReLU, "
                f"{res['loss']}, {res['optimizer']}; speedup = torch / ours, > 1: ours faster)"
            ),
            "",
            (
                "| model | full-batch rows | ours step | torch step | speedup (float32 "
                "products) | epoch rows | ours epoch | torch epoch | speedup (float32 "
                "products) | loss rel. diff |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mlp:
            lines.append(
                f"| {r['model']} | {r['rows_full']:,} | {_fmt(r['ours_full'])} | "
                f"{_fmt(r['torch_full'])} | {r['speedup_full']:.2f} "
                f"({_opt(r['speedup32_full'])}) | {r['rows_mini']:,} | "
                f"{_fmt(r['ours_mini'])} | {_fmt(r['torch_mini'])} | {r['speedup_mini']:.2f} "
                f"({_opt(r['speedup32_mini'])}) | {r['loss_rel_diff']:.1e} |"
            )
    peers = []
    for part, key, label in (
        ("heat", "heat_matmul_s", "Heat ht.matmul(X.T, r)"),
        ("heat", "heat_bsum_s", "Heat ht.sum(X * r, axis=0)"),
        ("heat", "ours_s", "ours (same job as Heat)"),
        ("onedal", "onedal_s", "oneDAL (daal4py) logistic_loss + Allreduce"),
        ("onedal", "ours_s", "ours (same job as oneDAL)"),
    ):
        v = value(parts, part, key)
        if v is not None:
            res = parts[part]["results"]
            rows = res.get("rows")
            peers.append(
                f"| {label} | {res['ranks']} | {f'{rows:,}' if rows else ''} | {_fmt(v)} |"
            )
    if peers:
        lines += [
            "",
            "## Distributed logistic gradient against Heat and oneDAL (gradient + allreduce)",
            "",
            "| implementation | ranks | rows | median |",
            "|---|---:|---:|---:|",
            *peers,
        ]
        notes = [parts.get(p, {}).get("results", {}).get("note") for p in ("heat", "onedal")]
        lines += [""] + [f"- {n}" for n in notes if n]
    return lines


def layouts_section(parts: dict) -> list[str]:
    """The layouts table (``bench.layouts``): each layout's load rate at each rank and thread
    count against the raw read of the same bytes, then the ratios with their targets."""
    from .layouts import scaling_ratios

    runs = [(n, parts[n]) for n in ("layouts_k1", "layouts_k2") if n in parts]
    runs = [(n, e) for n, e in runs if e.get("status") == "ok"]
    if not runs:
        return []
    first = runs[0][1]["results"]
    mib = first["bytes"] / 2**20
    lines = [
        "",
        (
            f"## Layouts (X of {first['rows']:,} x {first['features']} float32, {mib:.0f} MiB, "
            "read whole by each job's ranks from the page cache; of raw = raw read time / time)"
        ),
        "",
        "| layout | ranks | threads/rank | on disk | median | rate | of raw | CPU/wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _name, entry in runs:
        res = entry["results"]
        figs = res["figures"]
        for case in res["cases"]:
            key = case["case"]
            layout = case["layout"]
            base = layout.split(" ")[0]
            disk = res["file_bytes"].get("contiguous" if base == "raw" else base)
            ratio = figs.get(f"{key}_vs_raw")
            of_raw = "" if ratio is None else f"{ratio['value']:.2f}"
            lines.append(
                f"| {layout} | {res['ranks']} | {case['threads']} | "
                f"{'' if disk is None else f'{disk / 2**20:.0f} MiB'} | "
                f"{_fmt(figs[f'{key}_s']['value'])} | "
                f"{_fmt(figs[f'{key}_GBps']['value'], 'GB/s')} | "
                f"{of_raw} | "
                f"{figs[f'{key}_cpu_per_wall']['value']:.2f} |"
            )
    differ = [
        f"{k} ({e['results']['ranks']} ranks)" for _n, e in runs for k in e["results"]["differ"]
    ]
    lines += [
        "",
        "Every read gave the raw read's bytes: "
        + ("yes." if not differ else f"**no**: {', '.join(differ)}."),
    ]
    checks = scaling_ratios(parts)
    if checks:
        lines += ["", "| layouts ratio | value | target | meets |", "|---|---:|---:|---|"]
        for c in checks:
            meets = "yes" if c["value"] >= c["target"] else "**no**"
            lines.append(f"| {c['name']} | {c['value']:.2f} | >= {c['target']} | {meets} |")
    return lines


def scaling_rows(res: dict) -> list[dict]:
    """Strong (same rows), weak (rows x ranks) and Horovod rows of the scaling table."""
    parts, rows = res["parts"], []
    ks = res["settings"]["ranks"]
    cases = [("strong", "step", "train_full", k) for k in ks]
    cases += [("weak", "step", "train_weak", k) for k in ks]
    cases += [("strong", "step_horovod", "train_horovod", k) for k in ks if k > 1]
    for kind, step, train, k in cases:
        entry = parts.get(f"{step}_k{k}", {})
        if entry.get("status") != "ok" or f"{kind}_step_s" not in entry["results"]["figures"]:
            continue
        figs = entry["results"]["figures"]
        rows_ = int(figs[f"{kind}_rows"]["value"])
        backend = " (horovod)" if step == "step_horovod" else ""
        rows.append(
            {
                "label": f"{kind}: {rows_:,} rows{backend}",
                "kind": kind,
                "ranks": k,
                "backend": entry["results"]["backend"],
                "threads": entry["results"].get(f"{kind}_threads_per_rank")
                or entry["results"]["threads_per_rank"],
                "epoch": value(parts, f"{train}_k{k}", "epoch_s"),
                "compute": figs[f"{kind}_compute_step_s"]["value"],
                "comm": figs[f"{kind}_comm_step_s"]["value"],
                "io": figs[f"{kind}_io_s"]["value"],
                "share": figs[f"{kind}_comm_share"]["value"],
            }
        )
    return rows


def sweeps(parts: dict) -> dict[str, dict[int, float]]:
    """{label: {bytes: seconds}} of every allreduce sweep that ran."""
    out = {}
    for name, entry in parts.items():
        if entry.get("status") == "ok" and "allreduce" in entry["results"]:
            kind = "MPI" if name.startswith("allreduce") else name.split("_")[0]
            label = f"{kind} ({entry['results']['ranks']} ranks)"
            out[label] = {r["bytes"]: r["median_s"] for r in entry["results"]["allreduce"]}
    return out


def _allreduce_table(parts: dict) -> list[str]:
    data = sweeps(parts)
    if not data:
        return []
    labels = list(data)
    sizes = sorted({b for d in data.values() for b in d})
    lines = ["", "## Allreduce latency (median per call, µs)", ""]
    lines.append("| bytes | " + " | ".join(labels) + " |")
    lines.append("|---:|" + "---:|" * len(labels))
    for b in sizes:
        cells = [f"{data[lab][b] * 1e6:.1f}" if b in data[lab] else "—" for lab in labels]
        lines.append(f"| {b:,} | " + " | ".join(cells) + " |")
    return lines


# ---- plots --------------------------------------------------------------------------------
def plots(res: dict, out: Path) -> list[str]:
    """scaling.png (time split per rank count) and allreduce.png (latency by size)."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    parts, written = res["parts"], []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    table = [r for r in scaling_rows(res) if r["backend"] == "mpi"]
    for ax, kind in ((axes[0], "strong"), (axes[1], "weak")):
        rows = [r for r in table if r["kind"] == kind]
        x = list(range(len(rows)))
        comp = [r["compute"] for r in rows]
        ax.bar([i - 0.2 for i in x], comp, 0.4, label="compute / step")
        ax.bar(
            [i - 0.2 for i in x], [r["comm"] for r in rows], 0.4, bottom=comp, label="comm / step"
        )
        ax.bar(
            [i + 0.2 for i in x], [r["io"] for r in rows], 0.4, label="I/O (load, once)", hatch="//"
        )
        ax.set_xticks(x, [f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}" for r in rows])
        ax.set_ylabel("seconds")
        ax.set_title(f"{kind} scaling (full-batch step)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)
    written.append(str(out / "scaling.png"))
    data = sweeps(parts)
    if data:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, d in data.items():
            sizes = sorted(d)
            ax.loglog(sizes, [d[b] * 1e6 for b in sizes], marker="o", label=label)
        ax.set_xlabel("buffer size (bytes)")
        ax.set_ylabel("median time per allreduce (µs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "allreduce.png", dpi=110)
        plt.close(fig)
        written.append(str(out / "allreduce.png"))
    return written


def summary_lines(res: dict) -> list[str]:
    """The ratios as printed at the end of a run."""
    lines = ["", "ratios (same run; target where there is one):"]
    for key, r in res["ratios"].items():
        mark = {True: "ok", False: "SHORT", None: ""}[r["meets_target"]]
        lines.append(f"  {key:<40} {r['value']:>9.3g}  {r['target'] or '':<8} {mark}")
    return lines
