"""A real Kubernetes control plane on loopback, for the tests, the demo and the benchmarks.

etcd + kube-apiserver (RBAC, client-certificate and ServiceAccount-token authentication,
PodSecurity admission), and optionally kube-controller-manager, kube-scheduler and kwok
with fake Ready nodes, so a DaemonSet really gets one Running pod per node. This is the
controller-runtime envtest approach, with the binaries built from Go modules by
hack/build-binaries.sh.

    python -m hack.controlplane up [--nodes N] [--dir DIR]   # background, prints KUBECONFIG
    python -m hack.controlplane down [--dir DIR]

Every wait has a deadline; a process that dies or never becomes ready raises
`ControlPlaneError` with the tail of its log. `stop()` ends every process started here
(by pid, SIGTERM then SIGKILL) and removes the temporary folder.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from certs import tls

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "hack" / "build-binaries.sh"
STATE_FILE = "controlplane.json"
DEFAULT_CLUSTER_DIR = REPO / ".cache" / "cluster"
SERVICE_CIDR = "10.96.0.0/16"

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """A binary is missing, a process died, or something was not ready in time."""


# -- binaries --------------------------------------------------------------------------

def binary_dirs() -> list[Path]:
    out = subprocess.run([str(BUILD_SCRIPT), "--print-dirs"], check=True, text=True,
                         capture_output=True).stdout
    return [Path(line) for line in out.split()]


# binaries the build script can build on their own (`build-binaries.sh NAME`): the unit
# tests need refcheck, not a control plane
BUILT_ALONE = frozenset({"refcheck"})


def find_binary(name: str, *, build: bool = True) -> Path:
    """Path of a built binary; runs hack/build-binaries.sh (with its progress output) if
    any is missing, so `pytest` alone works on a fresh machine."""
    for directory in binary_dirs():
        if (directory / name).is_file():
            return directory / name
    if build:
        argv = [str(BUILD_SCRIPT)] + ([name] if name in BUILT_ALONE else [])
        print(f"controlplane: {name} not built yet; running {' '.join(argv)}", file=sys.stderr)
        result = subprocess.run(argv, stdout=sys.stderr, stderr=sys.stderr)
        if result.returncode != 0:
            raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}")
        return find_binary(name, build=False)
    raise ControlPlaneError(f"{name} not found in {binary_dirs()}; run {BUILD_SCRIPT}")


def cert_manager_crds() -> list[Path]:
    """cert-manager's CRD manifests (installed by the build script beside the binaries)."""
    for attempt in range(2):
        crds = sorted(binary_dirs()[4].glob("*.yaml"))
        if crds:
            return crds
        if attempt == 0:
            subprocess.run([str(BUILD_SCRIPT)], stdout=sys.stderr, stderr=sys.stderr)
    raise ControlPlaneError(f"cert-manager CRDs missing; run {BUILD_SCRIPT}")


