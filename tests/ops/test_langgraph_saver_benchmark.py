"""The LangGraph checkpointer benchmark runs (at a tiny size; speed is measured, never
asserted), with LangGraph's own savers beside ours on both backends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_langgraph_saver_harness_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "saver.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.langgraph_saver",
            "--backend",
            "all",
            "--steps",
            "3",
            "--runs",
            "16",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    expected = {
        "sqlite": {"ContextEngineSaver", "AsyncSqliteSaver"},
        "postgres": {"ContextEngineSaver", "AsyncPostgresSaver"},
    }
    for backend, savers in expected.items():
        rows = results[backend]
        assert {(row["saver"], row["mode"]) for row in rows} == {
            (saver, mode) for saver in savers for mode in ("sequential", "16 tasks")
        }
        assert all(row["steps_per_s"] > 0 for row in rows)
    assert "a 3-step graph" in done.stdout
