"""The Kubernetes side of the certificate tool: the TLS Secret and the caBundle.

Used by the Helm hook Job when cert-manager is not installed. Every replica or Job that
runs `ensure_secret` ends up with the same Secret: it is created once (the first writer
wins the create, everyone else reads the winner's) and changed only when it is invalid
or about to expire, with a resourceVersion precondition so two renewals cannot both win.

Functions take the API objects as arguments (no global config), so tests can pass
clients bound to a test control plane; API errors propagate as `ApiException`.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from certs import tls

logger = logging.getLogger(__name__)

__all__ = [
    "LABELS",
    "SECRET_KEYS",
    "CertsError",
    "SecretAction",
    "SecretStillChanging",
    "WebhookConfigurationNotFound",
    "ensure_secret",
    "patch_ca_bundle",
]

LABELS = {
    "app.kubernetes.io/name": "prewarm",
    "app.kubernetes.io/managed-by": "prewarm-certs",
    "app.kubernetes.io/component": "certs",
}

# ca.key is kept so the serving pair can be re-issued from the same CA: the caBundle in
# the webhook configurations then stays valid across renewals.
SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt", "ca.key")
TLS_SECRET_TYPE = "kubernetes.io/tls"

SecretAction = Literal["created", "reused", "renewed"]

# Bound on read/decide/write rounds lost to other writers; each loss means someone else
# just wrote a valid Secret, so a second round normally ends in "reused".
_ATTEMPTS = 5


class CertsError(Exception):
    """An expected failure with a message fit for a user (the CLI prints it, no traceback)."""


class WebhookConfigurationNotFound(CertsError, LookupError):
    def __init__(self, missing: Sequence[tuple[str, str]]):
        self.missing = list(missing)
        names = ", ".join(f"{kind}webhookconfiguration {name!r}" for kind, name in missing)
        super().__init__(f"not found: {names}")


class SecretStillChanging(CertsError):
    pass


# -- Secret -----------------------------------------------------------------------------


def _decode(data: dict[str, str] | None) -> dict[str, bytes]:
    decoded: dict[str, bytes] = {}
    for key, value in (data or {}).items():
        try:
            if isinstance(value, str):
                value = base64.b64decode(value, validate=True)
            decoded[key] = value
        except binascii.Error:
            decoded[key] = b""  # reported as an unusable value by _problems
    return decoded


def _encode(data: dict[str, bytes]) -> dict[str, str]:
    return {key: base64.b64encode(value).decode("ascii") for key, value in data.items()}


def _problems(
    data: dict[str, bytes],
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    now: datetime | None,
) -> list[str]:
    missing = [key for key in ("tls.crt", "tls.key", "ca.crt") if not data.get(key)]
    if missing:
        return [f"no {', '.join(missing)} in the Secret"]
    return tls.check_pair(
        data["tls.crt"], data["tls.key"], data["ca.crt"],
        dns_names=dns_names, ip_addresses=ip_addresses, now=now,
    )


def _issue(
    old: dict[str, bytes] | None,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    days: int,
    ca_days: int,
    now: datetime | None,
) -> dict[str, bytes]:
    """A serving pair from the stored CA while that CA is usable, else from a new CA.

    A new CA's `ca.crt` also carries the one it replaces while that one has not expired:
    the webhook's pods keep serving the old pair until the kubelet updates their mounted
    Secret, and a caBundle holding both is trusted whichever pair they serve."""
    ca_crt, ca_key = (old or {}).get("ca.crt"), (old or {}).get("ca.key")
    if ca_crt and ca_key:
        ca_problems = tls.check_ca(ca_crt, ca_key, now=now)
        if ca_problems:
            logger.info("new CA, the stored one cannot be reused: %s", "; ".join(ca_problems))
            ca_crt = ca_key = None
    else:
        ca_crt = ca_key = None
    bundle = None
    if ca_crt is None or ca_key is None:
        ca_crt, ca_key = tls.generate_ca(days=ca_days)
        bundle = ca_crt + tls.still_valid_first((old or {}).get("ca.crt"), now=now)
    crt, key = tls.generate_serving(
        ca_crt, ca_key, dns_names=dns_names, ip_addresses=ip_addresses, days=days
    )
    return {"tls.crt": crt, "tls.key": key, "ca.crt": bundle or ca_crt, "ca.key": ca_key}


def _new_body(namespace: str, name: str, data: dict[str, bytes]) -> client.V1Secret:
    return client.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=dict(LABELS)),
        type=TLS_SECRET_TYPE,
        data=_encode(data),
    )


def _replacement_body(existing: client.V1Secret, data: dict[str, bytes]) -> client.V1Secret:
    """`existing` with new data: same resourceVersion (the precondition), its other
    metadata kept (annotations, owners, finalizers), our labels added, and its type
    unchanged because the API server refuses to change a Secret's type."""
    meta = existing.metadata
    meta.labels = {**(meta.labels or {}), **LABELS}
    meta.managed_fields = None  # None keeps the server's record as it is
    return client.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=meta,
        type=existing.type or TLS_SECRET_TYPE,
        immutable=existing.immutable,
        data=_encode({**_decode(existing.data), **data}),
    )