# -- small utilities ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], T | None], *, timeout: float,
             interval: float = 0.1, alive: Callable[[], None] | None = None) -> T:
    """Polls `check` until it returns a truthy value; raises ControlPlaneError naming
    `what` after `timeout` seconds. `alive` is called each round to fail fast when a
    process we wait on has died."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if alive is not None:
            alive()
        try:
            value = check()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - remembered and reported on timeout
            last_error = error
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Process:
    name: str
    pid: int
    log: Path
    popen: subprocess.Popen | None = None

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # a zombie child of an exited `up` is not running, and after a reboot or PID reuse
        # the pid may belong to something else: only ours if it runs the same binary
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as handle:
                if handle.read().split(")")[-1].split()[0] == "Z":
                    return False
            with open(f"/proc/{self.pid}/cmdline", "rb") as handle:
                return os.path.basename(handle.read().split(b"\0")[0]).decode() == self.name
        except OSError:
            return False

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if not self.running():
            raise ControlPlaneError(f"{self.name} exited; last lines of {self.log}:\n{self.tail()}")

    def stop(self, timeout: float = 10) -> None:
        if not self.running():
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            if self.popen is not None:
                try:
                    self.popen.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.1)
        if self.running():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self.popen is not None:
                self.popen.wait(timeout=timeout)


# -- the control plane ----------------------------------------------------------------

@dataclass
class ControlPlane:
    workdir: Path
    apiserver_port: int = 0
    etcd_port: int = 0
    processes: list[Process] = field(default_factory=list)
    owns_workdir: bool = True
    node_names: list[str] = field(default_factory=list)

    # paths inside workdir
    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (user `admin`, group `system:masters`)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def ca_pem(self) -> bytes:
        return (self.pki / "ca.crt").read_bytes()

    def process(self, name: str) -> Process:
        for proc in self.processes:
            if proc.name == name:
                return proc
        raise KeyError(name)

    # -- processes ------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> Process:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            # A session of its own: `up` can exit and leave it running, and stop() can
            # signal the whole group.
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Process(name=name, pid=popen.pid, log=log, popen=popen)
        self.processes.append(proc)
        self._save_state()
        return proc

    def _save_state(self) -> None:
        state = {"workdir": str(self.workdir), "apiserver_port": self.apiserver_port,
                 "etcd_port": self.etcd_port, "nodes": self.node_names,
                 "processes": [{"name": p.name, "pid": p.pid, "log": str(p.log)}
                               for p in self.processes]}
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def from_state(cls, workdir: Path) -> ControlPlane:
        state = json.loads((workdir / STATE_FILE).read_text())
        plane = cls(workdir=workdir, apiserver_port=state["apiserver_port"],
                    etcd_port=state["etcd_port"], owns_workdir=False,
                    node_names=state.get("nodes", []))
        plane.processes = [Process(name=p["name"], pid=p["pid"], log=Path(p["log"]))
                           for p in state["processes"]]
        return plane

    def stop(self, *, remove: bool | None = None) -> None:
        """Stops every process started for this control plane, newest first."""
        for proc in reversed(self.processes):
            proc.stop()
        if remove if remove is not None else self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- PKI ------------------------------------------------------------------------
    def _write_pki(self) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = tls.generate_ca("prewarm-test-cluster-ca")
        (self.pki / "ca.crt").write_bytes(ca_cert)
        (self.pki / "ca.key").write_bytes(ca_key)
        cert, key = tls.generate_serving(
            ca_cert, ca_key, dns_names=["localhost", "kubernetes", "kubernetes.default",
                                        "kubernetes.default.svc"],
            ip_addresses=["127.0.0.1", "10.96.0.1"])
        (self.pki / "apiserver.crt").write_bytes(cert)
        (self.pki / "apiserver.key").write_bytes(key)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.pki / "sa.key").write_bytes(sa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        (self.pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self._write_user_kubeconfig(self.kubeconfig, "admin", ["system:masters"])

    def _kubeconfig(self, path: Path, user: str, credentials: dict) -> Path:
        doc = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "prewarm-test", "cluster": {
                "server": self.url, "certificate-authority-data": _b64(self.ca_pem)}}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": user, "context": {"cluster": "prewarm-test", "user": user}}],
            "current-context": user,
        }
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path

    def _write_user_kubeconfig(self, path: Path, user: str, groups: list[str]) -> Path:
        cert, key = tls.generate_client(self.ca_pem, (self.pki / "ca.key").read_bytes(),
                                        user=user, groups=groups, days=2)
        return self._kubeconfig(path, user, {"client-certificate-data": _b64(cert),
                                             "client-key-data": _b64(key)})

    def kubeconfig_for_user(self, user: str, groups: list[str] | None = None) -> Path:
        """A kubeconfig authenticating as `user` (client certificate) in `groups`."""
        path = self.workdir / "users" / f"{user.replace(':', '_')}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        return self._write_user_kubeconfig(path, user, groups or [])

    def kubeconfig_for_service_account(self, namespace: str, name: str) -> Path:
        """A kubeconfig with a bound token (TokenRequest API) for the ServiceAccount: it
        authenticates exactly as a pod running under that identity would."""
        from kubernetes import client

        api = client.CoreV1Api(self.api_client())
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))
        token = api.create_namespaced_service_account_token(name, namespace, request)
        path = self.workdir / "users" / f"sa-{namespace}-{name}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        return self._kubeconfig(path, f"system:serviceaccount:{namespace}:{name}",
                                {"token": token.status.token})

    def api_client(self, kubeconfig: Path | None = None):
        """A kubernetes.client.ApiClient (admin unless another kubeconfig is given)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    # -- health ---------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        admin = yaml.safe_load(self.kubeconfig.read_text())["users"][0]["user"]
        cert = self.workdir / "pki" / "admin-client.pem"
        if not cert.exists():
            cert.write_bytes(base64.b64decode(admin["client-certificate-data"]) +
                             base64.b64decode(admin["client-key-data"]))
            cert.chmod(0o600)
        context.load_cert_chain(str(cert))
        try:
            with urllib.request.urlopen(self.url + path, context=context,
                                        timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def ready(self) -> bool:
        try:
            return self._get("/readyz")[0] == 200
        except OSError:
            return False

    # -- start ----------------------------------------------------------------------
    def start_etcd(self, timeout: float) -> None:
        self.etcd_port, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{peer}"
        proc = self._spawn("etcd", [
            str(find_binary("etcd")), "--name=prewarm-test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=prewarm-test={peer_url}",
            # throwaway data: no fsync keeps startup and writes fast on a busy CI disk
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=4294967296",
        ])

        def healthy() -> bool:
            with urllib.request.urlopen(client_url + "/health", timeout=1) as response:
                return json.loads(response.read()).get("health") == "true"

        wait_for("etcd /health", healthy, timeout=timeout, alive=proc.check_alive)

    def start_apiserver(self, timeout: float, *, extra_args: list[str] | None = None) -> None:
        self.apiserver_port = self.apiserver_port or free_port()
        pki = self.pki
        proc = self._spawn("kube-apiserver", [
            str(find_binary("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            # PodSecurity is on by default; named here because the tests rely on it.
            # ServiceAccount admission is off as in envtest: it would reject pods until
            # the controller-manager has created each namespace's `default` account.
            "--enable-admission-plugins=PodSecurity",
            "--disable-admission-plugins=ServiceAccount",
            "--profiling=false",
            *(extra_args or []),
        ])
        wait_for("kube-apiserver /readyz", self.ready, timeout=timeout, alive=proc.check_alive)

    def start_controllers(self, timeout: float) -> None:
        kcm = self._spawn("kube-controller-manager", [
            str(find_binary("kube-controller-manager")),
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*,-nodeipam,-bootstrapsigner,-tokencleaner,-persistentvolume-binder",
            "--concurrent-daemonset-syncs=5",
        ])
        scheduler = self._spawn("kube-scheduler", [
            str(find_binary("kube-scheduler")),
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0",
        ])
        kcm.check_alive()
        scheduler.check_alive()

    def start_kwok(self) -> None:
        kwok = find_binary("kwok")
        stages = sorted((kwok.parent.parent / "stages").glob("*.yaml"))
        if not stages:
            raise ControlPlaneError(f"no kwok stages next to {kwok}; run {BUILD_SCRIPT}")
        self._spawn("kwok", [
            str(kwok), f"--kubeconfig={self.kubeconfig}",
            *(f"--config={stage}" for stage in stages),
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--manage-nodes-with-label-selector=",
            # a test sets this annotation on a pod to write its status itself (a
            # simulated image pull failure) without kwok overwriting it
            "--disregard-status-with-annotation-selector=kwok.x-k8s.io/status=custom",
            "--disregard-status-with-label-selector=",
            "--cidr=10.244.0.1/16", "--node-ip=10.0.0.1",
            "--node-lease-duration-seconds=40",
        ])

    def add_nodes(self, count: int, timeout: float = 60) -> list[str]:
        """Creates `count` fake nodes that kwok keeps Ready; waits until they are Ready."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        names = []
        for index in range(len(self.node_names), len(self.node_names) + count):
            name = f"kwok-node-{index}"
            core.create_node(client.V1Node(
                metadata=client.V1ObjectMeta(
                    name=name,
                    annotations={"kwok.x-k8s.io/node": "fake",
                                 "node.alpha.kubernetes.io/ttl": "0"},
                    labels={"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64", "type": "kwok"}),
                status=client.V1NodeStatus(
                    allocatable={"cpu": "32", "memory": "256Gi", "pods": "110"},
                    capacity={"cpu": "32", "memory": "256Gi", "pods": "110"})))
            names.append(name)
        self.node_names.extend(names)
        self._save_state()

        def all_ready() -> bool:
            ready = 0
            for node in core.list_node(label_selector="type=kwok").items:
                conditions = {c.type: c.status for c in node.status.conditions or []}
                ready += conditions.get("Ready") == "True" and node.metadata.name in names
            return ready == len(names)

        wait_for(f"{count} kwok nodes Ready", all_ready, timeout=timeout, interval=0.25,
                 alive=self.process("kwok").check_alive)
        return names

    # -- API server restarts (the tests' "API server down" scenarios) ---------------
    def stop_apiserver(self) -> None:
        proc = self.process("kube-apiserver")
        proc.stop()
        self.processes.remove(proc)
        self._save_state()

    def restart_apiserver(self, timeout: float = 60) -> None:
        self.start_apiserver(timeout)


def start(*, nodes: int = 0, controllers: bool | None = None, workdir: Path | None = None,
          timeout: float = 90, extra_apiserver_args: list[str] | None = None) -> ControlPlane:
    """Starts etcd + kube-apiserver (and, with `nodes` or `controllers`, the
    controller-manager, the scheduler and kwok with `nodes` fake nodes). On any failure
    everything already started is stopped before the error propagates."""
    owns = workdir is None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="prewarm-cp-"))
    else:
        workdir.mkdir(parents=True, exist_ok=True)
    plane = ControlPlane(workdir=workdir, owns_workdir=owns)
    # the apiserver URL is written into kubeconfigs, so its port is fixed before the PKI
    plane.apiserver_port = free_port()
    try:
        plane._write_pki()
        plane.start_etcd(timeout)
        plane.start_apiserver(timeout, extra_args=extra_apiserver_args)
        if controllers or (controllers is None and nodes):
            plane.start_controllers(timeout)
            plane.start_kwok()
            if nodes:
                plane.add_nodes(nodes, timeout=timeout)
    except BaseException:
        plane.stop()
        raise
    return plane


# -- CLI (make cluster / make cluster-down) ------------------------------------------

def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hack.controlplane",
        description="Start or stop a local control plane (etcd, kube-apiserver, "
                    "controller-manager, scheduler, kwok nodes) in the background.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start in the background and print export KUBECONFIG=...")
    up.add_argument("--nodes", type=int, default=3, help="fake kwok nodes (default 3)")
    up.add_argument("--dir", type=Path, default=DEFAULT_CLUSTER_DIR,
                    help=f"state folder (default {DEFAULT_CLUSTER_DIR})")
    down = sub.add_parser("down", help="stop what `up` started and remove its folder")
    down.add_argument("--dir", type=Path, default=DEFAULT_CLUSTER_DIR)
    args = parser.parse_args(argv)

    if args.command == "up":
        if (args.dir / STATE_FILE).exists():
            old = ControlPlane.from_state(args.dir)
            if any(p.running() for p in old.processes):
                print(f"a control plane is already running from {args.dir}; "
                      f"`make cluster-down` first", file=sys.stderr)
                print(f"export KUBECONFIG={old.kubeconfig.resolve()}")
                return 1
            shutil.rmtree(args.dir)
        started = time.monotonic()
        print(f"starting etcd, kube-apiserver, controllers and {args.nodes} kwok nodes in "
              f"{args.dir} ...", file=sys.stderr)
        try:
            plane = start(nodes=args.nodes, controllers=True, workdir=args.dir)
        except ControlPlaneError as error:
            print(f"control plane failed to start: {error}", file=sys.stderr)
            return 1
        print(f"ready in {time.monotonic() - started:.1f}s: {plane.url}; logs in "
              f"{args.dir / 'logs'}", file=sys.stderr)
        print(f"export KUBECONFIG={plane.kubeconfig.resolve()}")
        return 0

    if not (args.dir / STATE_FILE).exists():
        print(f"no control plane state in {args.dir}; nothing to stop", file=sys.stderr)
        return 0
    plane = ControlPlane.from_state(args.dir)
    plane.stop(remove=True)
    print(f"stopped {len(plane.processes)} processes and removed {args.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
