"""The test control plane itself: real objects, real webhooks, real RBAC, kwok nodes."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from certs import tls
from hack.controlplane import free_port
from tests.support import NODES, eventually

POD = {"apiVersion": "v1", "kind": "Pod",
       "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]}}


def pod(name: str) -> dict:
    return {**POD, "metadata": {"name": name}}


def test_namespace_and_pod_round_trip(core, namespace_factory):
    namespace = namespace_factory("roundtrip")
    core.create_namespaced_pod(namespace, pod("web"))
    read = core.read_namespaced_pod("web", namespace)
    assert read.spec.containers[0].image == "nginx:1.27"
    assert read.metadata.uid and read.metadata.namespace == namespace
    assert core.read_namespace(namespace).status.phase == "Active"


class _Recorder(BaseHTTPRequestHandler):
    calls: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        answer = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "response": {"uid": body["request"]["uid"], "allowed": True}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args):
        pass


@pytest.fixture
def tls_recorder(tmp_path):
    ca, ca_key = tls.generate_ca()
    cert, key = tls.generate_serving(ca, ca_key, dns_names=["localhost"],
                                     ip_addresses=["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    _Recorder.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Recorder)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, ca
    server.shutdown()
    server.server_close()


def test_api_server_calls_a_url_webhook_and_ignores_it_when_down(cluster, core,
                                                                 namespace_factory, tls_recorder):
    server, ca = tls_recorder
    namespace = namespace_factory("hooked", {"hook-test": "yes"})
    admission = client.AdmissionregistrationV1Api(cluster.api_client())
    name = f"recorder-{namespace}"
    admission.create_validating_webhook_configuration({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "record.prewarm.test",
            "clientConfig": {"url": f"https://127.0.0.1:{server.server_address[1]}/record",
                             "caBundle": __import__("base64").b64encode(ca).decode()},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "failurePolicy": "Ignore", "sideEffects": "None", "timeoutSeconds": 2,
            "admissionReviewVersions": ["v1"]}]})
    try:
        # webhook configurations reach the API server's admission chain asynchronously
        def seen() -> bool:
            core.create_namespaced_pod(namespace, {**POD, "metadata": {"generateName": "p-"}})
            return any(c["request"]["namespace"] == namespace for c in _Recorder.calls)

        eventually("the API server to call the webhook", seen, timeout=30, interval=0.5)
        call = next(c for c in _Recorder.calls if c["request"]["namespace"] == namespace)
        assert call["request"]["object"]["spec"]["containers"][0]["image"] == "nginx:1.27"

        server.shutdown()
        server.server_close()
        created = core.create_namespaced_pod(namespace, pod("while-down"))
        assert created.metadata.name == "while-down"
    finally:
        admission.delete_validating_webhook_configuration(name)


def test_daemonset_gets_one_running_pod_per_kwok_node(cluster, core, apps, namespace_factory):
    namespace = namespace_factory("ds")
    labels = {"app": "everywhere"}
    apps.create_namespaced_daemon_set(namespace, {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "everywhere"},
        "spec": {"selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "c", "image": "pause:3.10"}]}}}})

    def running_nodes():
        pods = core.list_namespaced_pod(namespace, label_selector="app=everywhere").items
        nodes = {p.spec.node_name for p in pods if p.status.phase == "Running"}
        return nodes if len(nodes) == NODES else None

    nodes = eventually(f"{NODES} Running DaemonSet pods", running_nodes, timeout=90)
    assert nodes == set(cluster.node_names)


def test_service_account_kubeconfig_is_refused_what_rbac_does_not_grant(cluster, core,
                                                                        namespace_factory):
    namespace = namespace_factory("rbac")
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "cm-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "cm-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "visible"}})
    as_reader = client.CoreV1Api(cluster.api_client(
        cluster.kubeconfig_for_service_account(namespace, "reader")))

    assert as_reader.read_namespaced_config_map("visible", namespace).metadata.name == "visible"
    for forbidden in (lambda: as_reader.list_namespaced_secret(namespace),
                      lambda: as_reader.create_namespaced_config_map(
                          namespace, {"metadata": {"name": "nope"}}),
                      lambda: as_reader.list_namespaced_config_map("default")):
        with pytest.raises(client.ApiException) as refused:
            forbidden()
        assert refused.value.status == 403
    user = client.CoreV1Api(cluster.api_client(cluster.kubeconfig_for_user("jane", ["devs"])))
    with pytest.raises(client.ApiException) as refused:
        user.list_namespace()
    assert refused.value.status == 403 and "jane" in refused.value.body


def test_make_cluster_runs_in_the_background_and_cluster_down_leaves_nothing(tmp_path):
    import os
    import subprocess
    import sys

    from hack.controlplane import ControlPlane, find_binary
    from tests.support import REPO

    state = tmp_path / "cluster"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # a relative folder, as `make cluster`'s default is
    up = subprocess.run([sys.executable, "-m", "hack.controlplane", "up", "--nodes", "1",
                         "--dir", "cluster"], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=180)
    assert up.returncode == 0, up.stderr
    # an absolute path: the line is pasted into shells anywhere, not only in the repo
    assert up.stdout.strip() == f"export KUBECONFIG={state.resolve() / 'admin.kubeconfig'}"
    pids = [p.pid for p in ControlPlane.from_state(state).processes]
    try:
        # `up` has exited; the control plane keeps serving, to kubectl run from elsewhere
        # with the printed KUBECONFIG
        nodes = subprocess.run([str(find_binary("kubectl")), "get", "nodes", "-o", "name"],
                               env={**os.environ, "KUBECONFIG": up.stdout.strip().split("=", 1)[1]},
                               cwd="/", capture_output=True, text=True, timeout=60)
        assert nodes.stdout.split() == ["node/kwok-node-0"], nodes.stderr
    finally:
        down = subprocess.run([sys.executable, "-m", "hack.controlplane", "down", "--dir",
                               str(state)], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")
                and open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"]
