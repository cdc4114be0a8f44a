"""The one statements of the hot paths on PostgreSQL, written by hand for the raw driver.

Each does the work of one ctxengine call in one round trip, as the engine's own
statement does (the same tables, rows, guards, and returned columns), written the way
a user of bare asyncpg would write it. They are the floors under the operations that
are one statement on PostgreSQL: run by asyncpg with nothing of ctxengine around them,
they say what a call costs before ctxengine does anything. They are text, not the
engine's statements: the harness uses the public API only (see docs/performance.md,
"How the benchmarks reach the engine"); when the engine's statements change, these
are updated by hand.

Parameters are ``:name``; :func:`positional` turns a statement into asyncpg's ``$n``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: A guarded touch of an active session: the session exists, is active, not idle past
#: its deadline and not past ``expires_at`` (parameters ``tenant``, ``sid``, ``now``,
#: ``now_epoch``).
_GUARD = """
    s.tenant_id = :tenant AND s.session_id = :sid AND s.status = 'active'
    AND (s.idle_deadline IS NULL OR s.idle_deadline >= :now_epoch::float8)
    AND (s.expires_at IS NULL OR s.expires_at > :now::timestamptz)"""

#: update_session(increment_requests=True): the counters and the activity of the
#: session, the session returned with the count of its live leases.
RECORD_ACTIVE = f"""
UPDATE ctx_sessions AS s SET
    last_activity = :now::timestamptz,
    request_count = s.request_count + :requests::bigint,
    error_count = s.error_count + :errors::bigint,
    total_processing_time = s.total_processing_time + :processing_time::float8,
    idle_deadline = :now_epoch::float8 + s.idle_timeout
WHERE {_GUARD}
RETURNING s.tenant_id, s.session_id, s.user_id, s.tier, s.status, s.name, s.metadata,
    s.tags, s.preferences, s.created_at, s.last_activity, s.ended_at, s.expires_at,
    s.request_count, s.error_count, s.total_processing_time, s.current_chat_id,
    s.chat_count, s.idle_timeout,
    (SELECT count(*) FROM ctx_leases AS l
     WHERE l.tenant_id = :tenant AND l.session_id = :sid
       AND l.expires_at > :now::timestamptz
       AND l.expires_at <= :horizon::timestamptz) AS concurrent_operations
"""

#: add_message to the session's current chat: the session touched, the chat's next
#: seq and count taken (if it has room), the message inserted.
APPEND = f"""
WITH touched AS (
    UPDATE ctx_sessions AS s SET
        last_activity = :now::timestamptz,
        idle_deadline = :now_epoch::float8 + s.idle_timeout
    WHERE {_GUARD}
      AND EXISTS (
        SELECT 1 FROM ctx_chats AS c
        WHERE c.tenant_id = s.tenant_id AND c.session_id = s.session_id
          AND c.chat_id = s.current_chat_id
          AND (c.max_messages IS NULL OR c.message_count + 1 <= c.max_messages))
    RETURNING s.user_id, s.current_chat_id AS chat_id
), taken AS (
    UPDATE ctx_chats AS c SET next_seq = c.next_seq + 1, message_count = c.message_count + 1
    FROM touched
    WHERE c.tenant_id = :tenant AND c.session_id = :sid AND c.chat_id = touched.chat_id
      AND (c.max_messages IS NULL OR c.message_count + 1 <= c.max_messages)
    RETURNING c.chat_id, c.next_seq, c.message_count, c.max_messages
), added AS (
    INSERT INTO ctx_messages (tenant_id, session_id, chat_id, seq, message_id, role,
                              content, metadata, tokens, created_at)
    SELECT :tenant, :sid, taken.chat_id, taken.next_seq, :message_id, :role,
           :content, :metadata::jsonb, :tokens::bigint, :now::timestamptz
    FROM taken
)
SELECT touched.user_id, taken.chat_id, taken.next_seq, taken.message_count,
       taken.max_messages
