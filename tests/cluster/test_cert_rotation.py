"""Serving-certificate rotation: new files in place, under load, no failed review."""

from __future__ import annotations

import http.client
import json
import threading
import time

from cryptography import x509

from certs import tls
from tests.support import Observer, eventually, new_namespace_name

REVIEW = json.dumps({
    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
    "request": {"uid": "rot", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "team", "operation": "CREATE", "dryRun": True,
                "object": {"spec": {"containers": [{"name": "a", "image": "nginx"}]}}}}).encode()


def served_serial(observer: Observer) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", observer.port, context=observer.ssl_context(),
                                       timeout=5)
    conn.connect()
    der = conn.sock.getpeercert(binary_form=True)
    conn.close()
    return x509.load_der_x509_certificate(der).serial_number


EXPIRY = "prewarm_serving_certificate_expiration_timestamp_seconds"


def not_after(pem: bytes) -> float:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def test_rotated_certificate_is_served_without_restart_or_failed_reviews(cluster, core, tmp_path):
    namespace = new_namespace_name("rotation")
    core.create_namespace({"metadata": {"name": namespace}})
    observer = Observer(cluster, namespace, tmp_path)
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop() -> None:
        while not stop.is_set():
            # a fresh connection every few reviews, so handshakes happen throughout
            conn = http.client.HTTPSConnection("127.0.0.1", observer.port,
                                               context=observer.ssl_context(), timeout=10)
            for _ in range(5):
                try:
                    conn.request("POST", "/observe", REVIEW, {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    body = response.read()
                    good = response.status == 200 and json.loads(body)["response"]["allowed"]
                except Exception as error:  # noqa: BLE001 - every failure is counted
                    good = False
                    failures.append(repr(error))
                with lock:
                    counts["ok" if good else "failed"] += 1
                if not good:
                    break
            conn.close()

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    try:
        old_serial = served_serial(observer)
        old_expiry = not_after((tmp_path / "tls.crt").read_bytes())
        assert observer.metric(EXPIRY) == old_expiry
        for thread in threads:
            thread.start()
        eventually("load running", lambda: counts["ok"] > 200, timeout=30)

        # the new pair, same CA (as cert-manager renews); written in place and torn on
        # purpose: for a moment the cert on disk does not match the key on disk
        cert, key = tls.generate_serving(observer.ca, observer.ca_key, dns_names=["localhost"],
                                         ip_addresses=["127.0.0.1"], days=200)
        new_serial = x509.load_pem_x509_certificate(cert).serial_number
        (tmp_path / "tls.crt").write_bytes(cert)
        # the torn window lasts until the server has seen it (and kept its old pair)
        eventually("the server to see the torn pair", lambda: "keeping previous certificate"
                   in observer.process.output(), timeout=15, interval=0.05)
        (tmp_path / "tls.key").write_bytes(key)

        served = eventually("the new certificate served", lambda: (
            lambda serial: serial if serial == new_serial else None)(served_serial(observer)),
            timeout=15, interval=0.2)
        before = counts["ok"]
        eventually("more reviews on the new certificate", lambda: counts["ok"] > before + 200,
                   timeout=30)
        # the metric an expiry alert reads follows the rotation: in time, ten scrapes in a
        # row (each a new connection, which either worker may take) all show the new
        # expiry. A worker looks at the files at most once a second, so one may show the
        # old pair a moment longer: the pair it still hands to new connections.
        new_expiry = not_after(cert)
        scraped = eventually("the new expiry on /metrics", lambda: (
            lambda seen: seen if seen == {new_expiry} else None)(
                {observer.metric(EXPIRY) for _ in range(10)}), timeout=15, interval=0.2)
    finally:
        stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(30)
        observer.stop()
        core.delete_namespace(namespace)

    assert served == new_serial != old_serial
    assert scraped == {new_expiry} and new_expiry < old_expiry - 100 * 86400
    assert counts["failed"] == 0, failures[:5]
    assert counts["ok"] > 400
    assert "serving certificate reloaded" in observer.process.output()
    assert "keeping previous certificate" in observer.process.output()  # the torn window


def test_a_worker_restarted_while_the_key_is_bad_serves_with_the_last_good_pair(
        cluster, core, tmp_path):
    """A worker that dies (out of memory, a crash) while the key file holds something
    unreadable: gunicorn starts a new one, which must still complete handshakes with
    the pair it inherits, not answer every connection with an error."""
    import signal

    namespace = new_namespace_name("restarted")
    core.create_namespace({"metadata": {"name": namespace}})
    observer = Observer(cluster, namespace, tmp_path, workers=1)
    try:
        serial = served_serial(observer)
        served_expiry = not_after((tmp_path / "tls.crt").read_bytes())
        # a rotation gone wrong: a new certificate, and a key that cannot be read
        cert, _ = tls.generate_serving(observer.ca, observer.ca_key, dns_names=["localhost"],
                                       ip_addresses=["127.0.0.1"], days=100)
        (tmp_path / "tls.crt").write_bytes(cert)
        (tmp_path / "tls.key").write_bytes(b"not a key")

        observer.replace_worker(signal.SIGKILL)
        assert eventually("a handshake with the new worker", lambda: served_serial(observer),
                          timeout=30) == serial
        assert observer.get("/healthz")[0] == 200
        # and it reports the expiry of the pair it serves, not of the files on disk
        assert observer.metric(EXPIRY) == served_expiry != not_after(cert)
    finally:
        observer.stop()
        core.delete_namespace(namespace)
