"""Certificate generation and checks: pure functions over PEM bytes, `cryptography` only.

Nothing here reads files or talks to the API server; `kube.py` and the CLI do that, so
the test-suite can build a CA and a serving pair for 127.0.0.1 in-process.

Key type: ECDSA P-256 for both the CA and the serving certificate.
- The only TLS client of the webhook is kube-apiserver (Go `crypto/tls`), which verifies
  P-256 chains natively, as does the OpenSSL behind Python's `ssl` on the serving side.
- Key generation is instant; RSA-2048 generation costs tens to hundreds of milliseconds
  with a long tail, paid at every hook run and in every test that builds a pair.
- The server signs in every full handshake, and a P-256 signature is several times
  cheaper than an RSA-2048 private-key operation; certificates and the `caBundle` are
  a fraction of the size. Security is ~128 bits, above RSA-2048's ~112.
The readers below still accept RSA keys (a CA or pair someone else made), and the
serving KeyUsage follows the key type (keyEncipherment only for RSA).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "RENEW_BEFORE",
    "check_ca",
    "check_pair",
    "describe",
    "generate_ca",
    "generate_client",
    "generate_serving",
    "normalize_dns_name",
    "normalize_ip_address",
    "service_dns_names",
]

# A pair that expires within this window is reported by check_pair, so the Helm hook
# re-issues it on the next upgrade well before the API server starts failing handshakes.
RENEW_BEFORE = timedelta(days=30)

# notBefore is back-dated so a node whose clock runs a little behind ours (the API server
# verifying the webhook, a test container) does not see a "not yet valid" certificate.
CLOCK_SKEW = timedelta(minutes=5)

# X.509 limits CN to 64 characters; longer names live only in the SANs.
_CN_MAX = 64

_DNS_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


# -- names ------------------------------------------------------------------------------


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names a Service is reached by inside the cluster, shortest first.

    kube-apiserver calls `<svc>.<ns>.svc`; the others cover clients that use the short
    forms or the fully qualified name with the default cluster domain.
    """
    if not service or not namespace:
        raise ValueError("service and namespace must both be non-empty")
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def normalize_dns_name(name: str) -> str:
    """`name` lower-cased, or ValueError saying why it cannot be a DNS SAN.

    A wildcard is allowed only as the whole leftmost label (`*.example.com`). An IP
    address is refused: verifiers match IP hostnames against IP SANs only, so it
    would silently never match.
    """
    text = name.strip().lower().rstrip(".")
    if not text:
        raise ValueError("empty DNS name")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        raise ValueError(f"{name!r} is an IP address, not a DNS name (pass it as an IP)")
    if len(text) > 253 or not text.isascii():
        raise ValueError(f"not a valid DNS name: {name!r} (ASCII, at most 253 characters)")
    labels = text.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 1:
            continue
        if not _DNS_LABEL.fullmatch(label):
            raise ValueError(f"not a valid DNS name: {name!r} (bad label {label!r})")
    return text