def _read_secret(api: client.CoreV1Api, namespace: str, name: str) -> client.V1Secret | None:
    try:
        return api.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def ensure_secret(
    api: client.CoreV1Api,
    *,
    namespace: str,
    name: str,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    days: int = 365,
    ca_days: int = 3650,
    now: datetime | None = None,
) -> tuple[dict[str, bytes], SecretAction]:
    """Make sure Secret `namespace/name` holds a valid pair for these names.

    Returns the Secret's data (keys `tls.crt`, `tls.key`, `ca.crt`, `ca.key`, values
    PEM bytes) and what happened:
    - "reused": it existed and `tls.check_pair` found no problem (also when another
      writer created it between our read and our create: theirs is used, not ours);
    - "created": it did not exist and our create won;
    - "renewed": it existed but was invalid or expiring (as of `now`); the serving pair
      was re-issued from the stored CA if that CA is still good, else from a new CA,
      and written with the read resourceVersion, so a concurrent renewal makes one of
      the two re-read the other's.
    ValueError for unusable names; `ApiException` for API failures other than those
    races; `SecretStillChanging` if the races do not settle.
    """
    dns = [tls.normalize_dns_name(n) for n in dns_names]
    ips = [tls.normalize_ip_address(ip) for ip in ip_addresses]
    if not dns and not ips:
        raise ValueError("ensure_secret needs at least one DNS name or IP address")

    for _ in range(_ATTEMPTS):
        existing = _read_secret(api, namespace, name)
        if existing is None:
            data = _issue(None, dns, ips, days, ca_days, now)
            try:
                api.create_namespaced_secret(namespace, _new_body(namespace, name, data))
            except ApiException as exc:
                if exc.status != 409:
                    raise
                logger.info("Secret %s/%s was created by another writer; reading it",
                            namespace, name)
                continue
            logger.info("Secret %s/%s created", namespace, name)
            return data, "created"

        stored = _decode(existing.data)
        problems = _problems(stored, dns, ips, now)
        if not problems:
            return {k: v for k, v in stored.items() if k in SECRET_KEYS}, "reused"

        logger.info("Secret %s/%s needs a new pair: %s", namespace, name, "; ".join(problems))
        data = _issue(stored, dns, ips, days, ca_days, now)
        try:
            api.replace_namespaced_secret(name, namespace, _replacement_body(existing, data))
        except ApiException as exc:
            # 409: someone changed it since our read; 404: someone deleted it. Either
            # way, decide again from what is there now.
            if exc.status not in (404, 409):
                raise
            logger.info("Secret %s/%s changed under us (%s); re-reading",
                        namespace, name, exc.status)
            continue
        return data, "renewed"

    raise SecretStillChanging(
        f"Secret {namespace}/{name} kept changing under us ({_ATTEMPTS} attempts); "
        "is another writer using different DNS names?"
    )


# -- caBundle ---------------------------------------------------------------------------


def _bundle_bytes(value: str | bytes | None) -> bytes | None:
    """The PEM a clientConfig.caBundle holds, however the client model surfaced it."""
    if value is None:
        return None
    if isinstance(value, bytes):
        if value.lstrip().startswith(b"-----BEGIN"):
            return value
        value = value.decode("ascii", "replace")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        return None


def patch_ca_bundle(
    admission_api: client.AdmissionregistrationV1Api,
    *,
    ca_pem: bytes,
    validating: Sequence[str] = (),
    mutating: Sequence[str] = (),
    skip_missing: bool = False,
    missing: list[tuple[str, str]] | None = None,
) -> list[str]:
    """Set `webhooks[*].clientConfig.caBundle` to `ca_pem` on the named configurations.

    Writes only the webhooks whose bundle differs (a no-op run changes nothing and
    returns []); returns the names of the configurations changed. Every named
    configuration is read before anything is written, and a missing one raises
    WebhookConfigurationNotFound naming all that are missing, unless `skip_missing`
    (before an install has created them), which leaves those out and adds them to
    `missing`.

    Each write is a JSON patch that tests the webhook's name at its index, so a
    concurrent edit that reorders the list fails the patch instead of giving a bundle
    to the wrong webhook; that configuration is then read and patched again.
    """
    api = admission_api
    kinds = {
        "validating": (api.read_validating_webhook_configuration,
                       api.patch_validating_webhook_configuration),
        "mutating": (api.read_mutating_webhook_configuration,
                     api.patch_mutating_webhook_configuration),
    }
    targets = [("validating", n) for n in validating] + [("mutating", n) for n in mutating]

    absent = []
    for kind, name in targets:
        try:
            kinds[kind][0](name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            absent.append((kind, name))
    if absent and not skip_missing:
        raise WebhookConfigurationNotFound(absent)
    if missing is not None:
        missing.extend(absent)
    targets = [target for target in targets if target not in absent]

    encoded = base64.b64encode(ca_pem).decode("ascii")
    changed: list[str] = []
    for kind, name in targets:
        read, patch = kinds[kind]
        for attempt in range(_ATTEMPTS):
            config = read(name)
            ops: list[dict] = []
            for i, webhook in enumerate(config.webhooks or []):
                current = webhook.client_config.ca_bundle if webhook.client_config else None
                if _bundle_bytes(current) != ca_pem:
                    ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": webhook.name})
                    ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle",
                                "value": encoded})
            if not ops:
                break
            try:
                patch(name, ops, _content_type="application/json-patch+json")
            except ApiException as exc:
                # 422: a test op failed (the list changed since our read); 409: conflict.
                if exc.status not in (409, 422) or attempt == _ATTEMPTS - 1:
                    raise
                continue
            logger.info("%swebhookconfiguration %s: caBundle set on %d webhook(s)",
                        kind, name, len(ops) // 2)
            changed.append(name)
            break
    return changed
