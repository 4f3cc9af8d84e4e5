"""webhook/kube.py: one-line descriptions of errors for the logs (describe_error), and
how every command finds its cluster (kubeconfig_path, api_client)."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException

from tests.support import unreachable_kubeconfig
from webhook import kube
from webhook.kube import describe_error


class Response:
    """What the client's REST layer hands ApiException: status, reason, body, headers."""

    def __init__(self, status: int, reason: str, body: object):
        self.status, self.reason = status, reason
        self.data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.headers = {"Audit-Id": "0b4c", "Content-Type": "application/json"}


def test_an_api_error_is_one_line_with_the_servers_message_and_no_headers():
    error = ApiException(http_resp=Response(403, "Forbidden", {
        "kind": "Status", "code": 403, "message": 'leases.coordination.k8s.io "prewarm" is '
        'forbidden: User "system:serviceaccount:p:r" cannot create resource "leases"'}))
    assert "\n" in str(error) and "Audit-Id" in str(error)  # the client's own rendering
    assert describe_error(error) == (
        'HTTP 403 Forbidden: leases.coordination.k8s.io "prewarm" is forbidden: User '
        '"system:serviceaccount:p:r" cannot create resource "leases"')


def test_a_body_that_is_not_a_status_and_other_errors_still_read_on_one_line():
    assert describe_error(ApiException(http_resp=Response(502, "Bad Gateway", b"<html>\n"
                                                          b"proxy down</html>"))) == \
        "HTTP 502 Bad Gateway: <html> proxy down</html>"
    assert describe_error(ConnectionRefusedError(111, "Connection refused")) == \
        "ConnectionRefusedError: [Errno 111] Connection refused"
    assert len(describe_error(ValueError("x" * 1000))) == 300


# -- finding the cluster (kubeconfig_path): as kubectl does, the same for every command --

@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home directory without ~/.kube/config, no KUBECONFIG, not in a pod."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def kubeconfig_file(path):
    """A kubeconfig at `path` (see tests.support.unreachable_kubeconfig)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return unreachable_kubeconfig(path.parent).rename(path)


def test_the_cluster_is_found_in_kubectl_s_order(home, tmp_path, monkeypatch):
    with pytest.raises(kube.NoCluster, match="set KUBECONFIG, create ~/.kube/config, or run "
                       "in a pod"):
        kube.kubeconfig_path()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert kube.kubeconfig_path() is None  # in a pod
    default = kubeconfig_file(home / ".kube" / "config")
    assert kube.kubeconfig_path() == str(default)  # kubectl's file wins over the pod's
    named = kubeconfig_file(tmp_path / "named")
    monkeypatch.setenv("KUBECONFIG", f"{named}:{default}")
    assert kube.kubeconfig_path() == f"{named}:{default}"  # the list, merged by the client
    given = kubeconfig_file(tmp_path / "given")
    assert kube.kubeconfig_path(str(given)) == str(given)


def test_a_kubeconfig_list_skips_missing_and_empty_entries_as_kubectl_does(home, tmp_path,
                                                                           monkeypatch):
    present = kubeconfig_file(tmp_path / "present")
    monkeypatch.setenv("KUBECONFIG", f":/nowhere/config::{present}")
    with kube.api_client() as api:
        assert api.configuration.host in present.read_text()


def test_a_kubeconfig_asked_for_but_missing_is_an_error_not_a_fallback(home, monkeypatch):
    kubeconfig_file(home / ".kube" / "config")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBECONFIG", "/nowhere/config:/elsewhere/config")
    with pytest.raises(kube.KubeconfigError, match="no file of KUBECONFIG exists: "
                       "/nowhere/config, /elsewhere/config"):
        kube.api_client()
    monkeypatch.setenv("KUBECONFIG", "/nowhere/config")
    with pytest.raises(kube.KubeconfigError, match="kubeconfig /nowhere/config does not exist"):
        kube.check_config()
    with pytest.raises(kube.KubeconfigError, match="kubeconfig /nowhere/x does not exist"):
        kube.api_client("/nowhere/x")


@pytest.mark.parametrize("text, reason", [
    ("clusters: [unclosed", "while parsing"),
    ("apiVersion: v1\nkind: Config\ncurrent-context: gone\ncontexts: []\n", "gone"),
])
def test_an_unusable_kubeconfig_is_one_clear_error(home, text, reason):
    (home / ".kube").mkdir()
    (home / ".kube" / "config").write_text(text)
    with pytest.raises(kube.KubeconfigError, match=f"kubeconfig {home}/.kube/config is not "
                       "usable: .*" + reason):
        kube.api_client()


def test_the_client_never_writes_refreshed_credentials_into_the_kubeconfig(home, monkeypatch):
    """The client writes a kubeconfig back only when it refreshes credentials (OIDC, a
    cloud provider's token), which a test cannot make it do: the call is checked."""
    kubeconfig_file(home / ".kube" / "config")
    calls = []
    real = kube.config.new_client_from_config

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(kube.config, "new_client_from_config", spy)
    kube.api_client().close()
    assert calls == [{"config_file": str(home / ".kube" / "config"), "persist_config": False}]