FROM touched LEFT JOIN taken ON true
"""

#: enforce_rate_limit: the rule that applies (the session's, else its user's, else the
#: tier's), one call taken from the limiter state by ``ctx_rate_limit_take`` (the
#: database function the engine's migration creates), the state written and the
#: session touched, only if the call is admitted (the new row's state written out, the
#: locked row's evaluated once: refused there, the statement divides by zero).
TAKE = f"""
WITH lim AS (
    SELECT coalesce(r.scope, 'session') AS scope,
           CASE WHEN r.scope = 'user' THEN s.user_id ELSE s.session_id END AS subject,
           coalesce(r.max_calls, :tier_max_calls::bigint) AS max_calls,
           coalesce(r.window_seconds, :tier_window::float8) AS window_seconds,
           CAST(round(coalesce(r.window_seconds, :tier_window::float8) * 1000) AS bigint)
               AS window_ms,
           greatest(CAST(round(coalesce(r.window_seconds, :tier_window::float8) * 1000000)
               AS bigint), 1) AS window_us
    FROM ctx_sessions AS s
    LEFT JOIN LATERAL (
        SELECT r.scope, r.max_calls, r.window_seconds FROM ctx_rate_limit_rules AS r
        WHERE r.tenant_id = s.tenant_id AND r.operation = :operation
          AND (r.scope = 'session' AND r.subject = s.session_id
               OR r.scope = 'user' AND r.subject = s.user_id)
        ORDER BY r.scope LIMIT 1
    ) AS r ON true
    WHERE s.tenant_id = :tenant AND s.session_id = :sid
), admitted AS (
    SELECT lim.* FROM lim
    WHERE lim.max_calls IS NULL OR ctx_rate_limit_take(
        (SELECT st.state FROM ctx_rate_limit_state AS st
         WHERE st.tenant_id = :tenant AND st.scope = lim.scope AND st.subject = lim.subject
           AND st.operation = :operation AND st.window_ms = lim.window_ms),
        :now_us::bigint, lim.window_us, lim.max_calls, :cost::bigint) IS NOT NULL
), touched AS (
    UPDATE ctx_sessions AS s SET
        last_activity = :now::timestamptz,
        idle_deadline = :now_epoch::float8 + s.idle_timeout
    WHERE {_GUARD} AND EXISTS (SELECT 1 FROM admitted)
    RETURNING s.session_id
), written AS (
    INSERT INTO ctx_rate_limit_state AS st
        (tenant_id, scope, subject, operation, window_ms, state, updated_at)
    SELECT :tenant, a.scope, a.subject, :operation, a.window_ms,
           jsonb_build_object('b', div(:now_us::numeric * 60, a.window_us),
                              'c', jsonb_build_array(:cost::bigint)),
           :now::timestamptz
    FROM admitted AS a JOIN touched ON true
    WHERE a.max_calls IS NOT NULL
    ON CONFLICT (tenant_id, scope, subject, operation, window_ms) DO UPDATE SET
        state = coalesce(ctx_rate_limit_take(st.state, :now_us::bigint,
            (SELECT window_us FROM admitted), (SELECT max_calls FROM admitted),
            :cost::bigint), to_jsonb(1 / (st.window_ms - st.window_ms))),
        updated_at = excluded.updated_at
    RETURNING st.state
)
SELECT written.state, admitted.max_calls, admitted.window_seconds
FROM touched LEFT JOIN written ON true, admitted
"""

_NAME = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")


class Positional:
    """A statement with ``:name`` parameters as asyncpg's ``$n``, and the order of
    the values."""

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.sql = _NAME.sub(number, sql)
        self.names = tuple(names)

    def values(self, params: Mapping[str, Any]) -> list[Any]:
        """The values of ``params`` in the order of the ``$n``."""
        return [params[name] for name in self.names]


def positional(sql: str) -> Positional:
    return Positional(sql)
