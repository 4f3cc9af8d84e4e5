"""The Helm chart applied to the real API server: accepted in both TLS modes under the
restricted Pod Security profile, its identities can do exactly their job, and a real
`helm uninstall` and reinstall keep what was learned."""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml
from kubernetes import client

from hack.controlplane import cert_manager_crds, find_binary
from tests.support import (CHART, chart_object, eventually, helm_template, learned_images,
                           new_namespace_name, python_env, python_module)
from webhook import settings as prewarm_settings
from webhook.reconciler import Reconciler
from webhook.store import LearnedImagesStore, Observation, merge

POD_SECURITY = {"pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/warn": "restricted",
                "pod-security.kubernetes.io/audit": "restricted"}


def kubectl(cluster, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(find_binary("kubectl")), "--kubeconfig", str(cluster.kubeconfig),
                           *args], input=stdin, capture_output=True, text=True, timeout=120)


def helm(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(find_binary("helm")), "--kubeconfig", str(cluster.kubeconfig),
                           *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def crds(cluster):
    for crd in cert_manager_crds():
        result = kubectl(cluster, "apply", "--server-side", "-f", str(crd))
        assert result.returncode == 0, result.stderr
    ext = client.ApiextensionsV1Api(cluster.api_client())

    def established() -> bool:
        crd = ext.read_custom_resource_definition("certificates.cert-manager.io")
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    eventually("cert-manager CRDs established", established, timeout=30)


def install(cluster, core, mode: str, release: str) -> tuple[str, list[dict]]:
    namespace = new_namespace_name(release)
    core.create_namespace({"metadata": {"name": namespace, "labels": POD_SECURITY}})
    docs = helm_template(namespace, f"certs.mode={mode}", "mutate.enabled=true", release=release)
    # hooks (cert Jobs, the helm test Pod) are applied too: the API server judges them all
    result = kubectl(cluster, "apply", "--server-side", "--field-manager=helm",
                     "--validate=strict", "-n", namespace, "-f", "-",
                     stdin=yaml.safe_dump_all(docs))
    try:
        assert result.returncode == 0, result.stderr
        # no PodSecurity warning for any pod template, nor any unknown field
        assert "Warning" not in result.stderr, result.stderr
    except AssertionError:
        # what did get applied includes cluster-wide webhook configurations, whose dead
        # endpoint would slow every later test's pods in labelled namespaces
        cleanup(cluster, core, namespace, docs)
        raise
    return namespace, docs


def cleanup(cluster, core, namespace: str, docs: list[dict]) -> None:
    admission = client.AdmissionregistrationV1Api(cluster.api_client())
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    for doc in docs:
        name = doc["metadata"]["name"]
        try:
            if doc["kind"] == "ValidatingWebhookConfiguration":
                admission.delete_validating_webhook_configuration(name)
            elif doc["kind"] == "MutatingWebhookConfiguration":
                admission.delete_mutating_webhook_configuration(name)
            elif doc["kind"] == "ClusterRole":
                rbac.delete_cluster_role(name)
            elif doc["kind"] == "ClusterRoleBinding":
                rbac.delete_cluster_role_binding(name)
        except client.ApiException:
            pass
    core.delete_namespace(namespace)


@pytest.mark.parametrize("mode", ["cert-manager", "job"])
def test_rendered_chart_is_accepted_and_its_pods_pass_restricted_pod_security(
        cluster, core, apps, crds, mode):
    release = "pw-cm" if mode == "cert-manager" else "pw-job"
    namespace, docs = install(cluster, core, mode, release)
    try:
        kinds = {d["kind"] for d in docs}
        if mode == "cert-manager":
            assert {"Issuer", "Certificate"} <= kinds
            custom = client.CustomObjectsApi(cluster.api_client())
            certs = custom.list_namespaced_custom_object("cert-manager.io", "v1", namespace,
                                                         "certificates")["items"]
            serving = next(c for c in certs if not c["spec"].get("isCA"))
            service = next(d["metadata"]["name"] for d in docs if d["kind"] == "Service")
            assert {service, f"{service}.{namespace}", f"{service}.{namespace}.svc"} <= set(
                serving["spec"]["dnsNames"])
        else:
            assert "Job" in kinds and "Issuer" not in kinds
        # the controller-manager creates the observer's and reconciler's pods; PodSecurity
        # (enforce: restricted) would refuse any that breaks the profile
        for deployment in (d for d in docs if d["kind"] == "Deployment"):
            name, replicas = deployment["metadata"]["name"], deployment["spec"]["replicas"]
            selector = ",".join(f"{k}={v}" for k, v in
                                deployment["spec"]["selector"]["matchLabels"].items())
            eventually(f"{replicas} pods of {name}", lambda: len(
                core.list_namespaced_pod(namespace, label_selector=selector).items) == replicas,
                timeout=60)
        placeholder = apps.read_namespaced_daemon_set("prewarm-images", namespace)
        assert placeholder.metadata.labels["app.kubernetes.io/component"] == "prepuller"
    finally:
        cleanup(cluster, core, namespace, docs)


def test_chart_identities_can_do_their_job_and_nothing_else(cluster, core, crds):
    namespace, docs = install(cluster, core, "cert-manager", "pw-rbac")
    try:
        core.create_namespaced_secret(namespace, {"metadata": {"name": "tenant-secret"},
                                                  "stringData": {"k": "v"}})
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "other-config"}})
        observer_sa = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"
                           and d["metadata"]["name"].endswith("observer"))
        reconciler_sa = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"
                             and d["metadata"]["name"].endswith("reconciler"))
        lease = next(d["metadata"]["name"] for d in docs if d["kind"] == "Lease")
        patch = {"metadata": {"annotations": {"prewarm.io/test": "1"}}}

        def as_sa(name: str) -> client.ApiClient:
            return cluster.api_client(cluster.kubeconfig_for_service_account(namespace, name))

        def refused(call) -> None:
            with pytest.raises(client.ApiException) as error:
                call()
            assert error.value.status == 403, error.value

        observer = client.CoreV1Api(as_sa(observer_sa))
        assert observer.read_namespaced_config_map("learned-images", namespace).metadata.name
        observer.patch_namespaced_config_map("learned-images", namespace, patch)
        refused(lambda: observer.read_namespaced_secret("tenant-secret", namespace))
        refused(lambda: observer.patch_namespaced_config_map("other-config", namespace, patch))
        refused(lambda: observer.list_namespaced_pod(namespace))
        refused(lambda: observer.create_namespaced_config_map(namespace, {"metadata": {"name": "x"}}))

        api = as_sa(reconciler_sa)
        reconciler = client.CoreV1Api(api)
        # what the reconciler needs succeeds (any 403 would raise here)
        reconciler.patch_namespaced_config_map("learned-images", namespace, patch)
        assert namespace in {ns.metadata.name for ns in reconciler.list_namespace().items}
        assert reconciler.list_pod_for_all_namespaces(limit=1).kind == "PodList"
        assert [cm.metadata.name for cm in reconciler.list_namespaced_config_map(
            namespace, field_selector="metadata.name=learned-images").items] == ["learned-images"]
        leases = client.CoordinationV1Api(api)
        leases.replace_namespaced_lease(lease, namespace,
                                        leases.read_namespaced_lease(lease, namespace))
        client.AppsV1Api(api).patch_namespaced_daemon_set("prewarm-images", namespace, patch)
        refused(lambda: reconciler.read_namespaced_secret("tenant-secret", namespace))
        refused(lambda: reconciler.list_secret_for_all_namespaces())
        refused(lambda: reconciler.patch_namespaced_config_map("other-config", namespace, patch))
        refused(lambda: reconciler.delete_namespaced_pod("anything", namespace))
        refused(lambda: client.AppsV1Api(api).list_deployment_for_all_namespaces())

        # the errors an operator reads name the cause, in the API server's words
        from webhook.store import LearnedImagesStore, StoreUnavailable

        other = LearnedImagesStore(observer, namespace=namespace, name="other-config")
        with pytest.raises(StoreUnavailable) as error:
            other.read()
        assert f"cannot read ConfigMap {namespace}/other-config: HTTP 403" in str(error.value)
        assert f'User "system:serviceaccount:{namespace}:{observer_sa}" cannot get resource ' \
               f'"configmaps"' in str(error.value)
        core.delete_namespaced_config_map("learned-images", namespace)  # by hand
        for identity in (observer, reconciler):
            store = LearnedImagesStore(identity, namespace=namespace, name="learned-images")
            with pytest.raises(StoreUnavailable) as error:
                store.read()
            assert f"ConfigMap {namespace}/learned-images is missing and this identity may " \
                   f"not create it" in str(error.value)
            assert "`helm upgrade` restores it" in str(error.value)
        # the Lease too: no replica can lead, and each says why
        from webhook.reconciler import LeaseElector, LeaseMissing
        from webhook.settings import Settings

        client.CoordinationV1Api(cluster.api_client()).delete_namespaced_lease(lease, namespace)
        elector = LeaseElector(api, Settings(namespace=namespace, lease_name=lease), "r-1")
        with pytest.raises(LeaseMissing) as missing:
            elector.try_acquire()
        assert f"Lease {namespace}/{lease} is missing and this identity may not create it " \
               f"(HTTP 403 Forbidden: " in str(missing.value)
        assert "\n" not in str(missing.value)
    finally:
        cleanup(cluster, core, namespace, docs)


