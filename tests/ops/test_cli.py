"""The ctxengine command, on an SQLite file and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from ctxengine import ContextEngine, EngineSettings
from ctxengine.cli import main


async def seed(url: str) -> None:
    async with ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s1", "ann", tags=["vip"])
        await engine.create_session("s2", "bob", tier="pro")
        await engine.update_session("s2", increment_requests=True, mark_error=True)
        await engine.end_session("s1")


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_subcommand(db_url: str) -> None:
    asyncio.run(seed(db_url))
    assert "migrated" in invoke("migrate", "--url", db_url)
    listing = invoke("sessions", "list", "--url", db_url)
    assert "s1" in listing and "s2" in listing and "completed" in listing
    rows = json.loads(invoke("sessions", "list", "--url", db_url, "--json", "--user", "bob"))
    assert [r["session_id"] for r in rows] == ["s2"] and rows[0]["error_count"] == 1
    assert (
        json.loads(invoke("sessions", "list", "--url", db_url, "--json", "--tag", "vip"))[0][
            "session_id"
        ]
        == "s1"
    )
    assert (
        json.loads(invoke("sessions", "list", "--url", db_url, "--json", "--status", "active"))[0][
            "tier"
        ]
        == "pro"
    )
    assert "more: --cursor s2" in invoke("sessions", "list", "--url", db_url, "--limit", "1")
    shown = json.loads(invoke("sessions", "show", "s2", "--url", db_url, "--json"))
    assert shown["request_count"] == 1
    assert "user_id: ann" in invoke("sessions", "show", "s1", "--url", db_url)
    stats = json.loads(invoke("stats", "--url", db_url, "--json"))
    assert stats["total_sessions"] == 2 and stats["total_errors"] == 1
    assert "expired 1 session(s)" in invoke("cleanup", "--url", db_url, "--max-idle", "0.000001")
    assert (
        json.loads(invoke("stats", "--url", db_url, "--json"))["sessions_by_status"]["expired"] == 1
    )
    assert invoke("sessions", "list", "--url", db_url, "--tenant", "acme").count("\n") == 1


def test_errors_are_clear(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    runner = CliRunner()
    missing = runner.invoke(main, ["sessions", "show", "nope", "--url", url])
    assert missing.exit_code == 1 and "no session 'nope'" in missing.output
    bad = runner.invoke(main, ["migrate", "--url", "mysql://h/db"])
    assert bad.exit_code == 1 and "unsupported database URL" in bad.output


def test_environment_url_and_python_dash_m(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    result = CliRunner().invoke(main, ["stats", "--json"], env={"CTXENGINE_DATABASE_URL": url})
    assert result.exit_code == 0 and json.loads(result.output)["total_sessions"] == 0
    assert (tmp_path / "env.db").exists()
    version = subprocess.run(
        [sys.executable, "-m", "ctxengine", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "ctxengine" in version.stdout


def test_demo_runs_on_the_embedded_default(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ctxengine", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "session.expired" in result.stdout and "statistics" in result.stdout
    assert (tmp_path / "ctxengine.db").exists()
