"""Every script in examples/ runs to completion, on an SQLite file and on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fixtures import new_pg_database, pg_connect

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.fixture
async def pg_examples_url() -> AsyncIterator[str | None]:
    """An empty PostgreSQL database (an example's first run migrates it, as a user's
    would); None when no server answers and none is required (under CI it fails)."""
    try:
        admin = await pg_connect()
    except pytest.skip.Exception:
        yield None  # the SQLite half still runs
        return
    url = await new_pg_database(admin)
    try:
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
        await admin.close()


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_and_runs_again(
    script: Path, tmp_path: Path, pg_examples_url: str | None
) -> None:
    """Each example runs to completion, and again against the database it left, on an
    SQLite file and on PostgreSQL (both start with no schema). The two backends' runs go
    side by side: most of a run is starting Python and importing, so this takes about
    the time of one backend."""
    urls = {"sqlite": f"sqlite:///{tmp_path / 'examples.db'}"}
    if pg_examples_url is not None:
        urls["postgres"] = pg_examples_url
    for run in ("first", "second"):
        running: dict[str, subprocess.Popen[str]] = {}
        try:
            for backend, url in urls.items():
                folder = tmp_path / backend
                folder.mkdir(exist_ok=True)
                running[backend] = subprocess.Popen(
                    [sys.executable, str(script)],
                    cwd=folder,
                    env={**os.environ, "CTXENGINE_DATABASE_URL": url},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            for backend, process in running.items():
                stdout, stderr = process.communicate(timeout=120)
                assert process.returncode == 0, f"{backend}, {run} run: {stderr}"
                assert stdout.strip(), f"{backend}, {run} run printed nothing"
        finally:
            for process in running.values():
                if process.poll() is None:
                    process.kill()
                    process.communicate()
