"""``lepton bench``'s layouts part: the table and ratios on canned results, and one tiny in-process
measurement (files written, every layout read, every read equal to the raw bytes).

Speed is what the benchmark shows, never what a test asserts: no thresholds on any figure here.
"""

from __future__ import annotations

import pytest

from lepton_hpc.bench import layouts, report
from lepton_hpc.bench.common import figure
from lepton_hpc.comm.base import SerialComm


def _part(ranks: int, threads: list[int], seconds: dict[str, float], differ=()) -> dict:
    figs, cases = {}, []
    for key, s in seconds.items():
        t = int(key.rsplit("_t", 1)[1]) if "_t" in key else 1
        figs[f"{key}_s"] = figure(s, "s")
        figs[f"{key}_GBps"] = figure(0.1 / s, "GB/s")
        figs[f"{key}_cpu_per_wall"] = figure(1.5, "cores")
        figs[f"{key}_vs_raw"] = figure(seconds[f"raw_t{t}"] / s, "ratio")
        name = key.rsplit("_", 1)[0]
        label = f"{name} (h5py)" if key.endswith("_h5py") else name
        cases.append({"case": key, "layout": label, "threads": t})
    return {
        "status": "ok",
        "results": {
            "ranks": ranks,
            "rows": 1000,
            "features": 25,
            "bytes": 100_000_000,
            "threads": threads,
            "file_bytes": {"contiguous": 100 << 20, "chunked": 100 << 20, "gzip": 50 << 20},
            "direct": {"chunked": True, "gzip": True, "lzf": False},
            "cases": cases,
            "differ": list(differ),
            "figures": figs,
        },
    }


def canned() -> dict:
    k1 = {
        "raw_t1": 0.05,
        "contiguous_t1": 0.05,
        "chunked_t1": 0.1,
        "gzip_t1": 1.0,
        "gzip_h5py": 1.2,
        "raw_t2": 0.04,
        "contiguous_t2": 0.04,
        "chunked_t2": 0.045,
        "gzip_t2": 0.5,
    }
    k2 = {"raw_t1": 0.04, "contiguous_t1": 0.04, "chunked_t1": 0.05, "gzip_t1": 0.8}
    return {"layouts_k1": _part(1, [1, 2], k1), "layouts_k2": _part(2, [1], k2, ["gzip_t1"])}


def test_ratios_and_targets_from_canned_parts():
    got = {r["name"]: r for r in layouts.scaling_ratios(canned())}
    assert got["chunked / contiguous rate, 1 rank x 1 thread(s)"]["value"] == pytest.approx(0.5)
    assert got["chunked / contiguous rate, 1 rank x 2 thread(s)"]["value"] == pytest.approx(
        0.04 / 0.045
    )
    assert got["gzip decode, 2 threads / 1 thread (1 rank)"]["value"] == pytest.approx(2.0)
    assert got["gzip decode, 2 ranks / 1 rank (1 thread each)"]["value"] == pytest.approx(1.25)
    assert not any(k.startswith("lzf") for k in got)  # not read directly: no ratio
    assert {r["target"] for r in got.values()} == {0.8, 1.6}


def test_layouts_table_renders_rows_ratios_and_targets():
    md = "\n".join(report.layouts_section(canned()))
    assert "## Layouts (X of 1,000 x 25 float32, 95 MiB" in md
    assert "| gzip | 1 | 1 | 50 MiB | 1000.0 ms | 0.1 GB/s | 0.05 | 1.50 |" in md
    assert "| gzip (h5py) | 1 | 1 | 50 MiB | 1200.0 ms |" in md
    assert "| raw | 2 | 1 | 100 MiB | 40.0 ms | 2.5 GB/s | 1.00 | 1.50 |" in md
    assert "| chunked / contiguous rate, 1 rank x 1 thread(s) | 0.50 | >= 0.8 | **no** |" in md
    assert "| gzip decode, 2 threads / 1 thread (1 rank) | 2.00 | >= 1.6 | yes |" in md
    assert "gave the raw read's bytes: **no**: gzip_t1 (2 ranks)." in md


def test_layouts_table_empty_without_parts():
    assert report.layouts_section({}) == []
    assert report.layouts_section({"layouts_k1": {"status": "skipped", "reason": "x"}}) == []
    assert layouts.scaling_ratios({}) == []


def test_tiny_measurement_reads_every_layout_to_the_raw_bytes(tmp_path):
    paths = layouts.make(tmp_path, 3_000, 5)
    assert set(paths) >= {"contiguous", "chunked", "gzip", "lzf"}
    again = {p: p.stat().st_mtime_ns for p in paths.values()}
    layouts.make(tmp_path, 3_000, 5)  # kept: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in paths.values()} == again
    res = layouts.measure(paths, SerialComm(), [1, 2], 1)
    assert res["same_bytes_as_raw"] and res["differ"] == []
    assert all(res["direct"].values())
    figs = res["figures"]
    for t in (1, 2):
        for name in paths:
            assert figs[f"{name}_t{t}_s"]["value"] > 0
    assert "gzip_h5py_s" in figs and "gzip_h5py_t2_s" not in figs
    md = "\n".join(report.layouts_section({"layouts_k1": {"status": "ok", "results": res}}))
    assert "| lzf | 1 | 2 |" in md and "lzf decode, 2 threads / 1 thread" in md
