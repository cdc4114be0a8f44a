"""The public surface and the built wheel."""

from __future__ import annotations

import email
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import ctxengine

ROOT = Path(__file__).resolve().parents[2]


def test_public_names_are_pinned() -> None:
    assert sorted(ctxengine.__all__) == sorted(
        [
            "ContextEngine",
            "EngineSettings",
            "TierPolicy",
            "Session",
            "SessionStatus",
            "Chat",
            "Message",
            "Checkpoint",
            "UsageRecord",
            "QuotaType",
            "RateLimitType",
            "QuotaStatus",
            "RateLimitStatus",
            "Statistics",
            "UserAnalytics",
            "SessionStats",
            "Event",
            "SessionTemplate",
            "MemoryHit",
            "MemoryItem",
            "MemoryRecord",
        ]
    )
    for name in ctxengine.__all__:
        assert getattr(ctxengine, name) is not None


def test_optional_integrations_are_not_imported() -> None:
    code = (
        "import sys, ctxengine; "
        "bad = [m for m in ('google.adk', 'agents', 'opentelemetry', 'prometheus_client') "
        "if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_wheel_ships_migrations_and_types(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("ctxengine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ctxengine/py.typed" in names
    assert "ctxengine/_migrations/env.py" in names
    assert "ctxengine/_migrations/script.py.mako" in names
    assert any(n.startswith("ctxengine/_migrations/versions/0001_") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ctxengine = ctxengine.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    license_file = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    shipped = zipfile.ZipFile(wheel).read(license_file).decode()
    assert shipped == (ROOT / "LICENSE").read_text()
    assert shipped.startswith("MIT License") and "2026 ctxengine developers" in shipped
    metadata_file = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(zipfile.ZipFile(wheel).read(metadata_file))
    assert metadata["License-Expression"] == "MIT"
    classifiers = metadata.get_all("Classifier")
    for minor in (11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL"))
    assert {"Homepage", "Repository", "Issues", "Changelog"} <= set(urls)


def test_the_library_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("ctxengine").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
