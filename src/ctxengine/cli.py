"""The ``ctxengine`` command: migrations, sessions, cleanup, purge, statistics, demo.

Only ``migrate`` and ``demo`` create or migrate a database; every other command needs
the schema to exist already, at the head revision of this ctxengine's migrations. An
expected error (bad URL, missing database, refused connection, a schema behind head, any
:class:`ContextEngineError`) prints one line on stderr and exits 1.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from . import __version__
from . import migrate as migrations
from .engine import ContextEngine
from .errors import ContextEngineError
from .lifecycle import END_STATUSES
from .models import Session, SessionStatus
from .settings import EngineSettings
from .storage import describe_url, open_store, resolve_url
from .tenant import TenantView

T = TypeVar("T")


@dataclass
class _Options:
    """What the group options set for the subcommands."""

    url: str | None = None


def _remember_url(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    # On the group and on the subcommand alike; the one given last wins.
    if value is not None:
        ctx.ensure_object(_Options).url = value


url_option = click.option(
    "--url",
    default=None,
    expose_value=False,
    callback=_remember_url,
    help="Database URL (default: $CTXENGINE_DATABASE_URL, else ./ctxengine.db).",
)
tenant_option = click.option("--tenant", default="default", show_default=True)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _url() -> str | None:
    options = click.get_current_context().find_object(_Options)
    return None if options is None else options.url


def _settings() -> EngineSettings:
    """Settings for a command: no background cleanup, no migration."""
    return EngineSettings(auto_cleanup=False, auto_migrate=False)


async def _require_schema(url: str | None, settings: EngineSettings) -> None:
    """Refuse (one line, exit 1) unless the database holds the ctxengine schema at the
    scripts' head revision; reads the revision only, so nothing is created or migrated."""
    current = await migrations.schema_revision(url, settings)
    head = migrations.head_revision()
    if current == head:
        return
    where = describe_url(resolve_url(url, settings))
    if current is None:
        raise click.ClickException(f"no ctxengine schema at {where}; run `ctxengine migrate`")
    try:
        migrations.resolve_revision(current)
    except ContextEngineError:
        raise click.ClickException(
            f"ctxengine schema at {where} is at revision {current}, unknown to this "
            f"ctxengine (which needs {head}); upgrade ctxengine"
        ) from None
    raise click.ClickException(
        f"ctxengine schema at {where} is at revision {current}, this ctxengine needs {head}; "
        "run `ctxengine migrate`"
    )


def _run(tenant: str, action: Callable[[TenantView], Awaitable[T]]) -> T:
    """Run ``action`` on the tenant of the database, which must hold the ctxengine schema
    at head (checked before an engine opens, so nothing is created or migrated)."""
    url = _url()

    async def main() -> T:
        settings = _settings()
        await _require_schema(url, settings)
        async with ContextEngine(url, settings=settings) as engine:
            return await action(engine.tenant(tenant))

    return asyncio.run(main())


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _line(session: Session) -> str:
    return (
        f"{session.session_id:<38} {session.user_id:<16} {session.status.value:<9} "
        f"{session.tier:<10} {session.request_count:>8} {session.error_count:>6} "
        f"{session.last_activity:%Y-%m-%d %H:%M:%S}"
    )


def _revision(revision: str | None) -> str:
    return revision or "base"


