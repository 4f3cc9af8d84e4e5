"""`make demo`: Prewarm's whole loop on a local control plane.

1. start etcd, kube-apiserver, controller-manager, scheduler and kwok with 3 fake nodes;
2. apply the chart's pre-created objects and RBAC (learned-images, the DaemonSet, the
   Lease, ServiceAccounts, Roles) to namespace `prewarm`;
3. run the observer and the reconciler as local processes, each authenticated as the
   chart's own ServiceAccount (so the demo runs with the chart's least privilege);
4. register the chart's ValidatingWebhookConfiguration, clientConfig rewritten to the
   local observer's URL and CA;
5. label namespace `demo`, deploy a sample workload, and print learned-images, the
   DaemonSet's init containers and its pods per node.

DEMO_EXIT=1 exits after printing (CI); otherwise it stays up until Ctrl-C and prints the
KUBECONFIG to explore with.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from kubernetes import client

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hack import controlplane  # noqa: E402
from hack.controlplane import find_binary, free_port, wait_for  # noqa: E402

NAMESPACE, DEMO_NS, RELEASE = "prewarm", "demo", "prewarm"
NODES = 3
# Objects the chart creates that the demo needs; the Deployments, Service and cert Jobs
# are replaced by local processes and a local certificate.
PRE_CREATED = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
               "ConfigMap", "DaemonSet", "Lease"}
SAMPLE = [
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
     "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
              "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                  "initContainers": [{"name": "migrate", "image": "ghcr.io/acme/migrate:1.4"}],
                  "containers": [{"name": "web", "image": "nginx:1.27"},
                                 {"name": "proxy", "image": "envoyproxy/envoy:v1.31.0"}]}}}},
    {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "report"},
     "spec": {"schedule": "0 6 * * *", "jobTemplate": {"spec": {"template": {"spec": {
         "restartPolicy": "OnFailure",
         "containers": [{"name": "report", "image": "quay.io/jupyter/scipy-notebook:2024-10-07"}]}}}}}},
]


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def kubectl(kubeconfig: Path, *args: str) -> str:
    result = subprocess.run([str(find_binary("kubectl")), "--kubeconfig", str(kubeconfig), *args],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def chart(namespace: str) -> list[dict]:
    out = subprocess.run([str(find_binary("helm")), "template", RELEASE,
                          str(REPO / "deploy" / "helm" / "prewarm"), "--namespace", namespace,
                          "--set", "certs.mode=job"],
                         check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PREWARM_")}
    full.update(env, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=full, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(
        prog="python -m hack.demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) must run the cleanup below like Ctrl-C does: the
    # control plane and the Prewarm processes run in sessions of their own and would
    # otherwise outlive the demo
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="prewarm-demo-"))
    processes: list[subprocess.Popen] = []
    step(f"starting a local control plane: etcd, kube-apiserver, controllers, kwok with "
         f"{NODES} fake nodes (state in {workdir})")
    plane = controlplane.start(nodes=NODES, workdir=workdir / "cluster")
    kubeconfig = plane.kubeconfig
    print(f"    ready: {plane.url}, nodes: {', '.join(plane.node_names)}")
    try:
        core = client.CoreV1Api(plane.api_client())
        step(f"applying the chart's pre-created objects and RBAC to namespace {NAMESPACE}")
        core.create_namespace({"metadata": {"name": NAMESPACE, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted"}}})
        docs = chart(NAMESPACE)
        wanted = [d for d in docs if d["kind"] in PRE_CREATED
                  and "helm.sh/hook" not in (d["metadata"].get("annotations") or {})]
        manifest = workdir / "chart-objects.yaml"
        manifest.write_text(yaml.safe_dump_all(wanted))
        print(kubectl(kubeconfig, "apply", "--server-side", "-f", str(manifest)).rstrip())

        step("generating the observer's serving certificate (python -m certs generate)")
        tls_dir = workdir / "tls"
        subprocess.run([sys.executable, "-m", "certs", "generate", "--dns", "localhost", "--ip",
                        "127.0.0.1", "--out-dir", str(tls_dir)], check=True, cwd=REPO)

        step("starting the observer and the reconciler as the chart's ServiceAccounts")
        observer_kc = plane.kubeconfig_for_service_account(NAMESPACE, f"{RELEASE}-observer")
        reconciler_kc = plane.kubeconfig_for_service_account(NAMESPACE, f"{RELEASE}-reconciler")
        port = free_port()
        processes.append(start(
            [sys.executable, "-m", "webhook", "serve"],
            {"KUBECONFIG": str(observer_kc), "PREWARM_NAMESPACE": NAMESPACE,
             "PREWARM_PORT": str(port), "PREWARM_BIND_ADDRESS": "127.0.0.1",
             "PREWARM_TLS_CERT_FILE": str(tls_dir / "tls.crt"),
             "PREWARM_TLS_KEY_FILE": str(tls_dir / "tls.key")},
            workdir / "observer.log"))
        processes.append(start(
            [sys.executable, "-m", "webhook", "reconcile"],
            {"KUBECONFIG": str(reconciler_kc), "PREWARM_NAMESPACE": NAMESPACE,
             "PREWARM_HELPER_IMAGE": "ghcr.io/prewarm/prewarm:0.1.0",
             "PREWARM_RESYNC_PERIOD": "30s", "PREWARM_HEALTH_PORT": "0"},
            workdir / "reconciler.log"))
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))

        def observer_up() -> bool:
            if processes[0].poll() is not None:
                raise SystemExit(f"the observer exited; see {workdir / 'observer.log'}")
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context,
                                        timeout=2) as response:
                return response.status == 200

        wait_for("the observer's /healthz", observer_up, timeout=30, interval=0.2)
        print(f"    observer: https://127.0.0.1:{port} (log {workdir / 'observer.log'})")
        print(f"    reconciler: log {workdir / 'reconciler.log'}")

        step("registering the chart's ValidatingWebhookConfiguration, clientConfig -> the "
             "local observer")
        webhook = copy.deepcopy(next(d for d in docs if d["kind"] == "ValidatingWebhookConfiguration"))
        ca = (tls_dir / "ca.crt").read_bytes()
        for hook in webhook["webhooks"]:
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}/observe",
                                    "caBundle": base64.b64encode(ca).decode()}
        (workdir / "webhook.yaml").write_text(yaml.safe_dump(webhook))
        print(kubectl(kubeconfig, "apply", "-f", str(workdir / "webhook.yaml")).rstrip())

        step(f"labelling namespace {DEMO_NS} prewarm.io/learn=enabled and deploying a sample "
             f"workload (a Deployment with an init container and a sidecar, a CronJob)")
        core.create_namespace({"metadata": {"name": DEMO_NS}})
        print(kubectl(kubeconfig, "label", "namespace", DEMO_NS, "prewarm.io/learn=enabled").rstrip())
        (workdir / "sample.yaml").write_text(yaml.safe_dump_all(SAMPLE))
        # the API server reads new webhook configurations asynchronously; apply again
        # until the observer has seen the workload
        expected = {"docker.io/library/nginx:1.27", "docker.io/envoyproxy/envoy:v1.31.0",
                    "ghcr.io/acme/migrate:1.4", "quay.io/jupyter/scipy-notebook:2024-10-07"}

        def learned() -> dict:
            cm = core.read_namespaced_config_map("learned-images", NAMESPACE)
            return {json.loads(v)["image"]: json.loads(v) for v in (cm.data or {}).values()}

        def applied_and_learned() -> bool:
            for proc in processes:
                if proc.poll() is not None:
                    raise SystemExit(f"a Prewarm process exited; see the logs in {workdir}")
            kubectl(kubeconfig, "apply", "-n", DEMO_NS, "-f", str(workdir / "sample.yaml"))
            if expected <= set(learned()):
                return True
            # the API server may not have loaded the webhook configuration yet when the
            # sample was created: touch the workloads so their UPDATE is reviewed again
            attempts.append(1)
            kubectl(kubeconfig, "annotate", "-n", DEMO_NS, "--overwrite", "deployment/web",
                    "cronjob/report", f"demo.prewarm.io/attempt={len(attempts)}")
            return False

        attempts: list[int] = []

        wait_for("the sample's images in learned-images", applied_and_learned, timeout=60,
                 interval=1)
        print(f"    learned: {', '.join(sorted(expected))}")

        step(f"waiting for DaemonSet prewarm-images to pull them on all {NODES} nodes")
        apps = client.AppsV1Api(plane.api_client())

        def warm() -> bool:
            ds = apps.read_namespaced_daemon_set("prewarm-images", NAMESPACE)
            images = {c.image for c in ds.spec.template.spec.init_containers or []}
            states = {r["image"]: r["state"] for r in learned().values()}
            return expected <= images and all(states.get(i) == "warm" for i in expected)

        wait_for("all images warm", warm, timeout=120, interval=1)

        step(f"kubectl get configmap learned-images -n {NAMESPACE} -o yaml")
        print(kubectl(kubeconfig, "get", "configmap", "learned-images", "-n", NAMESPACE,
                      "-o", "yaml").rstrip())
        step("the DaemonSet's init containers (one pull-<hash> per image)")
        print(kubectl(kubeconfig, "get", "daemonset", "prewarm-images", "-n", NAMESPACE, "-o",
                      "jsonpath={range .spec.template.spec.initContainers[*]}"
                      "{.name}{'\\t'}{.image}{'\\t'}{.command}{'\\n'}{end}").rstrip())
        step("the DaemonSet's pods, one per node")
        print(kubectl(kubeconfig, "get", "pods", "-n", NAMESPACE, "-l",
                      "app.kubernetes.io/component=prepuller", "-o", "wide").rstrip())
        step("python -m webhook status")
        status = subprocess.run([sys.executable, "-m", "webhook", "status"], cwd=REPO,
                                env={**os.environ, "KUBECONFIG": str(kubeconfig),
                                     "PREWARM_NAMESPACE": NAMESPACE, "PYTHONPATH": str(REPO)},
                                capture_output=True, text=True)
        print(status.stdout.rstrip() or status.stderr)
        print(f"\ndemo complete in {time.monotonic() - started:.0f}s")
        if os.environ.get("DEMO_EXIT") == "1":
            return 0
        print(f"\nexplore with:\n  export KUBECONFIG={kubeconfig}\n  kubectl get configmap "
              f"learned-images -n {NAMESPACE} -o yaml\nCtrl-C stops everything.")
        while True:
            signal.pause()
    except KeyboardInterrupt:
        return 0
    except Exception as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        for name in ("observer", "reconciler"):
            log = workdir / f"{name}.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"--- last lines of the {name} log ---", *tail, sep="\n", file=sys.stderr)
        return 1
    finally:
        for proc in processes:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(20)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue  # then SIGKILL
        plane.stop(remove=True)
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
