"""Prewarm's certificate tool, for installs without cert-manager (`python -m certs`).

`certs.tls` generates and checks a CA and serving pair (pure, `cryptography` only);
`certs.kube` stores them in a Secret once and patches the webhook configurations'
caBundle. The pure part is re-exported here; `certs.kube` is imported on its own so that
generating a pair does not load the Kubernetes client.
"""

from certs.tls import (
    RENEW_BEFORE,
    check_ca,
    check_pair,
    describe,
    generate_ca,
    generate_client,
    generate_serving,
    service_dns_names,
)

__all__ = [
    "RENEW_BEFORE",
    "check_ca",
    "check_pair",
    "describe",
    "generate_ca",
    "generate_client",
    "generate_serving",
    "service_dns_names",
]
