"""The machine's floor for a review: a thread per TLS keep-alive connection, standard
library only, reading each request with blocking calls and answering with one write.

It does what the baseline handler does (decode the review, echo the uid) with the fewest
thread hand-offs Python allows: one wake-up per request, where gunicorn's gthread worker
has two (its event loop sees the socket readable, then hands the connection to a pool
thread). Run next to the others in `make bench`, it tells how much of a latency figure
is this machine (a shared VM's scheduling delays) and how much is the serving stack.
Not a server for production: no limits, no timeouts, no HTTP beyond what the bench sends.

    python -m bench.floor --port P --cert F --key K
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import threading


def _serve_connection(raw: socket.socket, context: ssl.SSLContext) -> None:
    try:
        conn = context.wrap_socket(raw, server_side=True)
    except (OSError, ssl.SSLError):
        raw.close()
        return
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            body, buffer = buffer[:length], buffer[length:]
            if head.startswith(b"GET"):
                payload = b'{"status":"ok"}'
            else:
                uid = json.loads(body)["request"]["uid"]
                payload = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                      "response": {"uid": uid, "allowed": True}}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    except (OSError, ssl.SSLError, ValueError, KeyError):
        return
    finally:
        conn.close()


def serve(listener: socket.socket, context: ssl.SSLContext) -> None:
    """Accepts until the listener is closed."""
    while True:
        try:
            raw, _ = listener.accept()
        except OSError:
            return
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_connection, args=(raw, context), daemon=True).start()


def listen(port: int, cert: str, key: str) -> tuple[socket.socket, ssl.SSLContext]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", port))
    return listener, context


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    serve(*listen(args.port, args.cert, args.key))


if __name__ == "__main__":
    main()
