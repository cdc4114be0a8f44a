"""The ``ctxengine`` command: migrate, inspect sessions, clean up, statistics, demo."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from . import __version__
from .engine import ContextEngine
from .errors import ContextEngineError
from .models import Session, SessionStatus
from .settings import EngineSettings
from .tenant import TenantView

T = TypeVar("T")

url_option = click.option(
    "--url",
    envvar="CTXENGINE_DATABASE_URL",
    default=None,
    help="Database URL (default: $CTXENGINE_DATABASE_URL, else ./ctxengine.db).",
)
tenant_option = click.option("--tenant", default="default", show_default=True)


def _run(url: str | None, tenant: str, action: Callable[[TenantView], Awaitable[T]]) -> T:
    """Open an engine (migrating, no background cleanup), run ``action`` on the tenant."""

    async def main() -> T:
        settings = EngineSettings(auto_cleanup=False)
        async with ContextEngine(url, settings=settings) as engine:
            return await action(engine.tenant(tenant))

    try:
        return asyncio.run(main())
    except ContextEngineError as exc:
        raise click.ClickException(str(exc)) from exc


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _line(session: Session) -> str:
    return (
        f"{session.session_id:<38} {session.user_id:<16} {session.status.value:<9} "
        f"{session.tier:<10} {session.request_count:>8} {session.error_count:>6} "
        f"{session.last_activity:%Y-%m-%d %H:%M:%S}"
    )


@click.group()
@click.version_option(__version__, prog_name="ctxengine")
def main() -> None:
    """ctxengine: durable session state for AI agents."""


@main.command()
@url_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def migrate(url: str | None, revision: str) -> None:
    """Bring the database schema to REVISION (safe to run from several processes)."""

    async def run() -> None:
        engine = ContextEngine(url, settings=EngineSettings(auto_migrate=False, auto_cleanup=False))
        await engine.migrate(revision)

    try:
        asyncio.run(run())
    except ContextEngineError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"database migrated to {revision}")


@main.group()
def sessions() -> None:
    """List and inspect sessions."""


@sessions.command("list")
@url_option
@tenant_option
@click.option("--user", "user_id", default=None, help="Only this user's sessions.")
@click.option("--status", type=click.Choice([s.value for s in SessionStatus]), default=None)
@click.option("--tier", default=None)
@click.option("--tag", "tags", multiple=True, help="Sessions carrying this tag (repeatable).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--cursor", default=None, help="session_id of the last row of the previous page.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_sessions(
    url: str | None,
    tenant: str,
    user_id: str | None,
    status: str | None,
    tier: str | None,
    tags: tuple[str, ...],
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List sessions, newest first."""
    found = _run(
        url,
        tenant,
        lambda view: view.list_sessions(
            user_id=user_id,
            status=status,
            tier=tier,
            tags=list(tags) or None,
            limit=limit,
            cursor=cursor,
        ),
    )
    if as_json:
        _echo_json([s.to_dict() for s in found])
        return
    click.echo(
        f"{'SESSION':<38} {'USER':<16} {'STATUS':<9} {'TIER':<10} {'REQUESTS':>8} "
        f"{'ERRORS':>6} LAST ACTIVITY (UTC)"
    )
    for session in found:
        click.echo(_line(session))
    if len(found) == limit:
        click.echo(f"more: --cursor {found[-1].session_id}")


@sessions.command("show")
@url_option
@tenant_option
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_session(url: str | None, tenant: str, session_id: str, as_json: bool) -> None:
    """Show one session."""
    session = _run(url, tenant, lambda view: view.get_session(session_id))
    if session is None:
        raise click.ClickException(f"no session {session_id!r} in tenant {tenant!r}")
    stats = _run(url, tenant, lambda view: view.get_session_stats(session_id))
    data = {**session.to_dict(), "chats": stats.chat_count, "messages": stats.total_messages}
    if as_json:
        _echo_json(data)
        return
    for key, value in data.items():
        click.echo(f"{key:>22}: {value}")


@main.command()
@url_option
@tenant_option
@click.option(
    "--max-idle",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Idle seconds before expiry (default: the session timeout).",
)
def cleanup(url: str | None, tenant: str, max_idle: float | None) -> None:
    """Expire idle sessions now."""
    expired = _run(url, tenant, lambda view: view.cleanup_inactive_sessions(max_idle))
    click.echo(f"expired {expired} session(s)")


@main.command()
@url_option
@tenant_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(url: str | None, tenant: str, as_json: bool) -> None:
    """Statistics over all sessions of the tenant."""
    statistics = _run(url, tenant, lambda view: view.get_statistics())
    data = statistics.model_dump(mode="json")
    if as_json:
        _echo_json(data)
        return
    for key, value in data.items():
        click.echo(f"{key:>26}: {value}")


@main.command()
@url_option
def demo(url: str | None) -> None:
    """Run a realistic session workload and print what happened."""
    from ._demo import run_demo

    try:
        asyncio.run(run_demo(url))
    except ContextEngineError as exc:
        raise click.ClickException(str(exc)) from exc
