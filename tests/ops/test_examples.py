"""Every script in examples/ runs to completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_and_runs_again(script: Path, tmp_path: Path) -> None:
    """Each example runs to completion, and again against the database it left."""
    env = {**os.environ, "CTXENGINE_DATABASE_URL": f"sqlite:///{tmp_path / 'examples.db'}"}
    for run in ("first", "second"):
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{run} run: {result.stderr}"
        assert result.stdout.strip()
