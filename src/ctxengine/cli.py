"""The ``ctxengine`` command: migrations, sessions, cleanup, purge, statistics, memory,
demo.

Only ``migrate`` and ``demo`` create or migrate a database; every other command needs
the schema to exist already, at the head revision of this ctxengine's migrations. An
expected error (bad URL, missing database, refused connection, a schema behind head, any
:class:`ContextEngineError`) prints one line on stderr and exits 1.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import EllipsisType
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__
from . import migrate as migrations
from .embeddings import Embedder, HashingEmbedder, MiniLMEmbedder
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


# -- memory ------------------------------------------------------------------------------
_SHOWN_TEXT = 70
_SHOWN_VALUE = 40


def _run_memory(
    tenant: str,
    action: Callable[[TenantView], Awaitable[T]],
    embedder: Embedder | None = None,
) -> T:
    """:func:`_run` with an embedder for semantic search."""
    url = _url()

    async def main() -> T:
        settings = _settings().model_copy(update={"embedder": embedder})
        await _require_schema(url, settings)
        async with ContextEngine(url, settings=settings) as engine:
            return await action(engine.tenant(tenant))

    return asyncio.run(main())


if TYPE_CHECKING:  # generic from click 8.2; click 8.1's is not subscriptable
    _SpecType = click.ParamType[Embedder, Any]
else:
    _SpecType = click.ParamType


class _EmbedderSpec(_SpecType):
    """``hashing[:DIMS]``, ``minilm``, or ``module:attribute`` naming an Embedder or a
    factory of one (a class, a function), imported from the current directory too."""

    name = "SPEC"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Embedder:
        if isinstance(value, Embedder):
            return value
        spec = str(value)
        name, _, attribute = spec.partition(":")
        try:
            if name == "hashing":
                return HashingEmbedder(int(attribute) if attribute else 256)
            if name == "minilm" and not attribute:
                return MiniLMEmbedder()
        except ValueError:
            self.fail(f"{spec!r}: hashing takes a number of dimensions (hashing:256)", param, ctx)
        if not name or not attribute:
            self.fail(f"{spec!r} is not hashing[:DIMS], minilm, or module:attribute", param, ctx)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # a module beside the command, as python -m does
        try:
            found: Any = importlib.import_module(name)
        except ImportError as exc:
            self.fail(f"{spec!r}: cannot import {name!r} ({exc})", param, ctx)
        for part in attribute.split("."):
            found = getattr(found, part, None)
            if found is None:
                self.fail(f"{spec!r}: {name!r} has no attribute {attribute!r}", param, ctx)
        if isinstance(found, type) or (callable(found) and not _is_embedder(found)):
            try:
                found = found()
            except Exception as exc:
                self.fail(f"{spec!r}: calling {attribute} failed: {exc}", param, ctx)
        if not _is_embedder(found):
            self.fail(
                f"{spec!r} is not an embedder (dimensions: int and async embed(texts))",
                param,
                ctx,
            )
        embedder: Embedder = found
        return embedder


def _is_embedder(value: object) -> bool:
    return isinstance(getattr(value, "dimensions", None), int) and callable(
        getattr(value, "embed", None)
    )


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _whose(user_id: str | None, tenant: str) -> str:
    who = "the tenant-wide scope" if user_id is None else f"user {user_id!r}"
    return f"{who} in tenant {tenant!r}"


user_option = click.option(
    "--user",
    "user_id",
    default=None,
    help="The user whose memories (their sessions' included); omitted: the tenant-wide scope.",
)


@main.group()
@url_option
def memory() -> None:
    """Look into, search, export and import what agents remember (key-value items and
    semantic memories)."""


@memory.command("list")
@url_option
@tenant_option
@user_option
@click.option("--namespace", default=None, help="Only this namespace (default: all).")
@click.option("--prefix", default=None, help="Only key-value items whose key starts so.")
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(min=1, max=1000),
    help="Rows shown of each kind.",
)
@click.option(
    "--order",
    type=click.Choice(["newest", "importance"]),
    default="newest",
    show_default=True,
    help="Semantic memories newest first, or most important first (then newest).",
)
@json_option
def memory_list(
    tenant: str,
    user_id: str | None,
    namespace: str | None,
    prefix: str | None,
    limit: int,
    order: str,
    as_json: bool,
) -> None:
    """Count and show a user's memories (reads only).

    Live key-value items and semantic memories per namespace, then the first of each
    kind: items in key order, semantic memories newest (or most important) first."""
    found = _run_memory(
        tenant,
        lambda view: view._runtime().transfer.overview(
            view.tenant_id, user_id, namespace, prefix, limit, order == "importance"
        ),
    )
    if as_json:
        _echo_json(
            {
                "tenant_id": tenant,
                "user_id": user_id,
                "namespace": namespace,
                "items": {
                    "total": sum(found.item_counts.values()),
                    "by_namespace": found.item_counts,
                    "shown": [item.to_dict() for item in found.items],
                },
                "memories": {
                    "total": sum(found.memory_counts.values()),
                    "by_namespace": found.memory_counts,
                    "shown": [record.to_dict() for record in found.memories],
                },
            }
        )
        return
    items, memories = sum(found.item_counts.values()), sum(found.memory_counts.values())
    click.echo(
        f"{_whose(user_id, tenant)}: {_plural(items, 'key-value item', 'key-value items')}, "
        f"{_plural(memories, 'semantic memory', 'semantic memories')}"
    )
    for space in sorted(found.item_counts.keys() | found.memory_counts.keys()):
        in_space = _plural(found.item_counts.get(space, 0), "item", "items")
        in_space += ", " + _plural(found.memory_counts.get(space, 0), "memory", "memories")
        click.echo(f"  namespace {space}: {in_space}")
    if found.items:
        click.echo("\nKEY-VALUE ITEMS (key order)")
        click.echo(
            f"{'NAMESPACE':<16} {'SESSION':<16} {'KEY':<24} {'VERSION':>7} "
            f"{'UPDATED (UTC)':<19} VALUE"
        )
        for item in found.items:
            value = _one_line(json.dumps(item.value, ensure_ascii=False), _SHOWN_VALUE)
            click.echo(
                f"{item.namespace:<16} {item.session_id or '-':<16} {item.key:<24} "
                f"{item.version:>7} {item.updated_at:%Y-%m-%d %H:%M:%S} {value}"
            )
        if len(found.items) < items:
            click.echo(f"showing {len(found.items)} of {items} items: --limit for more")
    if found.memories:
        click.echo(
            f"\nSEMANTIC MEMORIES ({'most important' if order == 'importance' else 'newest'} first)"
        )
        click.echo(
            f"{'NAMESPACE':<16} {'SESSION':<16} {'IMPORTANCE':>10} {'CREATED (UTC)':<19} TEXT"
        )
        for record in found.memories:
            click.echo(
                f"{record.namespace:<16} {record.session_id or '-':<16} "
                f"{record.importance:>10g} {record.created_at:%Y-%m-%d %H:%M:%S} "
                f"{_one_line(record.text, _SHOWN_TEXT)}"
            )
        if len(found.memories) < memories:
            click.echo(f"showing {len(found.memories)} of {memories} memories: --limit for more")


@memory.command("search")
@url_option
@tenant_option
@click.argument("query")
@user_option
@click.option("--namespace", default="default", show_default=True)
@click.option("--limit", default=5, show_default=True, type=click.IntRange(min=1, max=1000))
@click.option(
    "--min-score",
    type=click.FloatRange(-1, 1),
    default=None,
    help="Only memories at least this similar (cosine, -1 to 1).",
)
@click.option(
    "--embedder",
    type=_EmbedderSpec(),
    required=True,
    help="What embeds QUERY: hashing[:DIMS] (HashingEmbedder, 256 by default), minilm "
    "(MiniLMEmbedder, the extra 'embeddings'), or module:attribute naming an Embedder or "
    "a factory of one. It must be the embedder that wrote the memories: another one's "
    "vectors mean nothing to it (only a different dimension is detected).",
)
@json_option
def memory_search(
    tenant: str,
    query: str,
    user_id: str | None,
    namespace: str,
    limit: int,
    min_score: float | None,
    embedder: Embedder,
    as_json: bool,
) -> None:
    """Find the memories nearest QUERY in meaning.

    The user's semantic memories (their sessions' included) and the tenant-wide ones,
    best first, by cosine similarity. As search_memory does, it marks the memories
    found as accessed (retention keeps recently accessed ones longer)."""
    hits = _run_memory(
        tenant,
        lambda view: view.search_memory(
            query, user_id=user_id, namespace=namespace, limit=limit, min_score=min_score
        ),
        embedder,
    )
    if as_json:
        _echo_json([{"score": hit.score, **hit.record.to_dict()} for hit in hits])
        return
    if not hits:
        click.echo(f"no memories of {_whose(user_id, tenant)} in namespace {namespace!r} found")
        return
    click.echo(f"{'SCORE':>7} {'SCOPE':<24} {'IMPORTANCE':>10} {'CREATED (UTC)':<19} TEXT")
    for hit in hits:
        record = hit.record
        scope = "tenant-wide" if record.user_id is None else "user"
        if record.session_id is not None:
            scope = f"session {record.session_id}"
        click.echo(
            f"{hit.score:>7.4f} {scope:<24} "
            f"{record.importance:>10g} {record.created_at:%Y-%m-%d %H:%M:%S} "
            f"{_one_line(record.text, _SHOWN_TEXT)}"
        )


@memory.command("export")
@url_option
@tenant_option
@user_option
@click.option("--namespace", default=None, help="Only this namespace (default: all).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    default="-",
    help="The file to write (default: standard output).",
)
def memory_export(tenant: str, user_id: str | None, namespace: str | None, output: str) -> None:
    """Write a user's memories as JSON (reads only).

    Live key-value items and semantic memories with their vectors (format
    ctxengine.memories, format_version 1), for `ctxengine memory import`."""
    doc = _run_memory(tenant, lambda view: view.export_memories(user_id, namespace=namespace))
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if output == "-":
        click.echo(text, nl=False)
        return
    with click.open_file(output, "w", encoding="utf-8") as file:
        file.write(text)
    click.echo(
        f"exported {_plural(len(doc['items']), 'key-value item', 'key-value items')} and "
        f"{_plural(len(doc['memories']), 'semantic memory', 'semantic memories')} of "
        f"{_whose(user_id, tenant)} to {output}"
    )


@memory.command("import")
@url_option
@tenant_option
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option(
    "--user",
    "user_id",
    default=None,
    help="Import under this user (default: the user the export is of).",
)
def memory_import(tenant: str, file: Any, user_id: str | None) -> None:
    """Put exported memories back (idempotent).

    FILE (- for standard input) is what `ctxengine memory export` wrote; all of it is
    written in one transaction, or nothing. Items stored alike and memories already
    present are left as they are, so importing twice adds nothing."""
    try:
        doc = json.load(file)
    except ValueError as exc:
        raise click.ClickException(f"{file.name} is not JSON: {exc}") from None
    target: str | EllipsisType | None = ... if user_id is None else user_id
    result = _run_memory(tenant, lambda view: view.import_memories(doc, user_id=target))
    click.echo(
        f"imported into {_whose(result.user_id, tenant)}: "
        f"{_plural(result.items_written, 'key-value item', 'key-value items')} written "
        f"({result.items_unchanged} already stored alike), "
        f"{_plural(result.memories_added, 'semantic memory', 'semantic memories')} added "
        f"({result.memories_present} already present), {result.expired} expired since the "
        "export and skipped"
    )


@main.command()
@url_option
def demo() -> None:
    """Run a realistic session workload (creating and migrating the database) and print
    what happened."""
    from ._demo import run_demo

    asyncio.run(run_demo(_url()))
