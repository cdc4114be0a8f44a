"""The scale benchmark runs end to end at a tiny size (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "--sessions": "2000",
    "--messages": "5000",
    "--expire": "500",
    "--steps": "4",
    "--rounds": "5",
    "--pages": "5",
    "--walks": "2",
    "--sweeps": "3",
    "--ops": "20",
    "--repeats": "1",
    "--procs": "1",
    "--proc-tasks": "2",
    "--proc-seconds": "0.3",
}


def test_the_scale_benchmark_runs_and_writes_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    args = [item for pair in TINY.items() for item in pair]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.scale",
            "--backend",
            "sqlite",
            *args,
            "--tmpdir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    r = json.loads(out.read_text())["sqlite"]
    assert r["sizes"]["sessions"] == 2000 and r["sizes"]["messages"] == 5000
    assert r["verify"]["ok"] and r["verify"]["count_sessions"] == 2000

    assert r["bulk"]["seconds"] > 0 and len(r["bulk"]["steps"]) == 4

    for position in ("start", "middle", "end"):
        assert {"p50_ms", "p99_ms", "n"} <= set(r["list_sessions"][position])
        assert r["list_sessions"][position]["n"] > 0
    assert "met" in r["list_sessions"]

    sweep = r["sweep_nothing_to_expire"]
    assert {"median_ms", "samples_ms", "cleanup_inactive_sessions_median_ms", "met"} <= set(sweep)

    expire = r["expire_idle"]
    assert expire["made_idle"] == expire["expired"] == 500
    assert expire["floor_rows"] == 500 and expire["floor_s"] > 0  # the same rows, rolled back
    assert {
        "seconds",
        "rss_before_mb",
        "rss_peak_mb",
        "rss_after_mb",
        "maxrss_after_mb",
        "rss_growth_second_half_mb",
        "memory_flat",
    } <= set(expire)

    growth = r["memory_growth"]
    assert len(growth["samples"]) == 5  # the empty store, then after each step
    assert all(s["rss_mb"] > 0 for s in growth["samples"])
    assert {"get_session", "add_message", "get_messages", "list_page"} <= set(
        growth["samples"][-1]["p50_ms"]
    )
    assert "flat" in growth

    for op in ("update_session", "add_message"):
        (row,) = r["multiprocess"][op]
        assert row["processes"] == 1 and row["ops_per_s"] > 0 and row["scaling_vs_1"] == 1.0

    for name in (
        "track_usage, quota set",
        "track_usage, no quota",
        "raw INSERT of a usage row",
        "update_session",
        "raw UPDATE of the session row",
    ):
        assert r["guarantees"][name]["ops_per_s"] > 0

    assert "ix_ctx_sessions" in r["list_sessions"]["plan_middle_page"]
    assert "UPDATE ctx_sessions" in r["expire_idle"]["plan_first_batch"]
    assert "UPDATE ctx_sessions" in r["sweep_nothing_to_expire"]["plan"]