def normalize_ip_address(text: str) -> str:
    """Canonical text of an IPv4/IPv6 address, or ValueError."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None


def _dedupe(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


# -- generation -------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


_KEY_USAGES = ("digital_signature", "content_commitment", "key_encipherment",
              "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
              "encipher_only", "decipher_only")


def _key_usage(*granted: str) -> x509.KeyUsage:
    """The KeyUsage extension with only the `granted` usages set (cryptography's
    constructor wants all nine flags spelled out)."""
    unknown = sorted(set(granted) - set(_KEY_USAGES))
    if unknown:
        raise ValueError(f"unknown key usage {', '.join(unknown)}")
    return x509.KeyUsage(**{usage: usage in granted for usage in _KEY_USAGES})


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")


def generate_ca(common_name: str = "prewarm-ca", days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed CA that may sign leaf certificates only: (cert PEM, key PEM)."""
    _check_days(days)
    key = _new_key()
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        # path_length=0: this CA signs serving certificates, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage("key_cert_sign", "crl_sign"), critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def generate_serving(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    days: int = 365,
) -> tuple[bytes, bytes]:
    """A serving certificate signed by the CA: (cert PEM, key PEM).

    Every name goes into the SubjectAlternativeName: verifiers (Go since 1.15, Python's
    ssl) ignore the CN, so a CN-only certificate is refused here with ValueError. The
    CN is the first name that fits X.509's 64 characters. The validity ends no later
    than the CA's, so a pair never outlives its chain.
    """
    _check_days(days)
    dns = _dedupe([normalize_dns_name(n) for n in dns_names])
    ips = _dedupe([normalize_ip_address(ip) for ip in ip_addresses])
    if not dns and not ips:
        raise ValueError("a serving certificate needs at least one DNS name or IP address")
    cn = next((n for n in [*dns, *ips] if len(n) <= _CN_MAX), None)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return _leaf(
        ca_cert_pem, ca_key_pem,
        subject=[x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [],
        sans=sans,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        days=days,
    )


def generate_client(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    *,
    user: str,
    groups: Sequence[str] = (),
    days: int = 365,
) -> tuple[bytes, bytes]:
    """A client certificate signed by the CA: (cert PEM, key PEM).

    kube-apiserver's client-certificate authenticator reads the user name from the CN
    and the groups from the O attributes (as in `system:masters`).
    """
    _check_days(days)
    if not user or len(user) > _CN_MAX:
        raise ValueError(f"user must be 1 to {_CN_MAX} characters, got {user!r}")
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    subject.append(x509.NameAttribute(NameOID.COMMON_NAME, user))
    return _leaf(ca_cert_pem, ca_key_pem, subject=subject, sans=[],
                 usage=ExtendedKeyUsageOID.CLIENT_AUTH, days=days)


def _leaf(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    *,
    subject: list[x509.NameAttribute],
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
) -> tuple[bytes, bytes]:
    """An end-entity certificate with a new key, signed by the CA, for one usage."""
    ca_cert = _load_cert(ca_cert_pem, "CA certificate")
    ca_key = _load_key(ca_key_pem, "CA key")
    if not _same_public_key(ca_cert, ca_key):
        raise ValueError("the CA key does not match the CA certificate")

    key = _new_key()
    now = datetime.now(timezone.utc)
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError(f"the CA certificate expired on {_day(ca_cert.not_valid_after_utc)}")
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
    )
    if sans:
        # RFC 5280: with an empty subject the SAN extension must be critical.
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
    cert = (
        builder
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # RSA key exchange encrypts the premaster secret to the key; ECDSA never does.
            _key_usage("digital_signature",
                       *(["key_encipherment"] if isinstance(key, rsa.RSAPrivateKey) else [])),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, _signature_hash(ca_key))
    )
    return _cert_pem(cert), _key_pem(key)


def _signature_hash(key: PrivateKey) -> hashes.HashAlgorithm:
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        return hashes.SHA256()
    raise ValueError(f"unsupported CA key type {type(key).__name__} (use ECDSA or RSA)")


# -- loading ----------------------------------------------------------------------------


def _load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"{what}: not a PEM certificate ({exc})") from None
    return certs


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    """The first certificate of a PEM file (the leaf, when it also carries a chain)."""
    return _load_certs(pem, what)[0]


def _load_key(pem: bytes, what: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"{what}: unsupported key type {type(key).__name__} (use ECDSA or RSA)")
    return key


def _same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


# -- checks -----------------------------------------------------------------------------


