"""The ctxengine command, on an SQLite file and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.ext.asyncio import create_async_engine

from ctxengine import ContextEngine, EngineSettings
from ctxengine.cli import _IsoDateTime, main
from ctxengine.migrate import VERSION_TABLE, head_revision
from ctxengine.storage import describe_url
from tests.ops.test_migrations import empty_url  # noqa: F401 (a fixture)


async def seed(url: str) -> None:
    async with ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s1", "ann", tags=["vip"])
        await engine.create_session("s2", "bob", tier="pro")
        await engine.update_session("s2", increment_requests=True, mark_error=True)
        await engine.end_session("s1")


def invoke(*args: str, input: str | None = None) -> str:
    result = CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command expected to fail cleanly: exit 1, one line on stderr, no traceback."""
    result: Result = CliRunner().invoke(main, list(args), input=input, env=env)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(("Error: ", "Aborted")), result.stderr
    return lines[0]


def test_every_subcommand(db_url: str) -> None:
    asyncio.run(seed(db_url))
    assert "already at" in invoke("migrate", "--url", db_url)
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


def test_url_before_or_after_the_subcommand(db_url: str) -> None:
    asyncio.run(seed(db_url))
    for args in (
        ["--url", db_url, "stats", "--json"],
        ["stats", "--json", "--url", db_url],
        ["--url", "sqlite:///elsewhere/x.db", "stats", "--json", "--url", db_url],  # last wins
    ):
        assert json.loads(invoke(*args))["total_sessions"] == 2
    assert "s2" in invoke("--url", db_url, "sessions", "list")
    assert "s2" in invoke("sessions", "--url", db_url, "list")
    assert "up to date" in invoke("db", "--url", db_url, "status")


def test_sessions_end_and_purge(db_url: str) -> None:
    asyncio.run(seed(db_url))
    assert "session s2: failed" in invoke(
        "sessions", "end", "s2", "--status", "failed", "--url", db_url
    )
    assert json.loads(invoke("sessions", "show", "s2", "--url", db_url, "--json"))["status"] == (
        "failed"
    )
    assert "session s2: failed" in invoke(
        "sessions", "end", "s2", "--status", "failed", "--url", db_url
    )  # ending again the same way changes nothing
    assert "s2" in fails("sessions", "end", "s2", "--status", "completed", "--url", db_url)
    assert "nope" in fails("sessions", "end", "nope", "--url", db_url)
    assert "purged 0 session(s)" in invoke("purge", "--ended-before", "2000-01-01", "--url", db_url)
    assert "purged 2 session(s)" in invoke(
        "purge", "--ended-before", "2999-01-01T00:00:00+02:00", "--url", db_url
    )
    assert json.loads(invoke("stats", "--url", db_url, "--json"))["total_sessions"] == 0
    bad = CliRunner().invoke(main, ["purge", "--ended-before", "last week", "--url", db_url])
    assert bad.exit_code == 2 and "not an ISO date" in bad.output


def test_purge_dates_are_iso_and_naive_is_utc() -> None:
    parse = _IsoDateTime().convert
    assert parse("2026-01-31", None, None) == datetime(2026, 1, 31, tzinfo=UTC)
    assert parse("2026-01-31T12:30", None, None) == datetime(2026, 1, 31, 12, 30, tzinfo=UTC)
    assert parse("2026-01-31T12:30Z", None, None) == datetime(2026, 1, 31, 12, 30, tzinfo=UTC)
    assert parse("2026-01-31T14:30+02:00", None, None) == datetime(2026, 1, 31, 12, 30, tzinfo=UTC)


def test_migrate_down_and_up_with_db_status(db_url: str) -> None:
    asyncio.run(seed(db_url))
    head = head_revision()
    assert f"current: {head}" in invoke("db", "status", "--url", db_url)
    assert "Aborted" in fails("migrate", "--revision", "0003", "--url", db_url, input="n\n")
    assert f"current: {head}" in invoke("db", "status", "--url", db_url)
    asked = invoke("migrate", "--revision", "0003", "--url", db_url, input="y\n")
    assert f"database migrated from {head} to 0003_conversation" in asked
    status = invoke("db", "status", "--url", db_url)
    assert "current: 0003_conversation" in status and f"head:    {head}" in status
    assert "behind" in status
    up = invoke("migrate", "--url", db_url)
    assert f"database migrated from 0003_conversation to {head}" in up
    assert "up to date" in invoke("db", "status", "--url", db_url)
    assert "s2" in invoke("sessions", "list", "--url", db_url)  # the rows survived
    down = invoke("migrate", "--revision", "base", "--yes", "--url", db_url)
    assert f"from {head} to base" in down
    assert "no ctxengine schema" in fails("stats", "--url", db_url)
    unknown = fails("migrate", "--revision", "0999_nope", "--url", db_url)
    assert "unknown revision '0999_nope'" in unknown and "0001_sessions" in unknown


