"""``ctxengine memory list|search|export|import``, on an SQLite file and on PostgreSQL:
what each prints, that the read-only ones never create or migrate a database, and
that expected errors are one line without a traceback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from ctxengine import ContextEngine, EngineSettings
from ctxengine.cli import main
from ctxengine.embeddings import HashingEmbedder
from ctxengine.migrate import head_revision
from tests.ops.test_cli import fails, invoke
from tests.ops.test_migrations import empty_url  # noqa: F401 (a fixture)

SETTINGS = EngineSettings(auto_cleanup=False, embedder=HashingEmbedder())


async def seed(url: str, settings: EngineSettings = SETTINGS) -> None:
    async with ContextEngine(url, settings=settings) as engine:
        await engine.create_session("s1", "ann")
        await engine.remember("lang", "fr", user_id="ann")
        await engine.remember("lang", {"code": "de"}, user_id="ann")
        await engine.remember("pref.tea", "green", user_id="ann")
        await engine.remember("pref.milk", False, user_id="ann")
        await engine.remember("plan", ["a", "b"], user_id="ann", session_id="s1")
        await engine.remember("tone", "dry", user_id="ann", namespace="agent")
        await engine.add_memory(
            "my flight to Lisbon leaves on Tuesday", user_id="ann", importance=3.0
        )
        await engine.add_memory("I like green tea with honey", user_id="ann", session_id="s1")
        await engine.add_memory("ann prefers short answers", user_id="ann", namespace="agent")
        await engine.add_memory("everyone likes tea")
        await engine.remember("motto", "be kind")
        await engine.tenant("acme").add_memory("acme ann likes cocoa", user_id="ann")


async def search(url: str, query: str, **kw: Any) -> list[tuple[str, float]]:
    async with ContextEngine(url, settings=SETTINGS) as engine:
        return [(h.record.text, h.score) for h in await engine.search_memory(query, **kw)]


def test_memory_list(db_url: str) -> None:
    asyncio.run(seed(db_url))
    out = invoke("memory", "list", "--user", "ann", "--url", db_url)
    lines = out.splitlines()
    assert lines[0] == "user 'ann' in tenant 'default': 5 key-value items, 3 semantic memories"
    assert "  namespace agent: 1 item, 1 memory" in lines
    assert "  namespace default: 4 items, 2 memories" in lines
    assert "KEY-VALUE ITEMS (key order)" in out and "SEMANTIC MEMORIES (newest first)" in out
    assert any(line.split()[:4] == ["default", "-", "lang", "2"] for line in lines)
    assert any(line.split()[:3] == ["default", "s1", "plan"] for line in lines)
    assert '{"code": "de"}' in out and "my flight to Lisbon leaves on Tuesday" in out
    assert "everyone likes tea" not in out and "cocoa" not in out and "be kind" not in out

    data = json.loads(invoke("memory", "list", "--user", "ann", "--json", "--url", db_url))
    assert data["items"]["total"] == 5 and data["memories"]["total"] == 3
    assert data["items"]["by_namespace"] == {"agent": 1, "default": 4}
    assert [i["key"] for i in data["items"]["shown"]] == [
        "tone",
        "lang",
        "plan",
        "pref.milk",
        "pref.tea",
    ]
    assert data["memories"]["shown"][0]["text"] == "ann prefers short answers"  # newest
    assert data["memories"]["shown"][0]["user_id"] == "ann"

    ranked = json.loads(
        invoke(
            *("memory", "list", "--user", "ann", "--order", "importance", "--limit", "1"),
            *("--json", "--url", db_url),
        )
    )
    assert [m["text"] for m in ranked["memories"]["shown"]] == [
        "my flight to Lisbon leaves on Tuesday"
    ]
    assert len(ranked["items"]["shown"]) == 1
    short = invoke("memory", "list", "--user", "ann", "--limit", "1", "--url", db_url)
    assert "showing 1 of 5 items: --limit for more" in short
    assert "showing 1 of 3 memories: --limit for more" in short

    prefixed = json.loads(
        invoke("memory", "list", "--user", "ann", "--prefix", "pref.", "--json", "--url", db_url)
    )
    assert [i["key"] for i in prefixed["items"]["shown"]] == ["pref.milk", "pref.tea"]
    assert prefixed["items"]["total"] == 2
    agent = json.loads(
        invoke("memory", "list", "--user", "ann", "--namespace", "agent", "--json", "--url", db_url)
    )
    assert agent["items"]["total"] == 1 and agent["memories"]["total"] == 1

    shared = invoke("--url", db_url, "memory", "list")
    assert shared.startswith("the tenant-wide scope in tenant 'default': 1 key-value item, 1 ")
    assert "everyone likes tea" in shared and "be kind" in shared
    acme = invoke("memory", "--url", db_url, "list", "--user", "ann", "--tenant", "acme")
    assert "0 key-value items, 1 semantic memory" in acme and "cocoa" in acme
    nobody = invoke("memory", "list", "--user", "nobody", "--url", db_url)
    assert (
        nobody.strip()
        == "user 'nobody' in tenant 'default': 0 key-value items, 0 semantic memories"
    )


def test_memory_search(db_url: str) -> None:
    asyncio.run(seed(db_url))
    expected = asyncio.run(search(db_url, "green tea", user_id="ann"))
    hits = json.loads(
        invoke(
            *("memory", "search", "green tea", "--user", "ann"),
            *("--embedder", "hashing", "--json", "--url", db_url),
        )
    )
    assert [(h["text"], h["score"]) for h in hits] == expected
    assert hits[0]["text"] == "I like green tea with honey"
    assert hits[0]["session_id"] == "s1" and hits[0]["memory_id"]
    assert "everyone likes tea" in [h["text"] for h in hits]  # the tenant-wide ones too

    out = invoke(
        *("--url", db_url, "memory", "search", "green tea", "--user", "ann"),
        *("--embedder", "ctxengine.embeddings:HashingEmbedder", "--limit", "2"),
    )
    lines = out.splitlines()
    assert lines[0].split() == ["SCORE", "SCOPE", "IMPORTANCE", "CREATED", "(UTC)", "TEXT"]
    assert len(lines) == 3
    assert lines[1].split()[1:3] == ["session", "s1"] and "I like green tea" in lines[1]
    assert "tenant-wide" in lines[2] and "everyone likes tea" in lines[2]
    agent = invoke(
        *("memory", "search", "short answers", "--user", "ann", "--namespace", "agent"),
        *("--embedder", "hashing:256", "--url", db_url),
    )
    assert "ann prefers short answers" in agent
    none = invoke(
        *("memory", "search", "green tea", "--user", "ann", "--min-score", "0.99"),
        *("--embedder", "hashing", "--url", db_url),
    )
    assert (
        none.strip() == "no memories of user 'ann' in tenant 'default' in namespace 'default' found"
    )

    # another embedder's dimension is refused in one line; a bad spec is a usage error
    line = fails("memory", "search", "tea", "--embedder", "hashing:64", "--url", db_url)
    assert "256 dimensions" in line and "64" in line
    for spec, message in (
        ("hashing:many", "hashing takes a number of dimensions"),
        ("word2vec", "is not hashing[:DIMS], minilm, or module:attribute"),
        ("no_such_module_x:make", "cannot import 'no_such_module_x'"),
        ("ctxengine.embeddings:Nothing", "has no attribute 'Nothing'"),
        ("ctxengine.embeddings:checked_vectors", "calling checked_vectors failed"),
        ("ctxengine:__version__", "is not an embedder"),
    ):
        bad = CliRunner().invoke(
            main, ["memory", "search", "tea", "--embedder", spec, "--url", db_url]
        )
        assert bad.exit_code == 2 and message in bad.output, (spec, bad.output)
        assert "Traceback" not in bad.output
    missing = CliRunner().invoke(main, ["memory", "search", "tea", "--url", db_url])
    assert missing.exit_code == 2 and "--embedder" in missing.output


def test_memory_export_and_import(db_url: str, tmp_path: Path) -> None:
    asyncio.run(seed(db_url))
    before = asyncio.run(search(db_url, "green tea", user_id="ann", include_shared=False))
    printed = json.loads(invoke("memory", "export", "--user", "ann", "--url", db_url))
    assert printed["format"] == "ctxengine.memories" and printed["format_version"] == 1
    assert len(printed["items"]) == 5 and len(printed["memories"]) == 3
    path = tmp_path / "ann.json"
    said = invoke("memory", "export", "--user", "ann", "-o", str(path), "--url", db_url)
    assert said.strip() == (
        "exported 5 key-value items and 3 semantic memories of user 'ann' in tenant "
        f"'default' to {path}"
    )
    written = json.loads(path.read_text())
    assert {**written, "exported_at": None} == {**printed, "exported_at": None}
    agent = json.loads(
        invoke("memory", "export", "--user", "ann", "--namespace", "agent", "--url", db_url)
    )
    assert len(agent["items"]) == len(agent["memories"]) == 1

    async def forget() -> None:
        async with ContextEngine(db_url, settings=SETTINGS) as engine:
            assert await engine.forget_user("ann") == 8

    asyncio.run(forget())
    out = invoke("memory", "import", str(path), "--url", db_url)
    assert out.strip() == (
        "imported into user 'ann' in tenant 'default': 5 key-value items written (0 already "
        "stored alike), 3 semantic memories added (0 already present), 0 expired since the "
        "export and skipped"
    )
    assert asyncio.run(search(db_url, "green tea", user_id="ann", include_shared=False)) == before
    again = invoke("--url", db_url, "memory", "import", str(path))
    assert "0 key-value items written (5 already stored alike)" in again
    assert "0 semantic memories added (3 already present)" in again
    # from standard input, under another user, into another tenant
    result = CliRunner().invoke(
        main,
        ["memory", "import", "-", "--user", "carl", "--tenant", "acme", "--url", db_url],
        input=path.read_text(),
    )
    assert result.exit_code == 0, result.output
    assert "imported into user 'carl' in tenant 'acme': 5 key-value items written" in result.output
    carl = json.loads(
        invoke("memory", "list", "--user", "carl", "--tenant", "acme", "--json", "--url", db_url)
    )
    assert carl["items"]["total"] == 5 and carl["memories"]["total"] == 3

    # bad files: one line, nothing written
    listing = invoke("memory", "list", "--user", "zed", "--json", "--url", db_url)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert "bad.json is not JSON" in fails("memory", "import", str(bad), "--url", db_url)
    bad.write_text(json.dumps({**written, "format_version": 2}))
    line = fails("memory", "import", str(bad), "--user", "zed", "--url", db_url)
    assert "unsupported format_version 2" in line
    broken = json.loads(json.dumps(written))
    broken["memories"][2]["embedding"] = "AAAA"
    bad.write_text(json.dumps(broken))
    line = fails("memory", "import", str(bad), "--user", "zed", "--url", db_url)
    assert "memories[2]" in line and "nothing was written" in line
    assert invoke("memory", "list", "--user", "zed", "--json", "--url", db_url) == listing
    absent = CliRunner().invoke(main, ["memory", "import", str(tmp_path / "no.json")])
    assert absent.exit_code == 2 and "No such file" in absent.output


def test_memory_commands_never_create_a_database(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    url = f"sqlite:///{path}"
    export = tmp_path / "doc.json"
    export.write_text(json.dumps({"format": "ctxengine.memories", "format_version": 1}))
    for args in (
        ["memory", "list", "--user", "ann"],
        ["memory", "search", "tea", "--embedder", "hashing"],
        ["memory", "export", "--user", "ann"],
        ["memory", "import", str(export)],
    ):
        line = fails(*args, "--url", url)
        assert line == f"Error: no ctxengine schema at {url}; run `ctxengine migrate`"
    assert not path.exists()


def test_memory_commands_never_migrate(empty_url: str) -> None:  # noqa: F811
    for args in (
        ["memory", "list"],
        ["memory", "search", "tea", "--embedder", "hashing"],
        ["memory", "export", "--user", "ann"],
    ):
        line = fails(*args, "--url", empty_url)
        assert "no ctxengine schema at" in line and "run `ctxengine migrate`" in line
    assert "current: none" in invoke("db", "status", "--url", empty_url)


def test_a_schema_older_than_memory(db_url: str) -> None:
    invoke("migrate", "--revision", "0009", "--yes", "--url", db_url)
    line = fails("memory", "list", "--user", "ann", "--url", db_url)
    assert f"is at revision 0009_memories, this ctxengine needs {head_revision()}" in line
    assert "run `ctxengine migrate`" in line
    assert "current: 0009_memories" in invoke("db", "status", "--url", db_url)


def test_an_embedder_of_the_project_in_a_real_process(tmp_path: Path) -> None:
    (tmp_path / "my_embedder.py").write_text(
        "from ctxengine.embeddings import HashingEmbedder\n\n"
        "def make():\n"
        "    return HashingEmbedder(32)\n"
    )
    url = f"sqlite:///{tmp_path / 'app.db'}"
    asyncio.run(seed(url, EngineSettings(auto_cleanup=False, embedder=HashingEmbedder(32))))

    def ctxengine(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ctxengine", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    found = ctxengine(
        *("memory", "search", "Lisbon flight", "--user", "ann"),
        *("--embedder", "my_embedder:make", "--url", url),
    )
    assert found.returncode == 0, found.stderr
    assert "my flight to Lisbon leaves on Tuesday" in found.stdout.splitlines()[1]
    wrong = ctxengine("memory", "search", "tea", "--embedder", "hashing", "--url", url)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert wrong.stderr.count("\n") == 1 and "32 dimensions" in wrong.stderr