def _day(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    return now if now.tzinfo else now.replace(tzinfo=timezone.utc)


def _validity_problems(
    cert: x509.Certificate, what: str, now: datetime, renew_before: timedelta
) -> list[str]:
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        return [f"{what} is not valid until {_day(not_before)}"]
    if now >= not_after:
        return [f"{what} expired on {_day(not_after)}"]
    if not_after - now < renew_before:
        left = (not_after - now).days
        return [
            f"{what} expires on {_day(not_after)} (in {left} days, "
            f"less than {renew_before.days})"
        ]
    return []


def _dns_matches(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def check_ca(
    ca_cert_pem: bytes,
    ca_key_pem: bytes | None = None,
    *,
    now: datetime | None = None,
    renew_before: timedelta = RENEW_BEFORE,
) -> list[str]:
    """Problems that stop this CA from issuing another serving pair; empty = usable."""
    when = _utc(now)
    try:
        ca = _load_cert(ca_cert_pem, "CA certificate")
    except ValueError as exc:
        return [str(exc)]
    problems: list[str] = []
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca:
            problems.append("CA certificate is not a CA (BasicConstraints CA=false)")
    except x509.ExtensionNotFound:
        problems.append("CA certificate is not a CA (no BasicConstraints)")
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            problems.append("CA certificate may not sign certificates (no keyCertSign)")
    except x509.ExtensionNotFound:
        pass
    if ca_key_pem is not None:
        try:
            if not _same_public_key(ca, _load_key(ca_key_pem, "CA key")):
                problems.append("CA key does not match the CA certificate")
        except ValueError as exc:
            problems.append(str(exc))
    problems += _validity_problems(ca, "CA certificate", when, renew_before)
    return problems


def check_pair(
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    now: datetime | None = None,
    renew_before: timedelta = RENEW_BEFORE,
) -> list[str]:
    """Problems with a serving pair; empty = it can be (re)used as it is.

    Looks at what would make the API server's call fail, now or within `renew_before`:
    the key does not match, the certificate is not signed by (any certificate in)
    `ca_pem`, either of them is expired or expiring, the certificate is not for
    serverAuth, or a required DNS name / IP address is not in its SANs. `now` (naive
    means UTC) defaults to the current time.
    """
    when = _utc(now)
    try:
        cert = _load_cert(cert_pem, "certificate")
    except ValueError as exc:
        return [str(exc)]
    problems: list[str] = []

    try:
        if not _same_public_key(cert, _load_key(key_pem, "key")):
            problems.append("key does not match the certificate")
    except ValueError as exc:
        problems.append(str(exc))

    try:
        cas = _load_certs(ca_pem, "CA certificate")
    except ValueError as exc:
        problems.append(str(exc))
    else:
        issuer = next((ca for ca in cas if _directly_issued_by(cert, ca)), None)
        if issuer is None:
            problems.append(
                f"certificate is not signed by the CA (issuer {cert.issuer.rfc4514_string()!r}, "
                f"CA {', '.join(repr(ca.subject.rfc4514_string()) for ca in cas)})"
            )
        else:
            problems += _validity_problems(issuer, "CA certificate", when, renew_before)

    problems += _validity_problems(cert, "certificate", when, renew_before)

    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
            problems.append("certificate is not for serverAuth (ExtendedKeyUsage)")
    except x509.ExtensionNotFound:
        pass  # no EKU means any usage

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have_dns = san.get_values_for_type(x509.DNSName)
        have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        have_dns, have_ips = [], set()
        if dns_names or ip_addresses:
            problems.append("certificate has no SubjectAlternativeName (CN-only)")
    for name in dns_names:
        if not any(_dns_matches(pattern, name) for pattern in have_dns):
            problems.append(
                f"DNS name {name!r} is not in the certificate's SANs "
                f"({', '.join(have_dns) or 'no DNS names'})"
            )
    for ip in ip_addresses:
        if normalize_ip_address(ip) not in have_ips:
            problems.append(
                f"IP address {ip!r} is not in the certificate's SANs "
                f"({', '.join(sorted(have_ips)) or 'no IP addresses'})"
            )
    return problems


def still_valid_first(pem: bytes | None, *, now: datetime | None = None) -> bytes:
    """The first certificate of `pem` (a CA a new one replaces) as PEM, if it can be
    read and has not expired at `now`; else b"" (nothing left worth trusting)."""
    if not pem:
        return b""
    try:
        cert = _load_certs(pem, "CA certificate")[0]
    except (ValueError, IndexError):
        return b""
    if cert.not_valid_after_utc <= _utc(now):
        return b""
    return _cert_pem(cert)


def _directly_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def describe(cert_pem: bytes) -> str:
    """One line naming a certificate: subject, SANs and expiry (for CLI output)."""
    cert = _load_cert(cert_pem, "certificate")
    parts = [cert.subject.rfc4514_string() or "(empty subject)"]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        parts.append("SANs " + ",".join(names))
    except x509.ExtensionNotFound:
        pass
    parts.append("expires " + _day(cert.not_valid_after_utc))
    return ", ".join(parts)
