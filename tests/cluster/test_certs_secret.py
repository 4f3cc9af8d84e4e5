"""The certificate tool's Kubernetes side (certs/kube.py) against the real API server:
the TLS Secret written once whoever races for it, renewed from the same CA, and kept
with what others added to it. The Job that runs it, as its own identity, is in
test_chart_install.py."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from kubernetes import client

from certs import kube, tls
from tests.support import new_namespace_name

DNS = ["prewarm.certs-test.svc"]


@pytest.fixture
def namespace(core):
    name = new_namespace_name("certs")
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def stored(core, namespace: str, name: str) -> dict[str, bytes]:
    secret = core.read_namespaced_secret(name, namespace)
    assert secret.type == "kubernetes.io/tls"
    return {k: base64.b64decode(v) for k, v in secret.data.items()}


def test_writers_racing_for_the_secret_all_end_with_the_first_ones(cluster, namespace):
    def ensure(_index: int):
        # a client each, as separate Job pods or replicas would have
        return kube.ensure_secret(client.CoreV1Api(cluster.api_client()), namespace=namespace,
                                  name="race-tls", dns_names=DNS)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ensure, range(6)))
    actions = sorted(action for _, action in results)
    assert actions == ["created"] + ["reused"] * 5
    on_server = stored(client.CoreV1Api(cluster.api_client()), namespace, "race-tls")
    for data, _ in results:
        assert data["ca.crt"] == on_server["ca.crt"]
        assert data["tls.crt"] == on_server["tls.crt"]
    assert tls.check_pair(on_server["tls.crt"], on_server["tls.key"], on_server["ca.crt"],
                          dns_names=DNS) == []


def test_an_expiring_pair_is_renewed_from_the_same_ca_keeping_others_metadata(
        core, namespace):
    ca, ca_key = tls.generate_ca()
    cert, key = tls.generate_serving(ca, ca_key, dns_names=DNS, days=10)  # < 30 days left
    data = {"tls.crt": cert, "tls.key": key, "ca.crt": ca, "ca.key": ca_key}
    core.create_namespaced_secret(namespace, {
        "metadata": {"name": "old-tls", "annotations": {"team.example.com/owner": "platform"}},
        "type": "kubernetes.io/tls",
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()}})

    renewed, action = kube.ensure_secret(core, namespace=namespace, name="old-tls",
                                         dns_names=DNS)
    assert action == "renewed"
    on_server = stored(core, namespace, "old-tls")
    assert on_server["tls.crt"] == renewed["tls.crt"] != cert
    # the same CA: the caBundle already in the webhook configurations stays valid
    assert on_server["ca.crt"] == ca and on_server["ca.key"] == ca_key
    new = x509.load_pem_x509_certificate(on_server["tls.crt"])
    old = x509.load_pem_x509_certificate(cert)
    assert new.not_valid_after_utc > old.not_valid_after_utc
    assert tls.check_pair(on_server["tls.crt"], on_server["tls.key"], ca, dns_names=DNS) == []
    meta = core.read_namespaced_secret("old-tls", namespace).metadata
    assert meta.annotations["team.example.com/owner"] == "platform"
    assert meta.labels["app.kubernetes.io/managed-by"] == "prewarm-certs"

    again, action = kube.ensure_secret(core, namespace=namespace, name="old-tls",
                                       dns_names=DNS)
    assert action == "reused" and again["tls.crt"] == renewed["tls.crt"]


def test_a_new_ca_is_bundled_with_the_one_it_replaces_while_that_one_is_valid(
        core, namespace):
    """The CA is replaced (here: 10 days left, under the 30-day margin). The webhook's
    pods serve the old pair until the kubelet updates their Secret: the caBundle must
    trust both, or the API server's calls fail in between."""
    old_ca, old_ca_key = tls.generate_ca(days=10)
    cert, key = tls.generate_serving(old_ca, old_ca_key, dns_names=DNS, days=5)
    data = {"tls.crt": cert, "tls.key": key, "ca.crt": old_ca, "ca.key": old_ca_key}
    core.create_namespaced_secret(namespace, {
        "metadata": {"name": "ca-tls"}, "type": "kubernetes.io/tls",
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()}})

    renewed, action = kube.ensure_secret(core, namespace=namespace, name="ca-tls",
                                         dns_names=DNS)
    assert action == "renewed"
    on_server = stored(core, namespace, "ca-tls")
    bundle = x509.load_pem_x509_certificates(on_server["ca.crt"])
    assert len(bundle) == 2 and bundle[1] == x509.load_pem_x509_certificate(old_ca)
    assert on_server["ca.key"] != old_ca_key  # the new CA (first) signs from now on
    # the new pair and the one still being served both verify against the bundle
    assert tls.check_pair(on_server["tls.crt"], on_server["tls.key"], on_server["ca.crt"],
                          dns_names=DNS) == []
    assert not any("not signed" in problem for problem in tls.check_pair(
        cert, key, on_server["ca.crt"], dns_names=DNS))
    again, action = kube.ensure_secret(core, namespace=namespace, name="ca-tls",
                                       dns_names=DNS)
    assert action == "reused" and again["ca.crt"] == on_server["ca.crt"]


def test_the_pre_install_run_skips_webhook_configurations_not_there_yet(cluster, namespace):
    import subprocess
    import uuid

    from tests.support import python_env, python_module

    admission = client.AdmissionregistrationV1Api(cluster.api_client())
    present, absent = f"present-{uuid.uuid4().hex[:6]}", f"absent-{uuid.uuid4().hex[:6]}"
    admission.create_validating_webhook_configuration({"metadata": {"name": present},
        "webhooks": [{"name": "observe.prewarm.io", "admissionReviewVersions": ["v1"],
                      "sideEffects": "None", "failurePolicy": "Ignore",
                      "clientConfig": {"url": "https://127.0.0.1:1/observe"},
                      "rules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                 "operations": ["CREATE"], "resources": ["configmaps"],
                                 "scope": "Namespaced"}],
                      "namespaceSelector": {"matchLabels": {"nothing": "matches"}}}]})
    try:
        def run(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(python_module(
                "certs", "secret", "--namespace", namespace, "--name", "pre-tls",
                "--dns", DNS[0], "--validating-webhook", present, "--validating-webhook",
                absent, "--kubeconfig", str(cluster.kubeconfig), *extra),
                env=python_env(), capture_output=True, text=True, timeout=120)

        refused = run()
        assert refused.returncode != 0 and absent in refused.stderr
        skipping = run("--skip-missing-webhooks")
        assert skipping.returncode == 0, skipping.stderr
        assert f"validatingwebhookconfiguration {present}: caBundle updated" in skipping.stdout
        assert f"validatingwebhookconfiguration {absent}: caBundle not there yet, skipped" \
            in skipping.stdout
        config = admission.read_validating_webhook_configuration(present)
        assert kube._bundle_bytes(config.webhooks[0].client_config.ca_bundle) == stored(
            client.CoreV1Api(cluster.api_client()), namespace, "pre-tls")["ca.crt"]
    finally:
        admission.delete_validating_webhook_configuration(present)
