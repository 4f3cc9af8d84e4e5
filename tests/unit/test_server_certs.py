"""The serving certificate's expiry, as the observer reports it on /metrics
(webhook/server.py CertReloader, webhook/metrics.py ServingCertificate): what an alert
on a certificate that nothing renews (certs.mode=job) reads."""

from __future__ import annotations

import logging

import pytest
from cryptography import x509

from certs import tls
from webhook import metrics, server

NAME = "prewarm_serving_certificate_expiration_timestamp_seconds"


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return tls.generate_ca()


def write_pair(tmp_path, ca, days: int) -> float:
    cert, key = tls.generate_serving(*ca, dns_names=["localhost"], days=days)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    return x509.load_pem_x509_certificate(cert).not_valid_after_utc.timestamp()


def reloader_for(tmp_path) -> server.CertReloader:
    return server.CertReloader(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))


def test_the_expiry_is_the_loaded_certificate_s_and_follows_a_rotation(tmp_path, ca, monkeypatch):
    first = write_pair(tmp_path, ca, days=90)
    reloader = reloader_for(tmp_path)
    assert reloader.expiry() == first

    monkeypatch.setattr(server, "CHECK_INTERVAL", 0.0)  # look at the files at every call
    second = write_pair(tmp_path, ca, days=30)
    assert reloader.expiry() == second != first
    assert reloader.reloads == 1


def test_a_torn_pair_keeps_the_expiry_of_the_pair_still_served(tmp_path, ca, monkeypatch):
    first = write_pair(tmp_path, ca, days=90)
    reloader = reloader_for(tmp_path)
    monkeypatch.setattr(server, "CHECK_INTERVAL", 0.0)
    new_cert, _ = tls.generate_serving(*ca, dns_names=["localhost"], days=30)
    (tmp_path / "tls.crt").write_bytes(new_cert)  # its key not written yet
    assert reloader.expiry() == first
    assert reloader.reloads == 0


def test_a_chain_reports_its_leaf(tmp_path, ca):
    leaf = write_pair(tmp_path, ca, days=30)
    with open(tmp_path / "tls.crt", "ab") as handle:
        handle.write(ca[0])  # the CA after the leaf, as cert-manager's tls.crt may hold
    assert reloader_for(tmp_path).expiry() == leaf


def test_an_unreadable_certificate_gives_no_expiry_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="webhook.server"):
        assert server._not_after(b"-----BEGIN CERTIFICATE-----\nnope\n", "/tls.crt") is None
    assert "cannot read the expiry of /tls.crt" in caplog.text


def samples(body: bytes) -> list[str]:
    return [line for line in body.decode().splitlines() if line.startswith(NAME + " ")]


def test_metrics_show_the_expiry_read_at_each_scrape(monkeypatch):
    monkeypatch.setattr(metrics, "_AT_SCRAPE", [])
    assert samples(metrics.exposition()[0]) == []  # not the observer: no such metric

    expiry = {"value": 1_900_000_000.0}
    metrics.report_certificate_expiry(lambda: expiry["value"])
    assert samples(metrics.exposition()[0]) == [f"{NAME} 1.9e+09"]
    expiry["value"] = 1_950_000_000.0
    assert samples(metrics.exposition()[0]) == [f"{NAME} 1.95e+09"]

    # reported again (a second registration) replaces, and an unknown expiry is no
    # sample rather than a wrong one
    metrics.report_certificate_expiry(lambda: None)
    assert samples(metrics.exposition()[0]) == []
