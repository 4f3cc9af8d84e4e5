"""Prewarm's servers answer on every address, IPv6 and IPv4, by default (webhook/listen.py):
on an IPv6-only cluster the kubelet's probes and the API server's calls come to the pod's
IPv6 address. Real sockets: the observer as `python -m webhook serve` (gunicorn, TLS) and
the reconciler's health server."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from bench.__main__ import loopback_pki
from tests.support import (Process, loopback_ipv6, python_env, python_module,
                           unreachable_kubeconfig, wait_for)
from webhook import listen

# this machine has IPv6 (loopback ::1); where a kernel has none, the servers fall back to
# IPv4 and these tests check that fallback instead; where IPv6 sockets exist but ::1 does
# not (a container with IPv6 turned off), only IPv4 can be tried
IPV6 = listen.ipv6_available()
LOOPBACK6 = IPV6 and loopback_ipv6()


@pytest.mark.parametrize("host,bind", [
    ("0.0.0.0", "0.0.0.0:8443"), ("127.0.0.1", "127.0.0.1:8443"), ("localhost", "localhost:8443"),
    ("::", "[::]:8443"), ("::1", "[::1]:8443"), ("[fd00::1]", "[fd00::1]:8443"),
    ("", "[::]:8443" if IPV6 else "0.0.0.0:8443"),
])
def test_gunicorn_gets_ipv6_addresses_in_brackets(host, bind):
    # gunicorn reads a bare "::" as host "" and port ":" and refuses to start
    assert listen.bind_string(host, 8443) == bind


def test_without_ipv6_every_address_is_every_ipv4_address(monkeypatch):
    def no_ipv6(family=socket.AF_INET, *args):
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args)

    real = socket.socket
    monkeypatch.setattr(listen.socket, "socket", no_ipv6)
    assert listen.any_address() == "0.0.0.0"
    assert listen.bind_string("", 8443) == "0.0.0.0:8443"


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_args):
        pass


def _plain_get(host: str, port: int) -> int:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_health_server_answers_on_ipv4_and_ipv6():
    """The reconciler's /healthz, /readyz and /metrics server (webhook.reconciler.run)."""
    server = listen.DualStackHTTPServer(0, _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert _plain_get("127.0.0.1", port) == 200
        assert server.address_family == (socket.AF_INET6 if IPV6 else socket.AF_INET)
        if LOOPBACK6:
            assert _plain_get("::1", port) == 200
    finally:
        server.shutdown()
        server.server_close()


def _tls_get(host: str, port: int, ca: str) -> int:
    """GET /healthz over TLS to `host`, checking the certificate as issued to localhost
    (the test certificate names localhost and 127.0.0.1, not ::1)."""
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("bind_address", [None, "::"] if IPV6 else [None])
def test_the_observer_answers_on_ipv4_and_ipv6(tmp_path, bind_address):
    from hack.controlplane import free_port

    pki, port = loopback_pki(tmp_path), free_port()
    argv = python_module("webhook", "serve", "--port", str(port),
                         "--tls-cert-file", str(pki / "tls.crt"),
                         "--tls-key-file", str(pki / "tls.key"), "--workers", "1")
    if bind_address is not None:
        argv += ["--bind-address", bind_address]
    process = Process(argv, python_env(KUBECONFIG=str(unreachable_kubeconfig(tmp_path)),
                                       PREWARM_NAMESPACE="prewarm"), tmp_path / "observer.log")
    ca = str(pki / "ca.crt")

    def answers() -> bool:
        try:
            return _tls_get("127.0.0.1", port, ca) == 200
        except OSError:
            return False

    try:
        wait_for("the observer on 127.0.0.1", answers, timeout=30, alive=process.alive)
        if LOOPBACK6:
            assert _tls_get("::1", port, ca) == 200
        assert f"observer listening on https://{'[::]' if IPV6 else '0.0.0.0'}:{port}" \
            in process.output()
    finally:
        process.stop()
