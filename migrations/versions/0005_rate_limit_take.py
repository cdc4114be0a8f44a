"""The rate-limit rule as a PostgreSQL function, for one-statement admissions.

Revision ID: 0005_rate_limit_take
Revises: 0004_shared_state
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_rate_limit_take"
down_revision: str | None = "0004_shared_state"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ctxengine.ratelimit.decide for one admission at now_us (whole microseconds): the new
# state, or NULL when the call is refused, or when the state holds a sub-window newer
# than now_us's (the caller then decides under the row lock, reading the clock anew,
# so admissions stay in the order of their instants). Integer arithmetic throughout,
# as in Python: sub-window = floor(now_us * 60 / window_us).
TAKE = """
CREATE OR REPLACE FUNCTION ctx_rate_limit_take(
    state jsonb, now_us bigint, window_us bigint, max_calls bigint, cost bigint
) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    counts jsonb := coalesce(state -> 'c', '[]'::jsonb);
    n integer := jsonb_array_length(counts);
    newest bigint := (state ->> 'b')::bigint;
    scaled numeric := now_us::numeric * 60;
    cur bigint := div(scaled, window_us) - (CASE WHEN mod(scaled, window_us) < 0 THEN 1 ELSE 0 END);
    kept bigint[] := array_fill(0::bigint, ARRAY[61]);
    used bigint := 0;
    sub bigint;
    cnt bigint;
    first integer := 1;
BEGIN
    IF n > 0 AND newest > cur THEN
        RETURN NULL;
    END IF;
    FOR i IN 0 .. n - 1 LOOP
        sub := newest - (n - 1 - i);
        cnt := (counts ->> i)::bigint;
        IF cnt <> 0 AND sub > cur - 61 THEN
            used := used + cnt;
            kept[sub - cur + 61] := cnt;
        END IF;
    END LOOP;
    IF used + cost > max_calls THEN
        RETURN NULL;
    END IF;
    kept[61] := kept[61] + cost;
    WHILE first < 61 AND kept[first] = 0 LOOP
        first := first + 1;
    END LOOP;
    RETURN jsonb_build_object('b', cur, 'c', to_jsonb(kept[first:61]));
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(TAKE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION IF EXISTS ctx_rate_limit_take(jsonb, bigint, bigint, bigint, bigint)"
        )
