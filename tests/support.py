"""Helpers shared by the cluster tests: polling with a deadline and child processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

from hack.controlplane import wait_for

REPO = Path(__file__).resolve().parents[1]
NODES = 5


def eventually(what: str, check: Callable[[], object], timeout: float = 30,
               interval: float = 0.2):
    """Polls `check` until truthy (no sleeps to wait for state in the tests)."""
    return wait_for(what, check, timeout=timeout, interval=interval)


class Process:
    """A child process with its output in a log file, stopped at teardown (and, as a
    safety net, by the session fixture `no_leftover_processes`)."""

    started: list["Process"] = []

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        Process.started.append(self)
        self.log = log
        self._out = open(log, "wb")
        self.popen = subprocess.Popen(argv, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                      cwd=REPO, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"process exited with {self.popen.returncode}:\n"
                                 f"{self.output()[-3000:]}")

    def stop(self, sig: int = 15, timeout: float = 20) -> None:
        """Signals the whole process group (gunicorn's workers too) and waits."""
        try:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, 9)
            self.popen.wait(timeout)
        # workers orphaned by a killed master are still in the group
        try:
            os.killpg(self.popen.pid, 9)
        except ProcessLookupError:
            pass
        self._out.close()


def loopback_ipv6() -> bool:
    """Whether ::1 is there to connect to. Not the same as IPv6 sockets being available:
    a container whose network has IPv6 turned off (Docker's default) has the sockets and
    no ::1."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def python_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREWARM_")}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    return env


def python_module(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def unreachable_kubeconfig(folder: Path) -> Path:
    """A kubeconfig in `folder` whose API server is a loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n")
    return kubeconfig


# -- the chart ---------------------------------------------------------------------------

CHART = REPO / "deploy" / "helm" / "prewarm"


