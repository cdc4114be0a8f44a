"""The blocking facade's benchmark harness runs (at a tiny size; speed is measured,
never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_sync_facade_harness_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "sync.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.sync_facade",
            "--backend",
            "sqlite",
            "--n",
            "64",
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
    rows = json.loads(out.read_text())["sqlite"]
    assert [row["operation"] for row in rows] == [
        "update_session",
        "get_session",
        "update_session, 16 threads / tasks",
    ]
    assert all(row["ratio"] > 0 for row in rows)
    assert "the 0.7x target" in done.stdout
