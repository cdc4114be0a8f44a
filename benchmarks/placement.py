"""Where the benchmark and a local PostgreSQL run: on CPUs of their own.

On a small machine the scheduler places each server process beside the client's or
on another CPU as it pleases, and a round trip between two processes on one CPU
costs a third of one between two CPUs: a baseline whose connection happened to land
beside the client measured 22,000 reads/s, and 7,000/s a minute later on another
connection. Pinning the client to the first CPU and the server (the postmaster,
whose backends inherit its CPUs, and the backends already running) to the others
gives both sides the same placement, as a database on its own machine would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def _parent(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid …"; comm may hold spaces
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _family(root: int) -> list[int]:
    """``root`` and the processes whose parent it is."""
    found = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if _parent(int(entry.name)) == root:
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def database_apart(backend_pid: int) -> Iterator[str]:
    """Pin this process to CPU 0 and the PostgreSQL server of ``backend_pid`` (a
    server process of one of our connections) to the other CPUs, for the block;
    restored afterwards. Yields what was done, for the report (nothing is pinned
    when the server runs elsewhere, on one CPU, or without the right to)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        yield "not pinned (one CPU)"
        return
    try:
        postmaster = _parent(backend_pid)
        own, theirs = os.sched_getaffinity(0), os.sched_getaffinity(postmaster)
    except OSError:
        yield "not pinned (the server runs on another machine)"
        return
    client, server = {cpus[0]}, set(cpus[1:])
    try:
        try:
            for pid in _family(postmaster):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(pid, server)
            os.sched_setaffinity(0, client)
            done = f"client on CPU {cpus[0]}, PostgreSQL on CPU {','.join(map(str, cpus[1:]))}"
        except PermissionError:
            done = "not pinned (no permission to move the server's processes)"
        yield done
    finally:
        for pid in _family(postmaster):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, theirs)
        os.sched_setaffinity(0, own)


def _cpu_seconds(pid: int) -> float:
    """CPU seconds ``pid`` has used (the scheduler's count in ns: /proc's per-process
    clock ticks are truncated, and 64 backends each busy for less than a tick would
    count as nothing)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _reaped_cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) of the ended children ``pid`` waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after "comm": state ppid … utime(12) stime(13) cutime(14) cstime(15), 1-based
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def server_cpu(backend_pid: int) -> Callable[[], float] | None:
    """A reader of the CPU seconds the PostgreSQL server of ``backend_pid`` (a server
    process of one of our connections) has used so far: its postmaster, with the
    backends it reaped, and every process it runs now. None when the server runs
    elsewhere. A backend that ends between two readings counts with its whole life."""
    try:
        postmaster = _parent(backend_pid)
        _cpu_seconds(postmaster)
    except (OSError, ValueError, IndexError):
        return None

    def read() -> float:
        used = _reaped_cpu_seconds(postmaster)
        for pid in _family(postmaster):
            with contextlib.suppress(OSError, ValueError, IndexError):
                used += _cpu_seconds(pid)
        return used

    return read