def test_the_certificate_job_as_its_own_identity_writes_the_secret_and_the_ca_bundle(
        cluster, core, crds):
    """What the post-install Job runs (`python -m certs secret` with the chart's arguments),
    under the Job's ServiceAccount and RBAC: the Secret is created, both webhook
    configurations get its CA, and running it again (every upgrade does) changes
    nothing."""
    import base64

    namespace, docs = install(cluster, core, "job", "pw-certs")
    try:
        job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["annotations"][
            "helm.sh/hook"].startswith("post-install"))
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        kubeconfig = cluster.kubeconfig_for_service_account(namespace,
                                                            spec["serviceAccountName"])
        args = container["args"]
        secret = args[args.index("--name") + 1]
        validating = args[args.index("--validating-webhook") + 1]
        mutating = args[args.index("--mutating-webhook") + 1]

        def run() -> str:
            result = subprocess.run(
                python_module(*container["command"][2:], *args,
                              "--kubeconfig", str(kubeconfig)),
                env=python_env(), capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            return result.stdout

        first = run()
        assert f"secret {namespace}/{secret}: created" in first
        assert f"validatingwebhookconfiguration {validating}: caBundle updated" in first
        assert f"mutatingwebhookconfiguration {mutating}: caBundle updated" in first
        stored = core.read_namespaced_secret(secret, namespace)
        ca = base64.b64decode(stored.data["ca.crt"])
        admission = client.AdmissionregistrationV1Api(cluster.api_client())
        for config in (admission.read_validating_webhook_configuration(validating),
                       admission.read_mutating_webhook_configuration(mutating)):
            assert [base64.b64decode(w.client_config.ca_bundle) for w in config.webhooks] == [
                ca] * len(config.webhooks)

        second = run()
        assert f"secret {namespace}/{secret}: reused" in second
        assert "caBundle unchanged" in second and "caBundle updated" not in second
        assert core.read_namespaced_secret(secret, namespace).metadata.resource_version == \
            stored.metadata.resource_version
    finally:
        cleanup(cluster, core, namespace, docs)


def test_uninstall_keeps_what_was_learned_and_a_reinstall_adopts_it(cluster, core, apps, crds):
    """The real `helm install`, then the observer's and the reconciler's writes (as their
    ServiceAccounts), `helm upgrade`, `helm uninstall` and `helm install` again under the
    same name: the learned set and the filled-in DaemonSet survive, and Helm adopts them
    back (it refuses an existing object unless its managed-by label says Helm)."""
    release, image = "pw-keep", "docker.io/library/nginx:1.27"
    namespace = new_namespace_name(release)
    core.create_namespace({"metadata": {"name": namespace, "labels": POD_SECURITY}})
    try:
        installed = helm(cluster, "install", release, str(CHART), "-n", namespace)
        assert installed.returncode == 0, installed.stderr
        docs = helm_template(namespace, release=release)

        observer_sa = chart_object(docs, "ServiceAccount", "-observer")["metadata"]["name"]
        observer = client.CoreV1Api(cluster.api_client(
            cluster.kubeconfig_for_service_account(namespace, observer_sa)))
        store = LearnedImagesStore(observer, namespace=namespace, name="learned-images")
        now = time.time()
        store.update(lambda learned: merge(learned, {image: Observation({"team"}, now, now)},
                                           source="admission",
                                           settings=prewarm_settings.Settings()).changed)

        reconciler = chart_object(docs, "Deployment", "-reconciler")
        container = reconciler["spec"]["template"]["spec"]["containers"][0]
        environ = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        settings = prewarm_settings.load(environ={**environ, "PREWARM_NAMESPACE": namespace})
        reconciler_sa = reconciler["spec"]["template"]["spec"]["serviceAccountName"]
        reconciler = Reconciler(settings, cluster.api_client(
            cluster.kubeconfig_for_service_account(namespace, reconciler_sa)))
        result = reconciler.reconcile_once(backfill=False)
        assert result.daemonsets == {settings.daemonset: "updated"}
        generation = apps.read_namespaced_daemon_set(settings.daemonset,
                                                     namespace).metadata.generation

        def pulled() -> list[str]:
            live = apps.read_namespaced_daemon_set(settings.daemonset, namespace)
            return [c.image for c in live.spec.template.spec.init_containers
                    if c.name.startswith("pull-")]

        assert pulled() == [image]

        # an upgrade resets the fields the chart sets, which are the reconciler's for an
        # empty set: the learned pull stays and the pods are not rolled
        upgraded = helm(cluster, "upgrade", release, str(CHART), "-n", namespace)
        assert upgraded.returncode == 0, upgraded.stderr
        assert pulled() == [image]
        assert apps.read_namespaced_daemon_set(settings.daemonset,
                                               namespace).metadata.generation == generation

        removed = helm(cluster, "uninstall", release, "-n", namespace)
        assert removed.returncode == 0, removed.stderr
        # the release's workloads are gone; what was learned and its DaemonSet stay
        assert not apps.list_namespaced_deployment(namespace).items
        assert image in learned_images(core, namespace)
        assert pulled() == [image]

        again = helm(cluster, "install", release, str(CHART), "-n", namespace)
        assert again.returncode == 0, again.stderr
        assert image in learned_images(core, namespace)
        assert pulled() == [image]
        assert {d.metadata.name for d in apps.list_namespaced_deployment(namespace).items} == {
            d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
        # adopting it changed nothing the pods are made from: no node pulls anew
        assert apps.read_namespaced_daemon_set(settings.daemonset,
                                               namespace).metadata.generation == generation
        assert reconciler.reconcile_once(backfill=False).daemonsets == {
            settings.daemonset: "unchanged"}
    finally:
        helm(cluster, "uninstall", release, "-n", namespace)
        core.delete_namespace(namespace)

