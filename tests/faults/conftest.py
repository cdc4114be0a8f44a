from tests.fixtures import clock, db_url, engine, pg_admin, pg_url  # noqa: F401
