from tests.fixtures import clock, db_url, engine, pg_admin  # noqa: F401
