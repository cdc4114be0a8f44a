"""Semantic memory: pgvector's copy of each vector, where the server offers pgvector.

On PostgreSQL whose server has the extension ``vector`` (``pg_available_extensions``)
this creates it, adds ``ctx_memories.embedding_vector`` (``vector``, any dimension),
fills it from the stored float32 blobs, and keeps it filled: ctxengine writes it with
each memory, and a trigger fills it for any other writer (decoding the blob in SQL,
about 0.5 ms a row). HNSW indexes, one per dimension, are then created by hand
(docs/howto/pgvector.md); searches use one when it exists. Without pgvector (or
without the privilege to create the extension: a notice says so), and on SQLite,
nothing changes and searches stay exact.

On every PostgreSQL, ctx_memories keeps a fifth of each page free (``FILLFACTOR``).

The block is idempotent: docs/howto/pgvector.md runs it again on a database migrated
before pgvector was installed on its server.

Revision ID: 0011_memory_vectors
Revises: 0010_memory_source
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011_memory_vectors"
down_revision: str | None = "0010_memory_source"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Run as one statement (offline ``--sql`` prints it as it is).
PGVECTOR = r"""
DO $ctx$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'vector') THEN
    RETURN;
  END IF;
  BEGIN
    CREATE EXTENSION IF NOT EXISTS vector;
  EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'ctxengine: no privilege to create the extension vector: semantic '
      'search stays exact (docs/howto/pgvector.md)';
    RETURN;
  END;
  ALTER TABLE ctx_memories ADD COLUMN IF NOT EXISTS embedding_vector vector;
  -- little-endian float32s (length/4 of them) as a vector, bit for bit
  CREATE OR REPLACE FUNCTION ctx_memory_vector(blob bytea) RETURNS vector
  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path FROM CURRENT AS $f$
    SELECT array_agg(
      (CASE WHEN e = 0 THEN m * 2.0::float8 ^ (-149)
            ELSE (8388608 + m) * 2.0::float8 ^ (e - 150) END
       * CASE WHEN hi >= 128 THEN -1 ELSE 1 END)::real ORDER BY i)::vector
    FROM (SELECT i, get_byte(blob, 4 * i + 3) AS hi,
            (get_byte(blob, 4 * i + 3) & 127) * 2 + (get_byte(blob, 4 * i + 2) >> 7) AS e,
            ((get_byte(blob, 4 * i + 2) & 127) << 16) | (get_byte(blob, 4 * i + 1) << 8)
              | get_byte(blob, 4 * i) AS m
          FROM generate_series(0, length(blob) / 4 - 1) AS i) AS floats
  $f$;
  CREATE OR REPLACE FUNCTION ctx_memories_fill_vector() RETURNS trigger
  LANGUAGE plpgsql SET search_path FROM CURRENT AS $f$
  BEGIN
    IF NEW.embedding_vector IS NULL
       OR (TG_OP = 'UPDATE' AND NEW.embedding IS DISTINCT FROM OLD.embedding
           AND NEW.embedding_vector IS NOT DISTINCT FROM OLD.embedding_vector) THEN
      NEW.embedding_vector := ctx_memory_vector(NEW.embedding);
    END IF;
    RETURN NEW;
  END
  $f$;
  DROP TRIGGER IF EXISTS ctx_memories_fill_vector ON ctx_memories;
  CREATE TRIGGER ctx_memories_fill_vector
    BEFORE INSERT OR UPDATE OF embedding, embedding_vector ON ctx_memories
    FOR EACH ROW EXECUTE FUNCTION ctx_memories_fill_vector();
  UPDATE ctx_memories SET embedding_vector = ctx_memory_vector(embedding)
    WHERE embedding_vector IS NULL;
END
$ctx$
"""


#: A search stamps its hits' last_accessed_at: with a fifth of each page kept free the
#: new row version fits beside the old (a HOT update), writing no index entry (an
#: HNSW entry costs about as much as a search). Measured, 2,000 memories, pages full:
#: 54 % of the stamps HOT, the stamp 6.3 ms; at 80: 80 %, 2.5 ms.
FILLFACTOR = "ALTER TABLE ctx_memories SET (fillfactor = 80)"


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(FILLFACTOR)
        op.execute(PGVECTOR)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        # the HNSW indexes on the column go with it; the extension stays (others may use it)
        op.execute("DROP TRIGGER IF EXISTS ctx_memories_fill_vector ON ctx_memories")
        op.execute("DROP FUNCTION IF EXISTS ctx_memories_fill_vector()")
        op.execute("DROP FUNCTION IF EXISTS ctx_memory_vector(bytea)")
        op.execute("ALTER TABLE ctx_memories DROP COLUMN IF EXISTS embedding_vector")
        op.execute("ALTER TABLE ctx_memories RESET (fillfactor)")
