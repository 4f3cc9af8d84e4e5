"""The bench's 200 reviews/s figure comes from bench/paced.py: if the generator miscounted
requests or hid the time a request waits behind a slow one, the figure would flatter
the server. These run it against the floor server and a deliberately slow one."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import threading
import time

import pytest

from bench import floor, paced
from bench.__main__ import loopback_pki, review_body


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return loopback_pki(tmp_path_factory.mktemp("paced"))


def client_context(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.crt"))


@pytest.fixture
def floor_port(pki):
    listener, context = floor.listen(0, str(pki / "tls.crt"), str(pki / "tls.key"))
    threading.Thread(target=floor.serve, args=(listener, context), daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_every_arrival_is_answered_and_counted(pki, floor_port):
    result = paced.run("127.0.0.1", floor_port, "/observe", review_body(1), client_context(pki),
                       rate=200, seconds=2, connections=4, seed=7)
    # Poisson arrivals at 200/s for 2 s: 400 expected, standard deviation 20
    assert 300 <= result["count"] <= 500
    assert result["rps"] == pytest.approx(result["count"] / 2)
    assert result["errors"] == 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]


def test_the_same_seed_gives_the_same_arrivals(pki, floor_port):
    runs = [paced.run("127.0.0.1", floor_port, "/observe", review_body(1), client_context(pki),
                      rate=100, seconds=1, seed=seed)["count"] for seed in (3, 3, 4)]
    assert runs[0] == runs[1]  # servers compared in one round see the same load
    assert runs[0] != runs[2]


class SlowHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the API server's connections
    disable_nagle_algorithm = True  # headers and body are two writes
    status = 200
    headers_out: dict[str, str] = {}

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(0.03)  # the simulated cost of one review, not a wait for state
        body = json.dumps({"response": {"allowed": True}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in self.headers_out.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def drive_slow(pki, handler, body=b"{}", **load) -> dict:
    """paced.run against an http.server with `handler`, over TLS."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki / "tls.crt"), str(pki / "tls.key"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return paced.run("127.0.0.1", server.server_address[1], "/observe", body,
                         client_context(pki), **load)
    finally:
        server.shutdown()


def test_time_waiting_behind_a_slow_server_is_counted(pki):
    """100 reviews/s on one connection to a server that needs 30 ms each: the queue
    grows for the whole second, and the last arrivals wait about two seconds. A
    generator that timed each request from its send (closed loop) would report 30 ms."""
    result = drive_slow(pki, SlowHandler, rate=100, seconds=1, connections=1, seed=1)
    assert result["errors"] == 0
    assert result["p50_ms"] >= 30
    assert result["p99_ms"] > 1000


def test_answers_other_than_200_are_errors(pki):
    class Failing(SlowHandler):
        status = 500

    result = drive_slow(pki, Failing, rate=50, seconds=0.5, connections=2, seed=2)
    assert result["count"] > 0
    assert result["errors"] == result["count"]


def test_a_server_closing_each_connection_is_answered_on_new_ones(pki):
    class Closing(SlowHandler):
        headers_out = {"Connection": "close"}

    result = drive_slow(pki, Closing, rate=40, seconds=0.5, connections=2, seed=5)
    assert result["count"] > 5
    assert result["errors"] == 0


def test_a_refused_connection_is_an_error_not_a_hang(pki):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    result = paced.run("127.0.0.1", port, "/observe", b"{}", client_context(pki),
                       rate=50, seconds=0.5, connections=2, seed=2)
    assert result["count"] == 0
    assert result["errors"] > 0


def test_a_list_of_bodies_is_sent_in_turn(pki):
    received: list[bytes] = []

    class Recording(SlowHandler):
        def do_POST(self):
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    bodies = [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    result = drive_slow(pki, Recording, bodies, rate=60, seconds=0.5, connections=1, seed=3)
    # the connection carries one review before the clock starts (as the API server's
    # have), then the arrivals take the bodies in turn
    warmup, *timed = received
    assert warmup == bodies[0]
    assert result["errors"] == 0 and result["count"] == len(timed) >= 6
    assert timed == [bodies[i % 3] for i in range(len(timed))]
