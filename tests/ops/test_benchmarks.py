"""The benchmark harness runs (at a tiny size; speed is measured, never asserted)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fixtures import PG_SERVER

ROOT = Path(__file__).resolve().parents[2]


def test_the_harness_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--backend",
            "sqlite",
            "--n",
            "5",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    results = json.loads(out.read_text())
    operations = {row["operation"] for row in results["sqlite"]}
    assert {
        "update_session",
        "get_session",
        "create_session",
        "track_usage",
        "enforce_rate_limit",
        "add_message",
        "get_messages last 50 of 1000",
        "openai add_items",
        "1-statement unit of work",
        "update_session, 16 tasks",
        "raw 3-statement transaction",
        "1000 Message objects, no I/O",
        "adk append_event",
    } <= operations
    assert all(row["ratio"] > 0 for row in results["sqlite"])


async def test_the_harness_runs_on_postgresql_and_filters(tmp_path: Path, pg_admin: Any) -> None:
    """``--only`` keeps the operations named so; on PostgreSQL the harness also measures
    the one statements of update_session, enforce_rate_limit and add_message run by
    the raw driver (``pg_admin``: skipped without a server, failed under CI)."""
    out = tmp_path / "results.json"
    await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--backend",
            "postgres",
            "--n",
            "5",
            "--repeats",
            "1",
            "--only",
            "statement, raw",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env={**os.environ, "CTXENGINE_BENCH_PG_URL": PG_SERVER},
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = json.loads(out.read_text())["postgres"]
    assert [(row["operation"], row["baseline"]) for row in rows] == [
        ("update's statement, raw", "raw UPDATE by key"),
        ("rate limit's statement, raw", "raw UPDATE by key"),
        ("add_message's statement, raw", "raw INSERT"),
        ("add_message's statement, raw", "OpenAI SQLAlchemySession"),
        ("update's statement, raw, 16 tasks", "raw UPDATE, 16 tasks"),
    ]
    assert all(row["ratio"] > 0 for row in rows)


def test_the_migration_benchmark_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.migration", "--sessions", "50", "--backend", "sqlite"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "-> head on 50 sessions" in done.stdout


def test_the_adk_memory_benchmark_runs() -> None:
    """ADK's memory services and ctxengine's side by side, at their smallest (SQLite,
    HashingEmbedder, one timed pass)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.adk_memory",
            "--backend",
            "sqlite",
            "--embedders",
            "hashing",
            "--rounds",
            "1",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| ADK InMemoryMemoryService",
        "| ADK SqliteMemoryService (FTS5, file)",
        "| ctxengine, SQLite, HashingEmbedder",
    ]


def test_the_semantic_search_benchmark_runs() -> None:
    """benchmarks/memory.py at its smallest on SQLite: exact search beside the raw
    driver, and sqlite-vec's where this Python loads it."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.memory",
            "--backend",
            "sqlite",
            "--memories",
            "30",
            "--indexed",
            "60",
            "--dimensions",
            "8",
            "--searches",
            "2",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "exact, 30 x 8" in done.stdout and "raw driver + numpy" in done.stdout
    assert "sqlite-vec" in done.stdout


def test_the_context_window_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/context.py at a tiny size on SQLite: get_context beside the raw driver,
    compaction, and the window after it."""
    out = tmp_path / "context.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.context",
            "--backend",
            "sqlite",
            "--messages",
            "300",
            "--n",
            "5",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    results = json.loads(out.read_text())["sqlite"]
    assert {"ctxengine", "raw"} <= set(results["get_context(max_tokens=4000)"])
    assert results["window"]["tokens"] <= 4000
    assert results["get_context after compaction"]["n"] == 5
