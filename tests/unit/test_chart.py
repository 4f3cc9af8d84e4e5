"""The Helm chart (deploy/helm/prewarm), rendered by the real helm binary, no cluster.

What a user would notice if these broke: a typo in their values silently ignored, the
webhook observing the wrong namespaces or blocking admission, pods refused by the
`restricted` Pod Security Standard, more RBAC than the design allows, a certificate the
API server rejects, or learned data wiped by an upgrade.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from webhook import images
from webhook import settings as prewarm_settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "prewarm"
RELEASE = "prewarm"
NAMESPACE = "prewarm-system"
JOB_MODE = ["--set", "certs.mode=job", "--set", "mutate.enabled=true"]

POD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job", "Pod"}
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
    "helm.sh/chart",
)


# -- running helm ---------------------------------------------------------------------------

@functools.cache
def helm() -> str:
    """The helm binary built by hack/build-binaries.sh (4th line of --print-dirs)."""
    script = REPO / "hack" / "build-binaries.sh"
    dirs = subprocess.run(["bash", str(script), "--print-dirs"], check=True,
                          capture_output=True, text=True).stdout.splitlines()
    binary = Path(dirs[3]) / "helm"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"helm not found at {binary}: build it with hack/build-binaries.sh "
                    "(the chart tests need the real helm to render and lint the chart)")
    return str(binary)


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    # A private helm home: the user's repositories and plugins play no part here.
    home = os.path.join(tempfile.gettempdir(), "prewarm-test-helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": home, "HELM_CONFIG_HOME": home,
           "HELM_DATA_HOME": home}
    return subprocess.run([helm(), *args], capture_output=True, text=True, env=env,
                          timeout=120)


@functools.cache
def _render(extra: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    result = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(*extra: str) -> list[dict[str, Any]]:
    return list(_render(tuple(extra)))


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects
            if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "Pod":
        return obj["spec"]
    return obj["spec"]["template"]["spec"]


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(obj)
    yield from spec.get("initContainers") or []
    yield from spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# Every optional branch of the templates at once.
EVERYTHING = (*JOB_MODE, "--set", "metrics.scrapeAnnotations=true",
              "--set", "imagePullSecrets[0].name=regcred",
              "--set", "extraEnv[0].name=PREWARM_FAILURE_BACKOFF",
              "--set", "extraEnv[0].value=1h",
              "--set", "observer.tolerations[0].operator=Exists",
              "--set", "observer.nodeSelector.pool=system",
              "--set", "observer.priorityClassName=system-cluster-critical",
              "--set", "observer.podAnnotations.team=platform",
              "--set", "reconciler.replicas=2",
              "--set", "reconciler.podLabels.team=platform",
              "--set", "prepuller.priorityClassName=low",
              "--set", "image.digest=sha256:" + "ab" * 32,
              "--set", "logFormat=json")

MODES = pytest.mark.parametrize("extra", [(), tuple(JOB_MODE), EVERYTHING],
                                ids=["cert-manager", "job", "everything"])


# -- lint and schema ------------------------------------------------------------------------

@MODES
def test_lint_strict_is_clean(extra: tuple[str, ...]) -> None:
    result = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *extra)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[ERROR]" not in output and "[WARNING]" not in output, output


@pytest.mark.parametrize("setting, named", [
    ("observer.replica=3", "replica"),
    ("learning.maxImage=1", "maxImage"),
    ("reconciler.resources.request.cpu=1", "request"),
    ("certs.mode=selfsigned", "mode"),
    ("webhook.timeoutSeconds=10", "timeoutSeconds"),
    ("webhook.failurePolicy=Maybe", "failurePolicy"),
    ("learning.maxImages=0", "maxImages"),
    ("prepuller.resyncPeriod=soon", "resyncPeriod"),
    ("observer.serviceAccount.name=Bad_Name!ok", "name"),
    ("reconciler.serviceAccount.name=x/ok", "name"),
    ("prepuller.maxUnavailable=0%", "maxUnavailable"),
    ("daemonSetName=prewarm-images-2", "daemonSetName"),
    ("prepuller.shardSize=501", "shardSize"),
    ("learning.deny[0]=ghcr.io/acme/", "deny"),
    ("learning.allow[0]=ghcr.io/ACME", "allow"),
])
def test_schema_rejects_bad_values_naming_them(setting: str, named: str) -> None:
    for command in ("lint", "template"):
        args = [command, str(CHART), "--set", setting]
        if command == "lint":
            args.insert(1, "--strict")
        else:
            args.insert(1, RELEASE)
        result = run_helm(*args)
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"helm {command} accepted --set {setting}"
        assert named in output, output


IMAGE_PATTERNS = [
    "ghcr.io", "ghcr.io/acme", "ghcr.io/acme/*/tools", "GHCR.io/acme", "reg.io:5000/x",
    "localhost", "localhost:5000/a", "[::1]:5000/a", "docker.io/library", "nginx",
    "library/nginx", "bitnami/redis", "*", "*/x", "a_b", "a__b/c", "a-b/c.d", "Foo",
    "index.docker.io/x",
    # refused at start by the observer and the reconciler
    "ghcr.io/acme/", "/ghcr.io", "ghcr.io//x", "ghcr.io/ACME", "ghcr.io/a#b", "foo_bar.com",
    "A_b/x", "foo-/x", "ghcr.io/acme:1.0", "ghcr.io/acme@sha256:" + "a" * 64, "reg.io:x/a",
    "ghcr.io/**", "ghcr.io/a*", "-x", "x.", "[::1/x", "ghcr.io/a b", "[ab]", "[0]/x",
]


@pytest.mark.parametrize("key", ["allow", "deny"])
def test_schema_takes_exactly_the_image_patterns_the_settings_take(key: str) -> None:
    # whatever the schema lets through, the observer and the reconciler accept at start
    schema = json.loads((CHART / "values.schema.json").read_text())
    pattern = schema["properties"]["learning"]["properties"][key]["items"]["pattern"]
    for text in IMAGE_PATTERNS:
        try:
            images.ImageFilter(**{key: [text]})
            valid = True
        except ValueError:
            valid = False
        assert (re.fullmatch(pattern, text) is not None) == valid, text
    # and whatever else: a pattern the schema takes is one the settings take
    rng = random.Random(7)
    for _ in range(5000):
        text = "".join(rng.choices("ab0:./-_*[]A", k=rng.randint(1, 12)))
        if re.fullmatch(pattern, text):
            images.ImageFilter(**{key: [text]})  # raises ValueError naming it if not


@pytest.mark.parametrize("setting,named", [
    ("learning.imageTTL=90s", "learning.imageTTL (90s) must be longer than 6h"),
    ("prepuller.resyncPeriod=30d", "plus prepuller.resyncPeriod (30d)"),
    ("prepuller.resyncPeriod=0s", "prepuller.resyncPeriod (0s) must be more than 0"),
])
def test_an_image_ttl_shorter_than_the_refresh_fails_rendering(setting: str, named: str) -> None:
    """A check across two values, in the templates (the schema compares none): what
    install and upgrade render fails with the reason. (`helm lint` reports a template's
    `fail` without failing.)"""
    result = run_helm("template", RELEASE, str(CHART), "--set", setting)
    assert result.returncode != 0 and named in result.stderr, result.stderr
    assert run_helm("template", RELEASE, str(CHART), "--set", "learning.imageTTL=7h").returncode == 0


@pytest.mark.parametrize("extra", [(), (
    # the TTL the chart's check accepts as just long enough for this resync period
    "--set", "prepuller.resyncPeriod=1m", "--set", "learning.imageTTL=363m")],
    ids=["defaults", "short-resync"])
def test_every_deployment_accepts_the_settings_the_chart_gives_it(extra: tuple[str, ...]) -> None:
    """What `helm template` accepts must start: each Deployment's environment, read as
    its command reads it, passes the same checks (a refusal is a crash loop)."""
    from webhook.cli import COMMANDS

    deployments = find(render(*extra), "Deployment")
    assert len(deployments) == 2
    for deployment in deployments:
        (container,) = pod_spec(deployment)["containers"]
        command = container["args"][0]
        assert command in COMMANDS
        environ = {k: v for k, v in env_of(container).items() if isinstance(v, str)}
        prewarm_settings.load(environ={**environ, "PREWARM_NAMESPACE": NAMESPACE},
                              command=command)


@pytest.mark.parametrize("mode,secrets", [("job", "prewarm-tls"),
                                          ("cert-manager", "prewarm-tls prewarm-ca")])
def test_notes_name_every_secret_uninstall_leaves(mode: str, secrets: str, tmp_path) -> None:
    """cert-manager keeps a Certificate's Secret when the Certificate goes (unless it runs
    with --enable-certificate-owner-ref): the clean-up NOTES prints must name both."""
    import shutil

    chart = tmp_path / "prewarm"
    shutil.copytree(CHART, chart)
    # helm template does not print NOTES.txt: a template of ours renders it into a value
    (chart / "templates" / "NOTES.txt").rename(chart / "notes.txt")
    (chart / "templates" / "notes.yaml").write_text(
        'notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    result = run_helm("template", RELEASE, str(chart), "--namespace", NAMESPACE,
                      "--set", f"certs.mode={mode}", "--show-only", "templates/notes.yaml")
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["notes"]
    assert f"kubectl delete secret {secrets} -n {NAMESPACE}" in notes, notes
    # what a forced upgrade loses, and (job mode) the certificate nothing renews alone
    assert "never `--force`" in notes
    assert ("The serving certificate lasts 365 days" in notes) == (mode == "job"), notes


# Values whose content is Kubernetes' own schema (documented by the key above them).
PASS_THROUGH = {"resources", "nodeSelector", "podSecurityContext", "containerSecurityContext"}


def test_every_value_is_documented_with_a_comment() -> None:
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    previous = ""
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            previous = stripped
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stripped.startswith("- ") or ":" not in stripped:
            previous = stripped
            continue
        key = stripped.split(":", 1)[0]
        if not any(parent in PASS_THROUGH for _, parent in stack):
            assert previous.startswith("#"), (
                f"values.yaml:{number}: {key!r} has no comment above it")
        stack.append((indent, key))
        previous = stripped


# -- the ValidatingWebhookConfiguration ----------------------------------------------------

def test_validating_webhook_is_exactly_the_designed_one() -> None:
    objects = render("--set", "learning.excludeNamespaces={team-infra,monitoring}")
    config = one(objects, "ValidatingWebhookConfiguration", f"{RELEASE}-observe")
    assert len(config["webhooks"]) == 1
    hook = config["webhooks"][0]
    assert hook["name"] == "observe.prewarm.io"
    assert hook["clientConfig"]["service"] == {
        "name": RELEASE, "namespace": NAMESPACE, "path": "/observe", "port": 443}
    assert "url" not in hook["clientConfig"]
    rules = {(tuple(r["apiGroups"]), tuple(r["apiVersions"]), tuple(r["operations"]),
              tuple(r["resources"]), r["scope"]) for r in hook["rules"]}
    assert rules == {
        (("",), ("v1",), ("CREATE",), ("pods",), "Namespaced"),
        (("",), ("v1",), ("UPDATE",), ("pods/ephemeralcontainers",), "Namespaced"),
        (("apps",), ("v1",), ("CREATE", "UPDATE"),
         ("deployments", "statefulsets", "daemonsets", "replicasets"), "Namespaced"),
        (("",), ("v1",), ("CREATE", "UPDATE"), ("replicationcontrollers",), "Namespaced"),
        (("batch",), ("v1",), ("CREATE", "UPDATE"), ("jobs", "cronjobs"), "Namespaced"),
    }
    assert hook["namespaceSelector"] == {"matchExpressions": [
        {"key": "prewarm.io/learn", "operator": "In", "values": ["enabled"]},
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
         "values": ["kube-system", "kube-node-lease", NAMESPACE, "team-infra", "monitoring"]},
    ]}
    assert "objectSelector" not in hook
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "NoneOnDryRun"
    assert hook["timeoutSeconds"] == 2
    assert hook["matchPolicy"] == "Equivalent"
    assert hook["admissionReviewVersions"] == ["v1"]


def test_release_namespace_is_excluded_once_even_if_listed() -> None:
    objects = render("--set", f"learning.excludeNamespaces={{{NAMESPACE},kube-system}}")
    hook = one(objects, "ValidatingWebhookConfiguration")["webhooks"][0]
    values = hook["namespaceSelector"]["matchExpressions"][1]["values"]
    assert values == ["kube-system", "kube-node-lease", NAMESPACE]


def test_mutating_webhook_is_off_by_default_and_narrow_when_on() -> None:
    assert not find(render(), "MutatingWebhookConfiguration")
    objects = render("--set", "mutate.enabled=true")
    config = one(objects, "MutatingWebhookConfiguration", f"{RELEASE}-mutate")
    (hook,) = config["webhooks"]
    assert hook["clientConfig"]["service"]["path"] == "/mutate"
    assert [(r["apiGroups"], r["resources"], r["operations"]) for r in hook["rules"]] == [
        ([""], ["pods"], ["CREATE"])]
    expressions = hook["namespaceSelector"]["matchExpressions"]
    assert {"key": "prewarm.io/learn", "operator": "In", "values": ["enabled"]} in expressions
    assert {"key": "prewarm.io/pull-policy", "operator": "In",
            "values": ["IfNotPresent"]} in expressions
    assert hook["reinvocationPolicy"] == "Never"
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]


# -- labels and pod security ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["cert-manager", "job"])
def test_the_longest_release_name_gives_valid_names_and_labels(mode: str) -> None:
    # helm allows release names of 53 characters; a Job's name becomes a label of its
    # pods, a Service's a DNS label: both at most 63, as is every label value
    release = "r" * 53
    result = run_helm("template", release, str(CHART), "--namespace", NAMESPACE,
                      "--set", f"certs.mode={mode}", "--set", "mutate.enabled=true")
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    too_long = [(obj["kind"], obj["metadata"]["name"]) for obj in objects
                if obj["kind"] in ("Job", "Service") and len(obj["metadata"]["name"]) > 63]
    assert too_long == []
    labels = [value for obj in objects for value in
              [*(obj["metadata"].get("labels") or {}).values(),
               *(((obj.get("spec") or {}).get("template") or {}).get("metadata", {})
                 .get("labels") or {}).values()]]
    assert labels and max(map(len, labels)) <= 63
    if mode == "job":
        assert len(find(objects, "Job")) == 2


@MODES
def test_every_object_carries_the_recommended_labels(extra: tuple[str, ...]) -> None:
    for obj in render(*extra):
        labels = obj["metadata"].get("labels") or {}
        missing = [key for key in RECOMMENDED_LABELS if not labels.get(key)]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/name"] == "prewarm"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        # even the pre-pull DaemonSet, whose pods are the reconciler's: Helm adopts a kept
        # object back only while it says Helm
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


@MODES
def test_every_pod_of_the_chart_runs_on_linux_nodes(extra: tuple[str, ...]) -> None:
    # Prewarm's image is Linux-only: no pod of the chart (hooks and test included) may
    # land on a Windows node of a mixed cluster
    workloads = [o for o in render(*extra) if o["kind"] in POD_KINDS]
    kinds = {o["kind"] for o in workloads}
    assert kinds >= {"Deployment", "DaemonSet", "Pod"} and ("Job" in kinds) == bool(extra)
    for obj in workloads:
        selector = pod_spec(obj).get("nodeSelector") or {}
        assert selector.get("kubernetes.io/os") == "linux", f"{obj['kind']}/{obj['metadata']['name']}"


def test_the_certs_jobs_take_their_own_tolerations_and_priority() -> None:
    objects = render(*JOB_MODE, "--set", "certs.job.tolerations[0].operator=Exists",
                     "--set", "certs.job.nodeSelector.pool=system",
                     "--set", "certs.job.priorityClassName=platform-critical",
                     "--set", "observer.priorityClassName=observer-class")
    jobs = find(objects, "Job")
    assert len(jobs) == 2
    for job in jobs:
        spec = pod_spec(job)
        assert spec["tolerations"] == [{"operator": "Exists"}]
        assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "system"}
        assert spec["priorityClassName"] == "platform-critical"
    assert all("priorityClassName" not in pod_spec(job) for job in find(render(*JOB_MODE), "Job"))


def test_the_test_pod_is_placed_as_the_observer_is() -> None:
    objects = render("--set", "observer.priorityClassName=observer-class",
                     "--set", "observer.tolerations[0].operator=Exists",
                     "--set", "observer.nodeSelector.pool=system")
    (test_pod,) = find(objects, "Pod")
    observer_spec = next(pod_spec(d) for d in find(objects, "Deployment")
                         if d["metadata"]["labels"]["app.kubernetes.io/component"] == "observer")
    for key in ("priorityClassName", "tolerations", "nodeSelector"):
        assert test_pod["spec"][key] == observer_spec[key], key


@MODES
def test_every_container_runs_restricted(extra: tuple[str, ...]) -> None:
    workloads = [o for o in render(*extra) if o["kind"] in POD_KINDS]
    assert {o["kind"] for o in workloads} >= {"Deployment", "DaemonSet", "Pod"}
    for obj in workloads:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod_sc = pod_spec(obj).get("securityContext") or {}
        for container in containers(obj):
            sc = container.get("securityContext") or {}
            what = f"{where} container {container['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, what
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], what
            assert not sc.get("capabilities", {}).get("add"), what
            assert sc.get("privileged") in (None, False), what
            assert sc.get("readOnlyRootFilesystem") is True, what
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, what
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, what
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile")) or {}
            assert seccomp.get("type") == "RuntimeDefault", what
        assert not pod_spec(obj).get("hostNetwork"), where
        assert not pod_spec(obj).get("hostPID"), where


def assert_subset(chart: Any, desired: Any, path: str) -> None:
    """Every field the chart sets has the reconciler's value (lists of named items are
    matched by name, as a strategic merge does)."""
    if isinstance(chart, dict):
        assert isinstance(desired, dict), f"{path}: {chart!r} vs {desired!r}"
        for key, value in chart.items():
            assert key in desired, f"{path}.{key} is set by the chart, not by the reconciler"
            assert_subset(value, desired[key], f"{path}.{key}")
    elif isinstance(chart, list) and chart and all(
            isinstance(item, dict) and "name" in item for item in chart):
        by_name = {item["name"]: item for item in desired}
        for item in chart:
            assert item["name"] in by_name, f"{path}[{item['name']}] not in the reconciler's"
            assert_subset(item, by_name[item["name"]], f"{path}[{item['name']}]")
    else:
        assert chart == desired, f"{path}: chart {chart!r} != reconciler {desired!r}"


@pytest.mark.parametrize("extra", [(), (
    "--set", "prepuller.runAsUser=1000", "--set", "prepuller.maxUnavailable=2",
    "--set", "prepuller.priorityClassName=low", "--set", "prepuller.tolerations[0].operator=Exists",
    "--set", "prepuller.nodeSelector.pool=gpu", "--set", "daemonSetName=warm",
    "--set", "prepuller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
             ".nodeSelectorTerms[0].matchExpressions[0].key=gpu",
    "--set", "prepuller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
             ".nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
)], ids=["defaults", "custom"])
def test_placeholder_daemonset_is_what_the_reconciler_applies(extra: tuple[str, ...]) -> None:
    """`helm upgrade` resets the fields the chart sets; they must equal the reconciler's
    for an empty learned set, or every upgrade would revert them and roll the pods."""
    from webhook import daemonset as prewarm_daemonset
    from webhook import store as prewarm_store

    objects = render(*extra)
    (placeholder,) = find(objects, "DaemonSet")
    reconciler = one(objects, "Deployment", f"{RELEASE}-reconciler")
    environ = {k: v for k, v in env_of(pod_spec(reconciler)["containers"][0]).items()
               if isinstance(v, str)}
    parsed = prewarm_settings.load(environ={**environ, "PREWARM_NAMESPACE": NAMESPACE})
    (desired,) = prewarm_daemonset.desired_daemonsets(prewarm_store.LearnedSet(), parsed, now=0)
    assert placeholder["metadata"]["name"] == desired["metadata"]["name"]
    assert placeholder["metadata"]["namespace"] == desired["metadata"]["namespace"]
    assert desired["metadata"]["labels"].items() <= placeholder["metadata"]["labels"].items()
    assert_subset(placeholder["spec"], desired["spec"], "spec")
    assert placeholder["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_placeholder_selector_ignores_name_override() -> None:
    selector = {"app.kubernetes.io/name": "prewarm",
                "app.kubernetes.io/component": "prepuller",
                "prewarm.io/daemonset": "prewarm-images"}
    for extra in ((), ("--set", "nameOverride=warm")):
        daemonset = one(render(*extra), "DaemonSet")
        assert daemonset["spec"]["selector"] == {"matchLabels": selector}
        assert pod_spec(daemonset)["automountServiceAccountToken"] is False


def test_learned_images_and_lease_are_precreated_and_data_is_kept() -> None:
    objects = render()
    configmap = one(objects, "ConfigMap", "learned-images")
    assert configmap["data"] == {}
    assert configmap["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # labelled as the store labels one it creates: one selector finds it either way
    from webhook.store import LABELS

    component = "app.kubernetes.io/component"
    assert configmap["metadata"]["labels"][component] == LABELS[component]
    lease = one(objects, "Lease", "prewarm-reconciler")
    assert lease["apiVersion"] == "coordination.k8s.io/v1"
    assert lease["metadata"]["namespace"] == NAMESPACE


# -- the Deployments -------------------------------------------------------------------------

def test_observer_deployment() -> None:
    objects = render()
    deployment = one(objects, "Deployment", f"{RELEASE}-observer")
    assert deployment["spec"]["replicas"] == 2
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    assert container["args"] == ["serve"] and "command" not in container
    env = env_of(container)
    assert env["PREWARM_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["PREWARM_PORT"] == "8443"
    assert env["PREWARM_TLS_CERT_FILE"] == "/tls/tls.crt"
    assert env["PREWARM_TLS_KEY_FILE"] == "/tls/tls.key"
    assert env["PREWARM_CONFIGMAP"] == "learned-images"
    assert env["PREWARM_WORKERS"] == "2" and env["PREWARM_THREADS"] == "8"
    assert env["PREWARM_MAX_IMAGES"] == "5000" and env["PREWARM_IMAGE_TTL"] == "30d"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # A directory mount: with subPath the kubelet never updates renewed certificates.
    assert "subPath" not in mounts["/tls"] and mounts["/tls"]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = volumes[mounts["/tls"]["name"]]["secret"]
    assert secret["secretName"] == f"{RELEASE}-tls"
    # The serving pair only, never the CA key the job mode stores beside it.
    assert {item["key"] for item in secret["items"]} == {"tls.crt", "tls.key"}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["scheme"]) == (path, "HTTPS")
        assert get["port"] in (8443, "https")
    assert {"name": "https", "containerPort": 8443, "protocol": "TCP"} in container["ports"]
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    # a stopping pod serves on while endpoints catch up, then has gunicorn's 20 s
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert spec["terminationGracePeriodSeconds"] == 35
    undrained = one(render("--set", "observer.drainSeconds=0"), "Deployment",
                    f"{RELEASE}-observer")
    assert "lifecycle" not in pod_spec(undrained)["containers"][0]
    assert pod_spec(undrained)["terminationGracePeriodSeconds"] == 30
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    # One replica: a PDB of minAvailable 1 would block every drain.
    assert not find(render("--set", "observer.replicas=1"), "PodDisruptionBudget")


def test_reconciler_deployment() -> None:
    objects = render(
        "--set", "prepuller.tolerations[0].operator=Exists",
        "--set", "prepuller.imagePullSecrets[0].name=regcred",
        "--set", "prepuller.imagePullSecrets[1].name=other",
        "--set", "learning.allow={ghcr.io/acme,docker.io/library}",
        "--set", "image.tag=1.2.3")
    deployment = one(objects, "Deployment", f"{RELEASE}-reconciler")
    assert deployment["spec"]["replicas"] == 1
    (container,) = pod_spec(deployment)["containers"]
    assert container["args"] == ["reconcile"]
    env = env_of(container)
    observer = one(objects, "Deployment", f"{RELEASE}-observer")
    (observer_container,) = pod_spec(observer)["containers"]
    assert env["PREWARM_HELPER_IMAGE"] == container["image"] == observer_container["image"]
    assert container["image"] == "ghcr.io/prewarm/prewarm:1.2.3"
    assert env["PREWARM_DAEMONSET"] == "prewarm-images"
    assert env["PREWARM_LEASE_NAME"] == "prewarm-reconciler"
    assert env["PREWARM_HEALTH_PORT"] == "8081"
    assert env["PREWARM_IMAGE_PULL_SECRETS"] == "regcred,other"
    assert env["PREWARM_ALLOW"] == "ghcr.io/acme,docker.io/library"
    assert env["PREWARM_MAX_UNAVAILABLE"] == "10%"
    # The JSON variables parse the way the reconciler's settings parse them.
    parsed = prewarm_settings.load(environ={k: v for k, v in env.items() if isinstance(v, str)})
    assert parsed.node_selector == {"kubernetes.io/os": "linux"}
    assert parsed.tolerations == [{"operator": "Exists"}]
    assert parsed.affinity == {}
    assert parsed.image_pull_secrets == ("regcred", "other")
    # a mirror of Prewarm's own image: its helper container in the pre-pull pods needs
    # the chart's pull secret too (listed once)
    mirrored = one(render("--set", "prepuller.imagePullSecrets[0].name=regcred",
                          "--set", "imagePullSecrets[0].name=mirror",
                          "--set", "imagePullSecrets[1].name=regcred"),
                   "Deployment", f"{RELEASE}-reconciler")
    (mirrored_container,) = pod_spec(mirrored)["containers"]
    assert env_of(mirrored_container)["PREWARM_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    assert parsed.allow == ("ghcr.io/acme", "docker.io/library")
    assert parsed.resync_period == 300 and parsed.image_ttl == 30 * 86400
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["scheme"]) == (path, "HTTP")
        assert get["port"] in (8081, "health")


@MODES
def test_every_prewarm_variable_is_a_setting(extra: tuple[str, ...]) -> None:
    """The chart may only set variables the FIELDS table defines (no silent drift)."""
    known = {spec.env for spec in prewarm_settings.FIELDS}
    for obj in render(*extra):
        if obj["kind"] not in POD_KINDS:
            continue
        for container in containers(obj):
            unknown = {name for name in env_of(container)
                       if name.startswith("PREWARM_") and name not in known}
            assert not unknown, f"{obj['metadata']['name']}: {sorted(unknown)}"


def test_service_selects_observer_pods_only() -> None:
    objects = render()
    service = one(objects, "Service", RELEASE)
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]
    selector = service["spec"]["selector"].items()
    for deployment in find(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"].items()
        selected = selector <= labels
        assert selected == deployment["metadata"]["name"].endswith("-observer")


def test_names_fit_in_63_characters() -> None:
    long_release = "a-very-long-release-name-for-prewarm-in-a-test-xxxxx"  # 52 characters
    result = run_helm("template", long_release, str(CHART), "--namespace", NAMESPACE,
                      "--set", "nameOverride=another-rather-long-chart-name")
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    (service,) = find(objects, "Service")
    assert len(service["metadata"]["name"]) <= 63
    for obj in objects:
        for value in (obj["metadata"].get("labels") or {}).values():
            assert len(value) <= 63


# -- RBAC ------------------------------------------------------------------------------------

def rules_by_role(objects: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict]]:
    return {(o["kind"], o["metadata"]["name"]): o["rules"]
            for o in objects if o["kind"] in ("Role", "ClusterRole")}


@MODES
def test_rbac_has_no_wildcards(extra: tuple[str, ...]) -> None:
    for (kind, name), rules in rules_by_role(render(*extra)).items():
        for rule in rules:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{kind}/{name}: {rule}"
                assert not any("*" in item for item in rule.get(field, [])), rule
            assert "nonResourceURLs" not in rule


def test_rbac_is_least_privilege_in_cert_manager_mode() -> None:
    objects = render()
    roles = rules_by_role(objects)
    for rules in roles.values():
        for rule in rules:
            assert "secrets" not in rule["resources"], rule
    assert roles[("Role", f"{RELEASE}-observer")] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["learned-images"],
         "verbs": ["get", "patch"]}]
    # every verb is one the code uses (merge patches, server-side apply, which creates
    # through PATCH, and the Lease's read-modify-replace)
    assert roles[("Role", f"{RELEASE}-reconciler")] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["learned-images"],
         "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": ["apps"], "resources": ["daemonsets"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": ["prewarm-reconciler"], "verbs": ["get", "update"]},
    ]
    assert roles[("ClusterRole", f"{RELEASE}-reconciler")] == [
        {"apiGroups": [""], "resources": ["namespaces", "pods"],
         "verbs": ["get", "list", "watch"]}]
    assert set(roles) == {("Role", f"{RELEASE}-observer"), ("Role", f"{RELEASE}-reconciler"),
                          ("ClusterRole", f"{RELEASE}-reconciler")}
    # Each binding grants its role to that component's ServiceAccount only.
    for binding in find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding"):
        (subject,) = binding["subjects"]
        assert subject == {"kind": "ServiceAccount", "name": binding["roleRef"]["name"],
                           "namespace": NAMESPACE}


def test_rbac_of_the_certificate_job() -> None:
    roles = rules_by_role(render(*JOB_MODE))
    secret_rules = [(key, rule) for key, rules in roles.items() for rule in rules
                    if "secrets" in rule["resources"]]
    assert {key for key, _ in secret_rules} == {("Role", f"{RELEASE}-certs")}
    for _, rule in secret_rules:
        if rule.get("resourceNames"):
            assert rule["resourceNames"] == [f"{RELEASE}-tls"]
        else:  # create cannot be restricted by name; nothing else may be unrestricted
            assert rule["verbs"] == ["create"]
    webhooks = roles[("ClusterRole", f"{RELEASE}-certs")]
    assert {(r["resources"][0], tuple(r["resourceNames"])) for r in webhooks} == {
        ("validatingwebhookconfigurations", (f"{RELEASE}-observe",)),
        ("mutatingwebhookconfigurations", (f"{RELEASE}-mutate",)),
    }
    for rule in webhooks:
        assert rule["verbs"] == ["get", "patch"]  # what certs/kube.py calls


# -- certificates ---------------------------------------------------------------------------

def test_cert_manager_mode() -> None:
    objects = render("--set", "mutate.enabled=true")
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        annotations = one(objects, kind)["metadata"]["annotations"]
        assert annotations["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/{RELEASE}-tls"
    serving = one(objects, "Certificate", f"{RELEASE}-tls")
    assert serving["spec"]["secretName"] == f"{RELEASE}-tls"
    service = one(objects, "Service")["metadata"]["name"]
    assert {service, f"{service}.{NAMESPACE}",
            f"{service}.{NAMESPACE}.svc"} <= set(serving["spec"]["dnsNames"])
    issuer = one(objects, "Issuer", serving["spec"]["issuerRef"]["name"])
    ca = one(objects, "Certificate", f"{RELEASE}-ca")
    assert ca["spec"]["isCA"] is True
    assert issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
    selfsigned = one(objects, "Issuer", ca["spec"]["issuerRef"]["name"])
    assert selfsigned["spec"] == {"selfSigned": {}}
    assert ca["spec"]["privateKey"]["algorithm"] == "ECDSA"
    assert not find(objects, "Job")


def test_job_mode() -> None:
    objects = render(*JOB_MODE)
    assert not find(objects, "Certificate") and not find(objects, "Issuer")
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        config = one(objects, kind)
        assert "cert-manager.io/inject-ca-from" not in (
            config["metadata"].get("annotations") or {})
    jobs = {j["metadata"]["annotations"]["helm.sh/hook"]: j for j in find(objects, "Job")}
    assert set(jobs) == {"pre-install,pre-upgrade", "post-install,post-upgrade"}
    common = ["secret", "--namespace", NAMESPACE, "--name", f"{RELEASE}-tls",
              "--service", RELEASE]
    for hook, job in jobs.items():
        (container,) = pod_spec(job)["containers"]
        assert container["command"] == ["python", "-m", "certs"]
        # both runs patch the caBundle: the first, before an upgrade rolls the pods,
        # only the configurations that exist already
        webhooks = ["--validating-webhook", f"{RELEASE}-observe",
                    "--mutating-webhook", f"{RELEASE}-mutate"] + (
            ["--skip-missing-webhooks"] if hook.startswith("pre-") else [])
        assert container["args"] == common + webhooks + ["--days", "365", "--ca-days", "3650"]
        assert "hook-succeeded" in job["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    # The Job's identity exists before the Jobs run, in both phases.
    for obj in objects:
        if obj["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole",
                           "ClusterRoleBinding") and obj["metadata"]["name"].endswith("-certs"):
            annotations = obj["metadata"]["annotations"]
            assert set(annotations["helm.sh/hook"].split(",")) == {
                "pre-install", "pre-upgrade", "post-install", "post-upgrade"}
            assert int(annotations["helm.sh/hook-weight"]) < 0


def test_helm_test_pod_verifies_tls_against_the_ca() -> None:
    pod = one(render(), "Pod", f"{RELEASE}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    script = container["args"][0]
    assert f"https://{RELEASE}.{NAMESPACE}.svc" in script
    assert "cafile=\"/tls/ca.crt\"" in script
    compile(script, "helm-test", "exec")  # the inline script is valid Python
    (tls,) = [v for v in pod["spec"]["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == f"{RELEASE}-tls"


def test_webhook_configurations_are_named_after_the_release_whatever_its_name() -> None:
    """`<release>-observe` (DESIGN.md), also for a release name without "prewarm", where
    the namespaced objects get the chart's usual `<release>-prewarm` full name; the
    certificate Job patches and may touch exactly those configurations."""
    result = run_helm("template", "team-a", str(CHART), "--namespace", NAMESPACE, *JOB_MODE)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    validating = one(objects, "ValidatingWebhookConfiguration", "team-a-observe")
    one(objects, "MutatingWebhookConfiguration", "team-a-mutate")
    assert validating["webhooks"][0]["clientConfig"]["service"]["name"] == "team-a-prewarm"
    patcher = next(j for j in find(objects, "Job")
                   if j["metadata"]["annotations"]["helm.sh/hook"].startswith("post-"))
    args = pod_spec(patcher)["containers"][0]["args"]
    assert args[args.index("--validating-webhook") + 1] == "team-a-observe"
    assert args[args.index("--mutating-webhook") + 1] == "team-a-mutate"
    webhooks = rules_by_role(objects)[("ClusterRole", "team-a-prewarm-certs")]
    assert {name for rule in webhooks for name in rule["resourceNames"]} == {
        "team-a-observe", "team-a-mutate"}
    overridden = run_helm("template", "team-a", str(CHART), "--namespace", NAMESPACE,
                          "--set", "fullnameOverride=team-a-east", *JOB_MODE)
    assert overridden.returncode == 0, overridden.stderr
    objects = [doc for doc in yaml.safe_load_all(overridden.stdout) if doc]
    one(objects, "ValidatingWebhookConfiguration", "team-a-east-observe")
    one(objects, "MutatingWebhookConfiguration", "team-a-east-mutate")