def helm_template(namespace: str, *sets: str, release: str = "prewarm") -> list[dict]:
    """`helm template` of the chart, as a list of objects."""
    import yaml

    from hack.controlplane import find_binary

    argv = [str(find_binary("helm")), "template", release, str(CHART), "--namespace", namespace]
    for item in sets:
        argv += ["--set", item]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def chart_object(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"expected one {kind} *{name_suffix}, got {len(matches)}"
    return matches[0]


def webhook_for_url(config: dict, url: str, ca_pem: bytes, name: str) -> dict:
    """The chart's webhook configuration, pointed at a local URL instead of the Service."""
    import base64
    import copy

    config = copy.deepcopy(config)
    config["metadata"] = {"name": name, "labels": config["metadata"].get("labels", {})}
    for hook in config["webhooks"]:
        hook["clientConfig"] = {"url": url + hook["clientConfig"]["service"]["path"],
                                "caBundle": base64.b64encode(ca_pem).decode()}
    return config


def register_chart_webhook(plane, observer, release_ns: str, *sets: str,
                           kind: str = "ValidatingWebhookConfiguration") -> tuple[str, dict]:
    """Registers the chart's webhook configuration of `kind`, pointed at `observer`;
    returns its name and the chart's version of it. Undo with unregister_webhook."""
    from kubernetes import client

    config = chart_object(helm_template(release_ns, *sets), kind)
    suffix = "observe" if kind.startswith("Validating") else "mutate"
    name = f"{release_ns}-{suffix}"
    api = client.AdmissionregistrationV1Api(plane.api_client())
    body = webhook_for_url(config, observer.url, observer.ca, name)
    if kind.startswith("Validating"):
        api.create_validating_webhook_configuration(body)
    else:
        api.create_mutating_webhook_configuration(body)
    return name, config


def unregister_webhook(plane, name: str, kind: str = "ValidatingWebhookConfiguration") -> None:
    from kubernetes import client

    api = client.AdmissionregistrationV1Api(plane.api_client())
    try:
        if kind.startswith("Validating"):
            api.delete_validating_webhook_configuration(name)
        else:
            api.delete_mutating_webhook_configuration(name)
    except client.ApiException:
        pass


def apiserver_metric(plane, name: str, *labels: str) -> float:
    """Sum of the API server's own counter `name` (from its /metrics) over the series
    whose labels include every one of `labels` (`'verb="LIST"'`)."""
    from hack.controlplane import find_binary

    text = subprocess.run([str(find_binary("kubectl")), "--kubeconfig", str(plane.kubeconfig),
                           "get", "--raw", "/metrics"], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(label in line for label in labels))


def compact_etcd(plane) -> str:
    """Compacts the plane's etcd up to its current revision (the API server does this
    every 5 minutes), so a watch from any earlier resourceVersion gets 410 Gone.
    Returns that revision."""
    import json
    import urllib.request

    base = f"http://127.0.0.1:{plane.etcd_port}/v3/kv"

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    revision = post("/range", {"key": "AA==", "limit": 1})["header"]["revision"]
    post("/compaction", {"revision": revision, "physical": True})
    return revision


# -- the observer as a real gunicorn server --------------------------------------------

class Observer:
    """`python -m webhook serve` on 127.0.0.1 over TLS (certs from the certs package),
    writing to learned-images in `namespace` of the control plane `plane`."""

    def __init__(self, plane, namespace: str, workdir: Path, *, kubeconfig: Path | None = None,
                 env: dict[str, str] | None = None, workers: int = 2):
        from certs import tls
        from hack.controlplane import free_port

        self.plane, self.namespace, self.workdir = plane, namespace, workdir
        self.ca, ca_key = tls.generate_ca()
        cert, key = tls.generate_serving(self.ca, ca_key, dns_names=["localhost"],
                                         ip_addresses=["127.0.0.1"])
        self.ca_key = ca_key
        (workdir / "ca.crt").write_bytes(self.ca)
        (workdir / "tls.crt").write_bytes(cert)
        (workdir / "tls.key").write_bytes(key)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.process = Process(
            python_module("webhook", "serve", "--port", str(self.port),
                          "--bind-address", "127.0.0.1",
                          "--tls-cert-file", str(workdir / "tls.crt"),
                          "--tls-key-file", str(workdir / "tls.key"),
                          "--namespace", namespace, "--workers", str(workers)),
            python_env(**{"KUBECONFIG": str(kubeconfig or plane.kubeconfig),
                          "PREWARM_FLUSH_INTERVAL": "0.2s", **(env or {})}),
            workdir / "observer.log")
        wait_for("observer /healthz", lambda: self.get("/healthz")[0] == 200, timeout=30,
                 alive=self.process.alive)

    def workers(self) -> set[int]:
        """The pids of gunicorn's worker processes (the master's children)."""
        found = subprocess.run(["pgrep", "-P", str(self.process.popen.pid)],
                               capture_output=True, text=True).stdout.split()
        return {int(pid) for pid in found}

    def replace_worker(self, sig: int) -> None:
        """Sends `sig` to the only worker and waits until the master has started another
        (the observer must run with workers=1)."""
        (old,) = wait_for("the worker", self.workers, timeout=30)
        os.kill(old, sig)
        wait_for("a new worker", lambda: (self.workers() - {old}) or None, timeout=30)

    def ssl_context(self):
        import ssl

        return ssl.create_default_context(cafile=str(self.workdir / "ca.crt"))

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        import http.client

        connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                                 context=self.ssl_context())
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            return self.request("GET", path)
        except OSError:
            return 0, b""

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples on /metrics; `name` may carry labels
        (`prewarm_reviews_total{kind="Pod",result="observed"}`) to pick one series."""
        total = 0.0
        for line in self.get("/metrics")[1].decode().splitlines():
            if line.startswith("#"):
                continue
            series = line.rsplit(" ", 1)[0]
            if series == name or ("{" not in name and series.startswith(name + "{")):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.process.stop()


def learned_images(core, namespace: str, name: str = "learned-images") -> dict[str, dict]:
    """image -> record, read from the ConfigMap like `kubectl get -o yaml` shows it."""
    import json

    from kubernetes.client import ApiException

    try:
        cm = core.read_namespaced_config_map(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return {}
        raise
    records = {}
    for value in (cm.data or {}).values():
        record = json.loads(value)
        records[record["image"]] = record
    return records


def new_namespace_name(prefix: str) -> str:
    import uuid

    return f"{prefix}-{uuid.uuid4().hex[:6]}"
