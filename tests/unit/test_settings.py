"""EngineSettings: types, validation, environment variables, typing without the plugin."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ctxengine import ContextEngine, EngineSettings
from ctxengine.errors import StorageError, ValidationError
from tests.fixtures import db_url  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def test_session_timeout_none_means_never() -> None:
    assert EngineSettings(session_timeout=None).session_timeout is None
    assert EngineSettings(session_timeout=5).session_timeout == 5.0


def test_an_unknown_name_is_refused_naming_it() -> None:
    with pytest.raises(
        ValidationError, match=r"session_timout.*did you mean 'session_timeout'"
    ) as e:
        EngineSettings(session_timout=5)  # type: ignore[call-arg]
    assert e.value.field == "session_timout"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"session_timeout": 0}, "session_timeout"),
        ({"session_timeout": float("nan")}, "session_timeout"),
        ({"cleanup_interval": "soon"}, "cleanup_interval"),
        ({"max_messages_per_chat": 0}, "max_messages_per_chat"),
        ({"history_overflow": "drop"}, "history_overflow"),
        ({"redact_patterns": ("(",)}, "redact_patterns"),
    ],
)
def test_bad_values_are_refused(values: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field) as e:
        EngineSettings(**values)  # type: ignore[arg-type]
    assert e.value.field == field


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTXENGINE_SOME_TOOL_SETTING", "not a setting")  # ignored, not an error
    monkeypatch.setenv("CTXENGINE_DATABASE_URL", "sqlite:///from-env.db")
    monkeypatch.setenv("CTXENGINE_SESSION_TIMEOUT", "12.5")
    settings = EngineSettings()
    assert settings.database_url == "sqlite:///from-env.db"
    assert settings.session_timeout == 12.5
    monkeypatch.setenv("CTXENGINE_SESSION_TIMEOUT", "none")  # None from the environment
    monkeypatch.setenv("CTXENGINE_STATEMENT_TIMEOUT", "none")
    settings = EngineSettings()
    assert settings.session_timeout is None and settings.statement_timeout is None
    monkeypatch.setenv("CTXENGINE_SESSION_TIMEOUT", "-1")
    with pytest.raises(ValidationError, match="session_timeout"):
        EngineSettings()


def test_user_code_type_checks_without_the_pydantic_plugin(tmp_path: Path) -> None:
    user = tmp_path / "user_code.py"
    user.write_text(
        "from ctxengine import ContextEngine, EngineSettings\n"
        "settings = EngineSettings(session_timeout=5)\n"
        "never = EngineSettings(session_timeout=None, database_url='sqlite:///x.db')\n"
        "engine = ContextEngine(settings=settings)\n"
    )
    config = ROOT / ".ci" / "mypy-no-plugin.ini"
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), str(user)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout
    user.write_text("from ctxengine import EngineSettings\nEngineSettings(session_timout=5)\n")
    typo = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), str(user)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert typo.returncode == 1 and "session_timout" in typo.stdout


async def test_database_url_is_the_default_url(
    db_url: str,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quiet = {"auto_cleanup": False, "auto_migrate": False}
    async with ContextEngine(settings=EngineSettings(database_url=db_url, **quiet)) as engine:
        assert (await engine.health_check())["backend"] in db_url
        await engine.create_session("s", "u")
    monkeypatch.setenv("CTXENGINE_DATABASE_URL", db_url)
    async with ContextEngine(settings=EngineSettings(**quiet)) as engine:
        assert await engine.get_session("s") is not None


@pytest.mark.parametrize(
    "url", ["postgresql://", "postgresql+asyncpg://host/", "sqlite://", "sqlite+aiosqlite:///"]
)
def test_a_url_naming_no_database_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="names no database") as e:
        ContextEngine(url)
    assert e.value.field == "url"


async def test_an_sqlite_file_in_a_missing_folder_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "folder" / "ctx.db"
    engine = ContextEngine(f"sqlite:///{path}", settings=EngineSettings(auto_cleanup=False))
    with pytest.raises(
        StorageError, match=re.escape(f"{path}: the folder {path.parent} does not exist")
    ):
        await engine.initialize()
    assert not path.parent.exists()