#: Every command that works on sessions, each of which needs the schema at head.
SCHEMA_COMMANDS = (
    ["stats"],
    ["stats", "--json"],
    ["sessions", "list"],
    ["sessions", "show", "s2"],
    ["sessions", "end", "s2", "--status", "failed"],
    ["cleanup", "--max-idle", "0.000001"],
    ["purge", "--ended-before", "2999-01-01"],
)


async def stored(url: str) -> dict[str, str]:
    """The sessions' statuses as stored, and the schema revision (read without ctxengine)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(sa.text("SELECT session_id, status FROM ctx_sessions"))
            ).all()
            revision = await conn.scalar(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
    finally:
        await engine.dispose()
    return {"revision": str(revision), **{str(r[0]): str(r[1]) for r in rows}}


def test_commands_refuse_a_schema_behind_head(db_url: str) -> None:
    """A schema migrated, but not to head: one line naming both revisions, exit 1, and
    nothing read or written (no raw "no such column", no purge on the old tables)."""
    asyncio.run(seed(db_url))
    old = "0006_idle_bucket"  # before the idle_timeout column the commands read
    assert f"to {old}" in invoke("migrate", "--revision", old, "--yes", "--url", db_url)
    before = asyncio.run(stored(db_url))
    assert before == {"revision": old, "s1": "completed", "s2": "active"}
    expected = (
        f"Error: ctxengine schema at {describe_url(db_url)} is at revision {old}, "
        f"this ctxengine needs {head_revision()}; run `ctxengine migrate`"
    )
    for args in SCHEMA_COMMANDS:
        assert fails(*args, "--url", db_url) == expected, args
    assert asyncio.run(stored(db_url)) == before
    assert f"from {old} to {head_revision()}" in invoke("migrate", "--url", db_url)
    assert json.loads(invoke("stats", "--url", db_url, "--json"))["total_sessions"] == 2


def test_commands_refuse_a_schema_ahead_of_this_ctxengine(db_url: str) -> None:
    """A revision this ctxengine does not know (a newer one migrated the database)."""
    asyncio.run(seed(db_url))

    async def set_revision(revision: str) -> None:
        engine = create_async_engine(db_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    sa.text(f"UPDATE {VERSION_TABLE} SET version_num = :r"), {"r": revision}
                )
        finally:
            await engine.dispose()

    asyncio.run(set_revision("0999_future"))
    expected = (
        f"Error: ctxengine schema at {describe_url(db_url)} is at revision 0999_future, "
        f"unknown to this ctxengine (which needs {head_revision()}); upgrade ctxengine"
    )
    for args in SCHEMA_COMMANDS:
        assert fails(*args, "--url", db_url) == expected, args
    assert asyncio.run(stored(db_url)) == {
        "revision": "0999_future",
        "s1": "completed",
        "s2": "active",
    }


def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    url = f"sqlite:///{path}"
    for args in (["stats"], ["sessions", "list"], ["sessions", "show", "x"], ["cleanup"]):
        line = fails(*args, "--url", url)
        assert line == f"Error: no ctxengine schema at {url}; run `ctxengine migrate`"
    assert "current: none" in invoke("db", "status", "--url", url)
    assert not path.exists()


def test_read_only_commands_never_migrate(empty_url: str) -> None:  # noqa: F811
    for args in (["stats"], ["sessions", "list"], ["sessions", "show", "x"]):
        line = fails(*args, "--url", empty_url)
        assert "no ctxengine schema at" in line and "run `ctxengine migrate`" in line
    assert "current: none" in invoke("db", "status", "--url", empty_url)


def test_expected_errors_are_one_line(tmp_path: Path) -> None:
    assert "unsupported database URL" in fails("migrate", "--url", "mysql://h/db")
    assert "names no database" in fails("stats", "--url", "postgresql://")
    assert "names no database" in fails("--url", "sqlite://", "migrate")
    refused = fails("stats", "--url", "postgresql://postgres@127.0.0.1:1/db")
    assert "nothing accepts connections at 127.0.0.1:1" in refused
    missing_folder = tmp_path / "no" / "such" / "x.db"
    assert str(missing_folder.parent) in fails("migrate", "--url", f"sqlite:///{missing_folder}")
    assert "no ctxengine schema" in fails(
        "sessions", "list", env={"CTXENGINE_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}
    )


def test_a_missing_postgres_database_is_one_line() -> None:
    line = fails("stats", "--url", "postgresql://postgres@127.0.0.1:5432/ctx_no_such_database")
    assert "ctx_no_such_database" in line


def test_environment_url_and_python_dash_m(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    env = {"CTXENGINE_DATABASE_URL": url}
    assert "no ctxengine schema" in fails("stats", "--json", env=env)
    assert not (tmp_path / "env.db").exists()
    result = CliRunner().invoke(main, ["migrate"], env=env)
    assert result.exit_code == 0 and "to " + str(head_revision()) in result.output
    result = CliRunner().invoke(main, ["stats", "--json"], env=env)
    assert result.exit_code == 0 and json.loads(result.output)["total_sessions"] == 0
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
