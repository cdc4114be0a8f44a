"""A PgBouncer of the tests' own, in transaction-pooling mode, in front of the test
PostgreSQL (``tests.fixtures.PG_SERVER``): the system's ``pgbouncer`` binary (Debian's
package), on a free loopback port, from a configuration in a temporary directory, run
as an unprivileged user when the tests run as root (PgBouncer refuses root).

Every database of the server is reachable through it under its own name (a fallback
``*`` entry), so a test's fresh database is too. Without the binary the fixture skips
with the reason, and fails under CI=true."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.cluster import ClusterUnavailable, _free_port, _server_user
from tests.fixtures import PG_SERVER

#: Where Debian's package installs it (not on a user's PATH).
DEBIAN_BINARY = "/usr/sbin/pgbouncer"
#: Server connections per database and user: fewer than the engines' pools together,
#: so client connections share server connections, as they do in production.
POOL_SIZE = 6


def pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found is None and os.access(DEBIAN_BINARY, os.X_OK):
        found = DEBIAN_BINARY
    return found


class PgBouncer:
    """One PgBouncer process and its temporary directory."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root
        self.port = _free_port()
        self.log = root / "pgbouncer.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, direct_url: str) -> str:
        """``direct_url`` (a database of the test server) through this PgBouncer."""
        parts = urlsplit(direct_url)
        user = parts.username or "postgres"
        return parts._replace(netloc=f"{user}@127.0.0.1:{self.port}").geturl()

    def start(self) -> None:
        server = urlsplit(PG_SERVER)
        user = server.username or "postgres"
        (self.root / "users.txt").write_text(f'"{user}" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            f"""[databases]
* = host={server.hostname or "127.0.0.1"} port={server.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.root / "users.txt"}
admin_users = {user}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 400
logfile = {self.log}
pidfile = {self.root / "pgbouncer.pid"}
"""
        )
        owner = _server_user()
        if owner is not None:
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._proc = subprocess.Popen(
            [self.binary, str(self.root / "pgbouncer.ini")],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            user=None if owner is None else owner.pw_uid,
            group=None if owner is None else owner.pw_gid,
            extra_groups=None if owner is None else [],
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited ({self._proc.returncode}):\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError(f"pgbouncer did not listen within 30 s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_pgbouncer() -> Iterator[PgBouncer]:
    """A started PgBouncer for a fixture, stopped afterwards; without one the test
    skips with the reason, or fails under CI=true."""
    binary = pgbouncer_binary()
    reason = None
    if binary is None:
        reason = (
            f"no pgbouncer binary on PATH or at {DEBIAN_BINARY} (Debian: apt install pgbouncer)"
        )
    else:
        try:
            _server_user()
        except ClusterUnavailable as exc:
            reason = str(exc)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PgBouncer is required under CI: {reason}")
        pytest.skip(f"no PgBouncer: {reason}; set CI=true to require it")
    assert binary is not None
    bouncer = PgBouncer(binary, Path(tempfile.mkdtemp(prefix="ctx_pgbouncer_")))
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[PgBouncer]:
    """PgBouncer in transaction-pooling mode in front of the test server."""
    with running_pgbouncer() as bouncer:
        yield bouncer
