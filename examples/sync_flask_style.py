"""A synchronous, Flask-style web app on the blocking facade (``ctxengine.sync``).

Plain functions handle requests, one thread per request, as in Flask, Django or any
WSGI server: here a WSGI app with Flask-like routes, served by the standard library's
threaded WSGI server and called by several client threads at once (no Flask needed;
under Flask each view would be the same function). One engine serves every thread:
created at start-up, closed at shutdown.

    POST /chat/<user>      the body is the prompt; 429 with Retry-After when rate limited
    GET  /history/<user>   the conversation as JSON
    GET  /stats            the engine's statistics

    python examples/sync_flask_style.py   # a temporary SQLite file, or $CTXENGINE_DATABASE_URL
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ctxengine import EngineSettings, QuotaType
from ctxengine.errors import RateLimitError, SessionNotActiveError, SessionNotFoundError
from ctxengine.sync import ContextEngine

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Response = tuple[int, dict[str, Any], dict[str, str]]
View = Callable[..., Response]


class App:
    """The smallest Flask-like WSGI app: ``@app.route(method, pattern)`` views returning
    (status, JSON body, headers)."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], View]] = []

    def route(self, method: str, pattern: str) -> Callable[[View], View]:
        def register(view: View) -> View:
            self.routes.append((method, re.compile(f"^{pattern}$"), view))
            return view

        return register

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        status, body, headers = 404, {"error": "not found"}, dict[str, str]()
        for method, pattern, view in self.routes:
            match = pattern.match(environ["PATH_INFO"])
            if match and environ["REQUEST_METHOD"] == method:
                size = int(environ.get("CONTENT_LENGTH") or 0)
                payload = environ["wsgi.input"].read(size).decode() if size else ""
                status, body, headers = view(payload, **match.groupdict())
                break
        reason = {200: "OK", 404: "Not Found", 409: "Conflict", 429: "Too Many Requests"}
        start_response(
            f"{status} {reason[status]}",
            [("Content-Type", "application/json"), *headers.items()],
        )
        return [json.dumps(body).encode()]


def model(prompt: str) -> tuple[str, int]:
    """A stand-in for a blocking LLM client call: an answer and the tokens it used."""
    time.sleep(0.005)
    return f"echo: {prompt}", 3 * len(prompt.split())


def create_app(engine: ContextEngine) -> App:
    """The views: each runs in its request's thread and calls the engine directly."""
    app = App()

    @app.route("POST", "/chat/(?P<user>[a-z]+)")
    def chat(prompt: str, user: str) -> Response:
        session = engine.get_or_create_session(f"web-{user}", user, tier="pro")
        try:
            with engine.track_request(session.session_id, "chat"):
                answer, tokens = model(prompt)
        except RateLimitError as exc:
            return 429, {"error": str(exc)}, {"Retry-After": f"{exc.retry_after:.0f}"}
        except SessionNotActiveError as exc:
            return 409, {"error": str(exc)}, {}
        engine.add_messages(
            session.session_id,
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        )
        engine.track_usage(session.session_id, "chat", QuotaType.TOKENS, tokens)
        return 200, {"answer": answer}, {}

    @app.route("GET", "/history/(?P<user>[a-z]+)")
    def history(_: str, user: str) -> Response:
        try:
            messages = engine.get_messages(f"web-{user}", limit=6)
        except SessionNotFoundError:
            return 404, {"error": f"{user} has not chatted yet"}, {}
        return 200, {"messages": [[m.role, m.content] for m in messages]}, {}

    @app.route("GET", "/stats")
    def stats(_: str) -> Response:
        return 200, engine.get_metrics(), {}

    return app


class ThreadedWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread per request (Flask's development server does the same)."""

    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def call(base: str, method: str, path: str, body: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(base + path, data=body.encode() or None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def main(url: str) -> None:
    with ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine:
        # a "spammer" gets 2 chats per 10 seconds (a custom limit, for the 429 below)
        spammer = engine.get_or_create_session("web-spammer", "spammer", tier="pro")
        engine.set_rate_limit(spammer.session_id, "chat", 2, 10)
        tokens_seen: list[float] = []
        usage = engine.events("usage.recorded")  # a monitor thread reads the stream
        monitor = threading.Thread(
            target=lambda: tokens_seen.extend(e.data["record"].amount for e in usage)
        )
        monitor.start()

        server = make_server(
            "127.0.0.1", 0, create_app(engine), ThreadedWSGIServer, handler_class=QuietHandler
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        statuses: dict[str, list[int]] = {}

        def client(user: str) -> None:
            for turn in range(5):
                status, _ = call(base, "POST", f"/chat/{user}", f"question {turn} from {user}")
                statuses.setdefault(user, []).append(status)

        clients = [
            threading.Thread(target=client, args=(user,))
            for user in ("ada", "grace", "linus", "spammer")
        ]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        _, history = call(base, "GET", "/history/ada")
        _, stats = call(base, "GET", "/stats")
        server.shutdown()
        usage.close()  # from this thread: the monitor's iteration ends
        monitor.join()

        for user, seen in sorted(statuses.items()):
            session = engine.get_session(f"web-{user}")
            assert session is not None
            print(
                f"{user:<8} answered {seen.count(200)}, refused {seen.count(429)} (429); "
                f"{session.request_count} requests in all"
            )
        print("ada's last turn:", history["messages"][-2:])
        print(
            f"{stats['total_requests']} requests, {stats['total_messages']} messages stored; "
            f"the monitor saw {sum(tokens_seen):g} tokens of usage this run"
        )


if __name__ == "__main__":
    url = os.environ.get("CTXENGINE_DATABASE_URL")
    if url:
        main(url)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(f"sqlite:///{Path(tmp) / 'flask_style.db'}")
