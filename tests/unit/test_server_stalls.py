"""Clients that stop halfway (webhook/server.py, ObserverWorker): a few of them must not
stop the observer from answering, nor hold up its graceful stop.

The real worker class under real gunicorn over TLS, in a process of its own (the server
of test_server_linger.py)."""

from __future__ import annotations

import signal
import socket
import ssl

import pytest

from tests.support import wait_for
from tests.unit.test_server_linger import Server, thread_of


def stalled(server: Server, kind: str) -> socket.socket:
    """A connection that stops halfway through `kind` and then sends nothing more."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if kind == "handshake":
        sock.sendall(b"\x16")  # the first byte of a TLS record
        return sock
    context = ssl.create_default_context(cafile=str(server.workdir / "ca.crt"))
    sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    if kind == "headers":
        sock.sendall(b"POST /observe HTTP/1.1\r\nHost: x\r\n")
    else:  # a body shorter than announced
        sock.sendall(b"POST /observe HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    return sock


@pytest.mark.parametrize("kind", ["handshake", "headers", "body"])
def test_clients_stalled_on_every_thread_do_not_stop_the_server_answering(tmp_path, kind):
    # 2 threads, each taken by a stalled client: before, nothing freed them and a
    # request on a new connection was never answered (the client gives up after 10 s)
    server = Server(tmp_path, threads=2, linger=0.2, log_level="INFO")
    held = [stalled(server, kind), stalled(server, kind)]
    try:
        assert thread_of(server.connection(), "/")
        wait_for("the stalled connections closed by the server", lambda: all(
            sock.recv(1) == b"" for sock in held), timeout=15)
        assert "closed 2 connections that sent no complete request in 5s" in \
            server.process.output()
    finally:
        server.process.stop()


def test_a_stalled_connection_does_not_hold_up_a_graceful_stop(tmp_path):
    # a stalled handshake used to hold its thread for ever, so a stopping worker waited
    # out gunicorn's grace (20 s) and was killed: the observer's last write of its
    # buffer (worker_exit) never ran
    server = Server(tmp_path, threads=2, linger=0.2, log_level="INFO")
    held = stalled(server, "handshake")
    try:
        thread_of(server.connection(), "/")
        server.process.popen.send_signal(signal.SIGTERM)
        # gunicorn's own grace is 20 s: a stop that waited for the stalled thread would
        # take that long, leaving the last write no time before the kill
        assert server.process.popen.wait(timeout=15) == 0
        assert "Worker exiting" in server.process.output()
    finally:
        held.close()
        server.process.stop()


def test_cut_connections_are_counted_once_so_a_later_stop_still_waits_and_cuts(tmp_path):
    # gthread counted a connection it had closed itself on a TLS end-of-file twice:
    # after two cuts the worker believed it had -2 connections, its stop no longer
    # waited (nor cut), and a stalled handshake at SIGTERM held it to the 20 s kill
    server = Server(tmp_path, threads=2, linger=0.2, log_level="INFO")
    held = [stalled(server, "handshake"), stalled(server, "handshake")]
    try:
        wait_for("two stalled handshakes cut", lambda: "closed 2 connections that sent no "
                 "complete request" in server.process.output(), timeout=30)
        late = stalled(server, "handshake")
        thread_of(server.connection(), "/")
        server.process.popen.send_signal(signal.SIGTERM)
        assert server.process.popen.wait(timeout=15) == 0
        late.close()
    finally:
        for sock in held:
            sock.close()
        server.process.stop()
