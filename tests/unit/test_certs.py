"""The certificate tool without a cluster: generated pairs work in a real TLS handshake.

A CA and a serving pair are generated, an ssl-wrapped http.server on 127.0.0.1 serves
with the pair, and a client that trusts only the CA connects with the server_hostname
kube-apiserver would use. The CLI runs as the Helm Job and `make demo` run it.
"""

from __future__ import annotations

import http.server
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs import tls
from tests.support import unreachable_kubeconfig

REPO = Path(__file__).resolve().parents[2]
SERVICE, NAMESPACE = "prewarm", "prewarm"
DNS_NAMES = tls.service_dns_names(SERVICE, NAMESPACE)
IP = "127.0.0.1"


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return tls.generate_ca()


@pytest.fixture(scope="module")
def serving(ca) -> tuple[bytes, bytes]:
    return tls.generate_serving(*ca, dns_names=DNS_NAMES, ip_addresses=[IP])


@pytest.fixture(scope="module")
def pem_files(tmp_path_factory, ca, serving) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    files = {"ca.crt": ca[0], "ca.key": ca[1], "tls.crt": serving[0], "tls.key": serving[1]}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture(scope="module")
def https_port(pem_files) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 serving with the generated pair."""
    server = http.server.HTTPServer((IP, 0), _Ok)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem_files["tls.crt"], pem_files["tls.key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def https_get(port: int, cafile: Path, server_hostname: str) -> str:
    """GET / over TLS trusting only `cafile`, verifying the certificate for
    `server_hostname` (a DNS name or an IP) while connecting to 127.0.0.1."""
    context = ssl.create_default_context(cafile=str(cafile))
    # Stricter RFC 5280 checks, closer to Go's verifier in kube-apiserver.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_connection((IP, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as conn:
            request = f"GET / HTTP/1.1\r\nHost: {server_hostname}\r\nConnection: close\r\n\r\n"
            conn.sendall(request.encode())
            response = b""
            while chunk := conn.recv(4096):
                response += chunk
    return response.decode()


# -- a real handshake -------------------------------------------------------------------


@pytest.mark.parametrize("server_hostname", [*DNS_NAMES, IP])
def test_handshake_verifies_for_every_san(https_port, pem_files, server_hostname):
    response = https_get(https_port, pem_files["ca.crt"], server_hostname)
    assert response.startswith("HTTP/1.0 200"), response
    assert response.endswith("ok")


@pytest.mark.parametrize("server_hostname",
                         ["prewarm.other.svc", "evil.prewarm.prewarm.svc", "10.0.0.1"])
def test_handshake_fails_for_a_name_not_in_the_sans(https_port, pem_files, server_hostname):
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        https_get(https_port, pem_files["ca.crt"], server_hostname)


def test_handshake_fails_when_the_client_trusts_another_ca(https_port, tmp_path):
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(tls.generate_ca("someone-else")[0])
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        https_get(https_port, other_ca, DNS_NAMES[2])


# -- what the certificates contain ------------------------------------------------------


def test_service_dns_names_are_what_the_api_server_and_clients_use():
    assert tls.service_dns_names("obs", "ns1") == [
        "obs", "obs.ns1", "obs.ns1.svc", "obs.ns1.svc.cluster.local",
    ]


def granted_usages(cert: x509.Certificate) -> set[str]:
    """The KeyUsage flags a certificate sets; the extension must be there and critical."""
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    names = ["digital_signature", "content_commitment", "key_encipherment",
             "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign"]
    if usage.value.key_agreement:  # cryptography refuses to read these two otherwise
        names += ["encipher_only", "decipher_only"]
    return {name for name in names if getattr(usage.value, name)}


def test_ca_may_sign_leaf_certificates_only(ca):
    cert = x509.load_pem_x509_certificate(ca[0])
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert granted_usages(cert) == {"key_cert_sign", "crl_sign"}
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.subject == cert.issuer
    assert tls.check_ca(*ca) == []


def test_serving_certificate_is_a_server_leaf_with_every_name_in_the_sans(ca, serving):
    ca_cert = x509.load_pem_x509_certificate(ca[0])
    cert = x509.load_pem_x509_certificate(serving[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == DNS_NAMES
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [IP]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DNS_NAMES[0]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert granted_usages(cert) == {"digital_signature"}  # an ECDSA key: no keyEncipherment
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    now = datetime.now(timezone.utc)
    assert now - timedelta(minutes=30) < cert.not_valid_before_utc < now - timedelta(minutes=1)
    cert.verify_directly_issued_by(ca_cert)


def test_serials_are_random(ca):
    serials = {
        x509.load_pem_x509_certificate(tls.generate_serving(*ca, dns_names=["a"])[0]).serial_number
        for _ in range(3)
    }
    assert len(serials) == 3


def test_a_cn_only_certificate_is_refused(ca):
    with pytest.raises(ValueError, match="at least one DNS name or IP"):
        tls.generate_serving(*ca, dns_names=[], ip_addresses=[])


@pytest.mark.parametrize("names, ips, message", [
    (["-bad.example"], [], "not a valid DNS name"),
    (["has space.example"], [], "not a valid DNS name"),
    (["10.0.0.1"], [], "is an IP address"),
    ([], ["10.0.0.256"], "not an IP address"),
    ([], ["prewarm.svc"], "not an IP address"),
])
def test_unusable_names_are_refused(ca, names, ips, message):
    with pytest.raises(ValueError, match=message):
        tls.generate_serving(*ca, dns_names=names, ip_addresses=ips)


def test_names_longer_than_a_cn_allows_stay_in_the_sans(ca):
    long_name = "w" * 60 + ".prewarm-with-a-long-namespace.svc"
    cert = x509.load_pem_x509_certificate(
        tls.generate_serving(*ca, dns_names=[long_name, "short"])[0])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "short"
    only_long = x509.load_pem_x509_certificate(tls.generate_serving(*ca, dns_names=[long_name])[0])
    assert len(only_long.subject) == 0
    san = only_long.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [long_name]


def test_serving_certificate_never_outlives_its_ca():
    short_ca = tls.generate_ca(days=20)
    cert = x509.load_pem_x509_certificate(tls.generate_serving(*short_ca, dns_names=["a"])[0])
    ca_cert = x509.load_pem_x509_certificate(short_ca[0])
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_client_certificate_carries_user_and_groups(ca):
    cert_pem, key_pem = tls.generate_client(*ca, user="admin", groups=["system:masters"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "system:masters"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert granted_usages(cert) == {"digital_signature"}
    assert tls.check_pair(cert_pem, key_pem, ca[0]) == [
        "certificate is not for serverAuth (ExtendedKeyUsage)"]


# -- check_pair: whether an existing Secret can be reused -------------------------------


def test_check_pair_accepts_a_good_pair(ca, serving):
    assert tls.check_pair(*serving, ca[0], dns_names=DNS_NAMES, ip_addresses=[IP]) == []


def test_check_pair_detects_a_key_that_does_not_match(ca, serving):
    other_key = tls.generate_serving(*ca, dns_names=DNS_NAMES)[1]
    assert tls.check_pair(serving[0], other_key, ca[0]) == ["key does not match the certificate"]


def test_check_pair_detects_a_foreign_ca(serving):
    problems = tls.check_pair(*serving, tls.generate_ca("someone-else")[0])
    assert len(problems) == 1 and "not signed by the CA" in problems[0]


def test_check_pair_accepts_a_ca_bundle_during_rotation(ca, serving):
    bundle = tls.generate_ca("next-ca")[0] + ca[0]
    assert tls.check_pair(*serving, bundle) == []


def test_check_pair_detects_expiry_soon_and_past(ca):
    short = tls.generate_serving(*ca, dns_names=DNS_NAMES, days=10)
    problems = tls.check_pair(*short, ca[0])
    assert len(problems) == 1
    assert problems[0].startswith("certificate expires on") and "less than 30" in problems[0]
    later = datetime.now(timezone.utc) + timedelta(days=400)
    year = tls.generate_serving(*ca, dns_names=DNS_NAMES, days=365)
    problems = tls.check_pair(*year, ca[0], now=later)
    assert len(problems) == 1 and problems[0].startswith("certificate expired on")
    assert tls.check_pair(*year, ca[0], now=later - timedelta(days=100)) == []


def test_check_pair_detects_an_expiring_ca():
    short_ca = tls.generate_ca(days=20)
    pair = tls.generate_serving(*short_ca, dns_names=["a"])
    problems = tls.check_pair(*pair, short_ca[0])
    assert any(p.startswith("CA certificate expires on") for p in problems)
    assert any(p.startswith("CA certificate expires on") for p in tls.check_ca(*short_ca))


def test_check_pair_detects_a_missing_name(ca, serving):
    problems = tls.check_pair(*serving, ca[0],
                              dns_names=["prewarm.other.svc"], ip_addresses=["::1"])
    assert len(problems) == 2
    assert problems[0].startswith("DNS name 'prewarm.other.svc' is not in the certificate's SANs")
    assert problems[1].startswith("IP address '::1' is not in the certificate's SANs")


def test_check_pair_reports_unreadable_pem_instead_of_raising(ca, serving):
    assert tls.check_pair(b"garbage", serving[1], ca[0])[0].startswith("certificate: not a PEM")
    problems = tls.check_pair(serving[0], b"garbage", ca[0])
    assert problems[0].startswith("key: not an unencrypted PEM")


def test_check_ca_detects_a_key_that_does_not_match(ca):
    assert tls.check_ca(ca[0], tls.generate_ca()[1]) == ["CA key does not match the CA certificate"]


# -- the CLI ----------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("PREWARM_") and k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    clean["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "certs", *args], cwd=REPO,
                          env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def test_cli_generate_writes_a_working_set_with_private_keys(tmp_path):
    out = tmp_path / "pki"
    result = run_cli("generate", "--dns", *DNS_NAMES, "--ip", IP, "--out-dir", str(out),
                     "--days", "90")
    assert result.returncode == 0, result.stderr
    files = {name: out / name for name in ("ca.crt", "ca.key", "tls.crt", "tls.key")}
    for name, path in files.items():
        assert f"wrote {path}" in result.stdout
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), (name, oct(mode))
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # no temporary files left
    data = {name: path.read_bytes() for name, path in files.items()}
    assert tls.check_pair(data["tls.crt"], data["tls.key"], data["ca.crt"],
                          dns_names=DNS_NAMES, ip_addresses=[IP]) == []
    assert tls.check_ca(data["ca.crt"], data["ca.key"]) == []

    good = run_cli("check", "--cert", str(files["tls.crt"]), "--key", str(files["tls.key"]),
                   "--ca", str(files["ca.crt"]), "--dns", DNS_NAMES[2], "--ip", IP)
    assert good.returncode == 0 and good.stdout.startswith("ok: "), good
    bad = run_cli("check", "--dns", "prewarm.other.svc", env={
        "PREWARM_TLS_CERT_FILE": str(files["tls.crt"]),
        "PREWARM_TLS_KEY_FILE": str(files["ca.key"]),  # the wrong key
        "PREWARM_TLS_CA_FILE": str(files["ca.crt"]),
    })
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        "problem: key does not match the certificate",
        "problem: DNS name 'prewarm.other.svc' is not in the certificate's SANs "
        f"({', '.join(DNS_NAMES)})",
    ]


def test_cli_generate_takes_settings_from_the_environment(tmp_path):
    result = run_cli("generate", env={"PREWARM_CERT_DNS": "a.example,b.example",
                                      "PREWARM_CERT_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example", "b.example"]


@pytest.mark.parametrize("command", [[], ["generate"], ["secret"], ["check"]], ids=str)
def test_cli_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m certs")


SECRET = ["secret", "--namespace", "ns", "--name", "tls", "--service", "prewarm"]


@pytest.mark.parametrize("args, env, message", [
    (["generate", "--ip", "not-an-ip", "--out-dir", "x"], {},
     "argument --ip: not an IP address: 'not-an-ip'"),
    (["generate", "--out-dir", "x"], {}, "at least one --dns or --ip is needed"),
    (["generate", "--dns", "a"], {}, "--out-dir is required"),
    (["generate", "--dns", "a", "--out-dir", "x"], {"PREWARM_CERT_DAYS": "soon"},
     "PREWARM_CERT_DAYS: not a whole number"),
    (["generate", "--dns", "a", "--out-dir", "x", "--days", "0"], {},
     "argument --days: must be at least 1"),
    (["secret", "--name", "tls", "--service", "prewarm"], {}, "--namespace is required"),
    (SECRET, {}, "no cluster to talk to"),
    (["frobnicate"], {}, "invalid choice: 'frobnicate'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_cli_bad_arguments_exit_2_with_a_message(args, env, message, tmp_path):
    result = run_cli(*args, env={"HOME": str(tmp_path), **env})  # no ~/.kube/config
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (REPO / "x").exists()


def test_cli_check_of_a_missing_file_is_one_line(tmp_path):
    result = run_cli("check", "--cert", str(tmp_path / "nope.crt"), "--key", "k", "--ca", "c")
    assert result.returncode == 1
    missing = tmp_path / "nope.crt"
    assert result.stderr == f"error: cannot read {missing}: No such file or directory\n"


def test_cli_secret_finds_the_cluster_in_kube_config_as_the_observer_does(tmp_path):
    (tmp_path / ".kube").mkdir()
    unreachable_kubeconfig(tmp_path).rename(tmp_path / ".kube" / "config")
    result = run_cli(*SECRET, env={"HOME": str(tmp_path)})
    assert result.returncode == 1  # it tried that cluster (not: exit 2, no cluster)
    assert result.stderr.startswith("error: cannot reach the API server")


def test_cli_secret_with_an_unreachable_api_server_is_one_line(tmp_path):
    result = run_cli(*SECRET, "--kubeconfig", str(unreachable_kubeconfig(tmp_path)))
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach the API server")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
