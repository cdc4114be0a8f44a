"""The blocking facade has the async API's surface: every public member of
``ctxengine.ContextEngine`` and of its tenant views has a blocking twin with the same
parameters (names, kinds, defaults, annotations) and the blocking form of its return
type; the generated twins are up to date; and mypy --strict accepts user code of it."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

import ctxengine
from ctxengine import sync
from ctxengine import tenant as aio_tenant

ROOT = Path(__file__).resolve().parents[2]

PAIRS = [
    pytest.param(ctxengine.ContextEngine, sync.ContextEngine, id="ContextEngine"),
    pytest.param(aio_tenant.TenantView, sync.TenantView, id="TenantView"),
]

#: The async return annotation -> the blocking one (the names of the classes that
#: differ are the same: EventStream, TenantView).
BLOCKING_RETURNS = {
    "AsyncIterator[": "Iterator[",
    "AbstractAsyncContextManager[": "AbstractContextManager[",
}


def public(cls: type) -> dict[str, Any]:
    return {
        name: inspect.getattr_static(cls, name) for name in dir(cls) if not name.startswith("_")
    }


def blocking_return(annotation: Any) -> Any:
    if not isinstance(annotation, str):
        return annotation
    for async_form, blocking_form in BLOCKING_RETURNS.items():
        if annotation.startswith(async_form):
            return blocking_form + annotation.removeprefix(async_form)
    return annotation


def parameters(signature: inspect.Signature) -> list[tuple[str, Any, Any, Any]]:
    return [(p.name, p.kind, p.default, p.annotation) for p in signature.parameters.values()]


def assert_twins(name: str, async_fn: Any, blocking_fn: Any) -> None:
    mine, theirs = inspect.signature(blocking_fn), inspect.signature(async_fn)
    assert parameters(mine) == parameters(theirs), f"{name}: parameters differ"
    assert mine.return_annotation == blocking_return(theirs.return_annotation), name


@pytest.mark.parametrize(("async_cls", "blocking_cls"), PAIRS)
def test_every_public_member_has_its_blocking_twin(async_cls: type, blocking_cls: type) -> None:
    async_members, blocking_members = public(async_cls), public(blocking_cls)
    missing = sorted(set(async_members) - set(blocking_members))
    assert not missing, f"the blocking facade lacks {missing}: run `python tools/gen_sync.py`"
    extra = set(blocking_members) - set(async_members)
    # the async engine's settings are an attribute of the instance
    assert extra == ({"settings"} if async_cls is ctxengine.ContextEngine else set())
    for name, member in async_members.items():
        twin = blocking_members[name]
        if isinstance(member, property):
            assert isinstance(twin, property), name
            continue
        assert inspect.isfunction(member) and inspect.isfunction(twin), name
        assert not inspect.iscoroutinefunction(twin), f"{name} must not be a coroutine"
        assert not inspect.isasyncgenfunction(twin), f"{name} must not be an async generator"
        assert twin.__doc__, f"{name} has no docstring"
        if member.__name__ != name:  # an alias: the twin aliases the same member
            assert twin.__name__ == member.__name__, name
        assert_twins(name, member, twin)
        overloads = typing.get_overloads(member)
        blocking_overloads = typing.get_overloads(twin)
        assert len(overloads) == len(blocking_overloads), f"{name}: overloads differ"
        for async_overload, blocking_overload in zip(overloads, blocking_overloads, strict=True):
            assert_twins(name, async_overload, blocking_overload)


def test_the_constructor_and_the_lifecycle_match() -> None:
    assert_twins("__init__", ctxengine.ContextEngine.__init__, sync.ContextEngine.__init__)
    for name in ("initialize", "close", "migrate"):
        assert not inspect.iscoroutinefunction(getattr(sync.ContextEngine, name))
    assert hasattr(sync.ContextEngine, "__enter__") and hasattr(sync.ContextEngine, "__exit__")
    stream_members = {n for n in dir(sync.EventStream) if not n.startswith("_")}
    assert stream_members == {"close", "dropped"}
    assert hasattr(sync.EventStream, "__next__") and hasattr(sync.EventStream, "__enter__")


def test_a_new_async_method_without_its_twin_fails_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The surface test above catches an async method added without its twin."""

    async def summarize(self: Any, session_id: str) -> str:
        """New."""
        return session_id

    monkeypatch.setattr(aio_tenant.TenantView, "summarize", summarize, raising=False)
    with pytest.raises(AssertionError, match="summarize"):
        test_every_public_member_has_its_blocking_twin(aio_tenant.TenantView, sync.TenantView)


def test_the_generated_twins_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen_sync", ROOT / "tools" / "gen_sync.py")
    assert spec is not None and spec.loader is not None
    gen_sync = importlib.util.module_from_spec(spec)
    sys.modules["gen_sync"] = gen_sync  # its dataclasses look their module up
    try:
        spec.loader.exec_module(gen_sync)
    finally:
        del sys.modules["gen_sync"]
    assert gen_sync.main(["--check"]) == 0, "run `python tools/gen_sync.py`"


USER_CODE = """\
from ctxengine import Event, QuotaStatus, QuotaType, Session
from ctxengine.sync import ContextEngine, EventStream, TenantView


def handle(engine: ContextEngine) -> int:
    session: Session = engine.get_or_create_session("s", "u", tier="pro")
    one: QuotaStatus = engine.get_quota("s", QuotaType.TOKENS)
    every: dict[QuotaType, QuotaStatus] = engine.get_quota("s")
    with engine.track_request(session.session_id) as request:
        elapsed: float = request.elapsed
    with engine.concurrency_slot("s") as lease:
        lease_id: str = lease
    ids = [s.session_id for s in engine.iter_sessions(user_id="u")]
    stream: EventStream = engine.events("session.created")
    with stream:
        first: Event = next(stream)
    stop = engine.subscribe(lambda event: None, "session.created")
    stop()
    acme: TenantView = engine.tenant("acme")
    acme.create_session(user_id="u")
    return len(ids) + int(elapsed + one.used) + len(every) + len(lease_id) + len(first.type)


with ContextEngine("sqlite:///app.db") as engine:
    handle(engine)
"""


def test_user_code_type_checks_with_the_facade(tmp_path: Path) -> None:
    """mypy --strict, as users run it (no pydantic plugin), accepts code written against
    the facade, and refuses a wrong argument or awaiting a blocking call."""
    config = ROOT / ".ci" / "mypy-no-plugin.ini"
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(USER_CODE)
    bad.write_text(
        "from ctxengine.sync import ContextEngine\n"
        "engine = ContextEngine()\n"
        "engine.update_session('s', increment_requests='yes')\n"
        "async def wrong() -> None:\n"
        "    await engine.get_session('s')\n"
    )
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), str(good), str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if "good.py" in e], checked.stdout
    assert any("bad.py:3:" in e and "increment_requests" in e for e in errors), checked.stdout
    assert any("bad.py:5:" in e and "await" in e for e in errors), checked.stdout
