"""Sessions, usage and conversation tests also run through the blocking facade
(tests/blocking.py says which, and how)."""

from tests.blocking import api, engine, pytest_generate_tests  # noqa: F401
