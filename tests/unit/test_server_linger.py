"""A pool thread of the observer's gunicorn worker stays with its kept-alive connection
for a moment after answering (webhook/server.py, ObserverWorker), without ever making a
request on another connection wait for it.

The real worker class under real gunicorn over TLS, in a process of its own, serving a
small WSGI app that answers with the identity of the thread that served the request."""

from __future__ import annotations

import http.client
import json
import signal
import sys
import threading
from pathlib import Path

import pytest

from bench.__main__ import loopback_pki
from tests.support import Process, python_env, wait_for

SCRIPT = """
import json, pathlib, sys, threading
from webhook import logs, settings
from webhook.server import ObserverWorker, serve

ObserverWorker.LINGER = float(sys.argv[1])
released = threading.Event()

def app(environ, start_response):
    path = environ["PATH_INFO"]
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))  # as flask does
    if path == "/block":  # holds its thread until /release, and says so
        pathlib.Path(sys.argv[2]).touch()
        released.wait(30)
    elif path == "/release":
        released.set()
    body = json.dumps({"thread": threading.get_ident()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]

loaded = settings.load()
logs.setup(loaded.log_format, loaded.log_level)
serve(loaded, app_factory=lambda _settings: app)
"""


class Server:
    def __init__(self, workdir: Path, *, threads: int, linger: float, keepalive: int = 120,
                 log_level: str = "WARNING"):
        from hack.controlplane import free_port

        self.workdir, self.port = loopback_pki(workdir), free_port()
        self.process = Process(
            [sys.executable, "-c", SCRIPT, str(linger), str(workdir / "blocking")],
            python_env(PREWARM_PORT=str(self.port), PREWARM_BIND_ADDRESS="127.0.0.1",
                       PREWARM_TLS_CERT_FILE=str(workdir / "tls.crt"),
                       PREWARM_TLS_KEY_FILE=str(workdir / "tls.key"),
                       PREWARM_WORKERS="1", PREWARM_THREADS=str(threads),
                       PREWARM_KEEPALIVE=str(keepalive),
                       PREWARM_NAMESPACE="prewarm", PREWARM_LOG_LEVEL=log_level),
            workdir / "server.log")
        wait_for("server", self._answers, timeout=30, alive=self.process.alive)

    def connection(self) -> http.client.HTTPSConnection:
        import ssl

        context = ssl.create_default_context(cafile=str(self.workdir / "ca.crt"))
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=context)

    def _answers(self) -> bool:
        try:
            thread_of(self.connection(), "/")
            return True
        except OSError:
            return False


def thread_of(connection: http.client.HTTPSConnection, path: str) -> int:
    """The identity of the server thread that answered `path` on `connection`."""
    connection.request("GET", path)
    response = connection.getresponse()
    assert response.status == 200
    return json.loads(response.read())["thread"]


@pytest.fixture
def server(tmp_path, request):
    threads, linger, *keepalive = request.param
    started = Server(tmp_path, threads=threads, linger=linger, **(
        {"keepalive": keepalive[0]} if keepalive else {}))
    yield started
    started.process.stop()


@pytest.mark.parametrize("server", [(4, 30.0)], indirect=True)
def test_a_kept_alive_connection_keeps_its_thread(server):
    # Plain gthread hands every request to whichever pool thread is idle: answered one
    # after the other, all six below would be served by the same single thread.
    first, second = server.connection(), server.connection()
    served = [(name, thread_of(connection, "/"))
              for _ in range(3) for name, connection in (("first", first), ("second", second))]
    threads = {name: {thread for who, thread in served if who == name} for name in ("first", "second")}
    assert len(threads["first"]) == 1 and len(threads["second"]) == 1, served
    assert threads["first"] != threads["second"]


@pytest.mark.parametrize("server", [(2, 60.0)], indirect=True)
def test_a_waiting_thread_never_holds_up_another_connection(server):
    # 2 threads: one waits on `idle` (for up to 60 s), the other is held by /block. A
    # request on a third connection must get the waiting thread back at once: the
    # client gives up after 10 s, so it only passes if it does not wait out the 60 s.
    idle, blocked, other = server.connection(), server.connection(), server.connection()
    thread_of(idle, "/")
    block = threading.Thread(target=thread_of, args=(blocked, "/block"), daemon=True)
    block.start()
    wait_for("/block to hold its thread", (server.workdir / "blocking").exists, timeout=10)
    try:
        assert thread_of(other, "/")
    finally:
        thread_of(server.connection(), "/release")
        block.join(10)
    assert not block.is_alive()
    assert thread_of(idle, "/")  # the connection given back to the event loop still works


@pytest.mark.parametrize("server", [(4, 60.0)], indirect=True)
def test_a_waiting_thread_does_not_delay_a_graceful_stop(server):
    connection = server.connection()
    thread_of(connection, "/")  # its thread now waits for the next request, up to 60 s
    server.process.popen.send_signal(signal.SIGTERM)
    # gunicorn's own grace is 20 s: a stop that waited for the thread would take that long
    assert server.process.popen.wait(timeout=15) == 0


@pytest.mark.parametrize("server", [(2, 0.2, 3)], indirect=True)
def test_an_idle_connection_is_closed_after_the_keepalive_not_before(server):
    """PREWARM_KEEPALIVE reaches gunicorn: the server holds an idle connection open for
    that long (the default outlasts the API server's own 90 s of idle reuse, so the
    server is never the one that closes under a review being sent)."""
    import time

    connection = server.connection()
    thread_of(connection, "/")
    answered = time.monotonic()
    # returns when the server closes it; a server ignoring the setting (120 s by default)
    # would let the 30 s socket timeout raise instead
    connection.sock.settimeout(30)
    assert connection.sock.recv(1) == b""
    idle = time.monotonic() - answered
    assert idle >= 3, f"closed after {idle:.1f}s idle"