class _Main(click.Group):
    """The root group: a library error becomes one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ContextEngineError as exc:
            message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise click.ClickException(message) from exc


class _IsoDateTime(click.DateTime):
    """An ISO 8601 date or date-time (``datetime.fromisoformat``); naive values are UTC."""

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        try:
            parsed = value if isinstance(value, datetime) else datetime.fromisoformat(value)
        except ValueError:
            self.fail(
                f"{value!r} is not an ISO date or date-time (2026-01-31[T12:00[+02:00]])",
                param,
                ctx,
            )
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@click.group(cls=_Main)
@click.version_option(__version__, prog_name="ctxengine")
@url_option
@click.pass_context
def main(ctx: click.Context) -> None:
    """ctxengine: durable session state for AI agents."""
    ctx.ensure_object(_Options)


@main.command()
@url_option
@click.option(
    "--revision",
    default="head",
    show_default=True,
    help="Target revision: head, base, or a revision id (or a unique prefix of one).",
)
@click.option("--yes", is_flag=True, help="Downgrade without asking.")
def migrate(revision: str, yes: bool) -> None:
    """Move the database schema to REVISION, up or down (safe from several processes)."""
    target = migrations.resolve_revision(revision)
    url = _url()

    async def run() -> str:
        settings = _settings()
        # no statement timeout: migrating a large table may take longer than a call
        store = open_store(url, settings.model_copy(update={"statement_timeout": None}))
        try:
            current = await migrations.current_revision(store)
            if current == target:
                return f"database already at {_revision(target)}"
            down = migrations.is_downgrade(current, target)
            if down and not yes:
                click.confirm(
                    f"Downgrade from {_revision(current)} to {_revision(target)}? "
                    "The data of the dropped tables and columns is lost",
                    abort=True,
                )
            before = await migrations.migrate(
                store, _revision(target), down=down, settings=settings
            )
        finally:
            await store.dispose()
        return f"database migrated from {_revision(before)} to {_revision(target)}"

    click.echo(asyncio.run(run()))


@main.group()
@url_option
def db() -> None:
    """The database schema."""


@db.command("status")
@url_option
def db_status() -> None:
    """The schema revision of the database and the newest one (head); creates nothing."""
    current = asyncio.run(migrations.schema_revision(_url(), _settings()))
    head = migrations.head_revision()
    click.echo(f"current: {current or 'none (no ctxengine schema)'}")
    click.echo(f"head:    {head}")
    click.echo("up to date" if current == head else "behind: run `ctxengine migrate`")


@main.group()
@url_option
def sessions() -> None:
    """List, inspect and end sessions."""


@sessions.command("list")
@url_option
@tenant_option
@click.option("--user", "user_id", default=None, help="Only this user's sessions.")
@click.option("--status", type=click.Choice([s.value for s in SessionStatus]), default=None)
@click.option("--tier", default=None)
@click.option("--tag", "tags", multiple=True, help="Sessions carrying this tag (repeatable).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--cursor", default=None, help="session_id of the last row of the previous page.")
@json_option
def list_sessions(
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
@json_option
def show_session(tenant: str, session_id: str, as_json: bool) -> None:
    """Show one session."""

    async def read(view: TenantView) -> dict[str, Any] | None:
        session = await view.get_session(session_id)
        if session is None:
            return None
        stats = await view.get_session_stats(session_id)
        return {**session.to_dict(), "chats": stats.chat_count, "messages": stats.total_messages}

    data = _run(tenant, read)
    if data is None:
        raise click.ClickException(f"no session {session_id!r} in tenant {tenant!r}")
    if as_json:
        _echo_json(data)
        return
    for key, value in data.items():
        click.echo(f"{key:>22}: {value}")


@sessions.command("end")
@url_option
@tenant_option
@click.argument("session_id")
@click.option(
    "--status",
    type=click.Choice(sorted(s.value for s in END_STATUSES)),
    default=SessionStatus.COMPLETED.value,
    show_default=True,
)
def end_session(tenant: str, session_id: str, status: str) -> None:
    """End a session (its final status)."""
    ended = _run(tenant, lambda view: view.end_session(session_id, status))
    click.echo(f"session {ended.session_id}: {ended.status.value}")


@main.command()
@url_option
@tenant_option
@click.option(
    "--max-idle",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Idle seconds before expiry (default: each session's own idle timeout).",
)
def cleanup(tenant: str, max_idle: float | None) -> None:
    """Expire idle sessions now."""
    expired = _run(tenant, lambda view: view.cleanup_inactive_sessions(max_idle))
    click.echo(f"expired {expired} session(s)")


@main.command()
@url_option
@tenant_option
@click.option(
    "--ended-before",
    type=_IsoDateTime(),
    metavar="DATE",
    required=True,
    help="Delete sessions that ended before this ISO date or date-time (naive = UTC).",
)
def purge(tenant: str, ended_before: datetime) -> None:
    """Delete ended sessions (completed, failed, expired) and everything they hold."""
    deleted = _run(tenant, lambda view: view.purge_sessions(ended_before=ended_before))
    click.echo(f"purged {deleted} session(s) ended before {ended_before.isoformat()}")


@main.command()
@url_option
@tenant_option
@json_option
def stats(tenant: str, as_json: bool) -> None:
    """Statistics over all sessions of the tenant."""
    statistics = _run(tenant, lambda view: view.get_statistics())
    data = statistics.model_dump(mode="json")
    if as_json:
        _echo_json(data)
        return
    for key, value in data.items():
        click.echo(f"{key:>26}: {value}")


@main.command()
@url_option
def demo() -> None:
    """Run a realistic session workload (creating and migrating the database) and print
    what happened."""
    from ._demo import run_demo

    asyncio.run(run_demo(_url()))
