"""The reconciler against the real control plane with kwok nodes: the API server judges
the DaemonSet, the DaemonSet controller and kwok give one pod per node."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from kubernetes import client

from tests.support import (NODES, Process, apiserver_metric, eventually, learned_images,
                           new_namespace_name, python_env, python_module)
from webhook import daemonset
from webhook.reconciler import LeaseElector, NotLeader, Reconciler
from webhook.settings import Settings
from webhook.store import parse_time
from webhook.store import LearnedImagesStore, Observation, key_for, merge

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}


@pytest.fixture
def prewarm_ns(core):
    """Prewarm's namespace, enforcing the restricted Pod Security profile."""
    name = new_namespace_name("prewarm")
    core.create_namespace({"metadata": {"name": name, "labels": RESTRICTED}})
    yield name
    core.delete_namespace(name)


def settings_for(namespace: str, **changes) -> Settings:
    return Settings(namespace=namespace, helper_image="ghcr.io/prewarm/prewarm:test",
                    **{"backfill": False, **changes})


def learn(cluster, namespace: str, images: list[str], settings: Settings) -> None:
    store = LearnedImagesStore(client.CoreV1Api(cluster.api_client()), namespace=namespace,
                               name=settings.configmap)
    now = time.time()
    observed = {image: Observation({"team"}, now, now) for image in images}
    store.update(lambda learned: merge(learned, observed, source="admission",
                                       settings=Settings(max_images_per_namespace=10000)).changed)


def pods_of(core, namespace: str, name: str) -> list:
    return core.list_namespaced_pod(namespace, label_selector=f"{daemonset.DAEMONSET_LABEL}={name}").items


def test_learned_image_is_pulled_on_every_node_under_restricted_pod_security(
        cluster, core, apps, prewarm_ns):
    settings = settings_for(prewarm_ns)
    learn(cluster, prewarm_ns, ["docker.io/library/nginx:1.27"], settings)
    reconciler = Reconciler(settings, cluster.api_client())

    result = reconciler.reconcile_once()
    assert result.daemonsets == {"prewarm-images": "created"}
    live = apps.read_namespaced_daemon_set("prewarm-images", prewarm_ns)
    pulls = [c for c in live.spec.template.spec.init_containers if c.name.startswith("pull-")]
    assert [c.image for c in pulls] == ["docker.io/library/nginx:1.27"]

    # PodSecurity admission would refuse the pods, and the DaemonSet would never get them
    running = eventually(f"{NODES} Running prepuller pods", lambda: (lambda pods: pods if len(
        [p for p in pods if p.status.phase == "Running"]) == NODES else None)(
        pods_of(core, prewarm_ns, "prewarm-images")), timeout=90)
    assert {p.spec.node_name for p in running} == set(cluster.node_names)

    def warm():
        reconciler.reconcile_once()
        record = learned_images(core, prewarm_ns)["docker.io/library/nginx:1.27"]
        return record if record["state"] == "warm" else None

    record = eventually("image warm on every node", warm, timeout=60, interval=0.5)
    assert record["warmNodes"] == NODES


def test_a_pass_without_change_writes_nothing(cluster, core, apps, prewarm_ns):
    settings = settings_for(prewarm_ns)
    learn(cluster, prewarm_ns, ["docker.io/library/redis:7"], settings)
    reconciler = Reconciler(settings, cluster.api_client())

    def settled():  # until the pods have pulled and the state reads warm
        reconciler.reconcile_once()
        return learned_images(core, prewarm_ns)["docker.io/library/redis:7"]["state"] == "warm"

    eventually("the image warm", settled, timeout=60, interval=0.5)
    before = apps.read_namespaced_daemon_set("prewarm-images", prewarm_ns)
    cm_before = core.read_namespaced_config_map("learned-images", prewarm_ns)

    result = reconciler.reconcile_once()
    assert result.daemonsets == {"prewarm-images": "unchanged"}
    after = apps.read_namespaced_daemon_set("prewarm-images", prewarm_ns)
    assert after.metadata.generation == before.metadata.generation
    assert after.metadata.annotations == before.metadata.annotations
    assert core.read_namespaced_config_map("learned-images", prewarm_ns).metadata.resource_version \
        == cm_before.metadata.resource_version


def test_adding_one_image_to_300_changes_only_one_shard(cluster, core, apps, prewarm_ns):
    settings = settings_for(prewarm_ns, shard_size=100)
    learn(cluster, prewarm_ns, [f"registry.example.com/team/app-{i:03d}:v1" for i in range(300)],
          settings)
    reconciler = Reconciler(settings, cluster.api_client())
    first = reconciler.reconcile_once()
    assert first.daemonsets == {"prewarm-images": "created", "prewarm-images-1": "created",
                                "prewarm-images-2": "created"}
    generations = {ds.metadata.name: ds.metadata.generation
                   for ds in apps.list_namespaced_daemon_set(prewarm_ns).items}

    learn(cluster, prewarm_ns, ["registry.example.com/team/newcomer:v1"], settings)
    second = reconciler.reconcile_once()
    assert second.daemonsets == {"prewarm-images": "unchanged", "prewarm-images-1": "unchanged",
                                 "prewarm-images-2": "unchanged", "prewarm-images-3": "created"}
    for ds in apps.list_namespaced_daemon_set(prewarm_ns).items:
        if ds.metadata.name in generations:
            assert ds.metadata.generation == generations[ds.metadata.name], ds.metadata.name


def test_two_releases_in_one_namespace_leave_each_others_shards_alone(
        cluster, core, apps, prewarm_ns):
    team_a = settings_for(prewarm_ns, daemonset="team-a-images", configmap="team-a-learned",
                          shard_size=1)
    team_b = settings_for(prewarm_ns, daemonset="team-b-images", configmap="team-b-learned",
                          shard_size=1)
    learn(cluster, prewarm_ns, ["a.example.com/one:1", "a.example.com/two:1"], team_a)
    learn(cluster, prewarm_ns, ["b.example.com/one:1", "b.example.com/two:1"], team_b)
    a = Reconciler(team_a, cluster.api_client())
    b = Reconciler(team_b, cluster.api_client())
    assert b.reconcile_once().daemonsets == {"team-b-images": "created",
                                             "team-b-images-1": "created"}
    # before: team-a's pass deleted team-b-images-1 as an emptied shard of its own
    assert a.reconcile_once().daemonsets == {"team-a-images": "created",
                                             "team-a-images-1": "created"}
    assert b.reconcile_once().daemonsets == {"team-b-images": "unchanged",
                                             "team-b-images-1": "unchanged"}
    assert {ds.metadata.name for ds in apps.list_namespaced_daemon_set(prewarm_ns).items} == {
        "team-a-images", "team-a-images-1", "team-b-images", "team-b-images-1"}


def test_an_image_pinned_by_hand_under_its_own_key_is_pulled_once(cluster, core, apps,
                                                                  prewarm_ns):
    """An operator adds a record with kubectl under a key of their choosing, for an image
    the observer has learned too: one pull container, not two with the same name (which
    the API server would refuse, failing every pass), and the record moves to its key."""
    settings = settings_for(prewarm_ns)
    learn(cluster, prewarm_ns, ["docker.io/library/nginx:1.27"], settings)
    core.patch_namespaced_config_map(settings.configmap, prewarm_ns, {"data": {
        "pinned-nginx": json.dumps({"image": "nginx:1.27", "namespaces": ["ops"]}),
        "pinned-tool": json.dumps({"image": "ghcr.io/acme/tool:2"})}})
    result = Reconciler(settings, cluster.api_client()).reconcile_once()
    assert result.daemonsets == {"prewarm-images": "created"} and not result.expired
    live = apps.read_namespaced_daemon_set("prewarm-images", prewarm_ns)
    pulls = [c.image for c in live.spec.template.spec.init_containers
             if c.name.startswith("pull-")]
    assert sorted(pulls) == ["docker.io/library/nginx:1.27", "ghcr.io/acme/tool:2"]
    data = core.read_namespaced_config_map(settings.configmap, prewarm_ns).data
    assert set(data) == {key_for("docker.io/library/nginx:1.27"), key_for("ghcr.io/acme/tool:2")}
    assert json.loads(data[key_for("docker.io/library/nginx:1.27")])["namespaces"] == [
        "team", "ops"]
    assert json.loads(data[key_for("ghcr.io/acme/tool:2")])["lastSeen"]  # its TTL starts


def test_init_containers_another_field_manager_keeps_are_removed_once(cluster, core, apps,
                                                                     prewarm_ns):
    """An init container added to the DaemonSet by hand (kubectl patch), and one of ours
    edited so before its image leaves learned-images: server-side apply leaves both, as
    another field manager owns part of them. Without more, both were pulled on every
    node for ever, and every pass applied again."""
    settings = settings_for(prewarm_ns)
    learn(cluster, prewarm_ns, ["a.example.com/kept:1", "a.example.com/leaving:1"], settings)
    reconciler = Reconciler(settings, cluster.api_client())
    assert reconciler.reconcile_once().daemonsets == {"prewarm-images": "created"}
    live = apps.read_namespaced_daemon_set("prewarm-images", prewarm_ns)
    ours = {c.image: index for index, c in enumerate(live.spec.template.spec.init_containers)}
    leaving = ours["a.example.com/leaving:1"]
    added = client.ApiClient().sanitize_for_serialization(
        live.spec.template.spec.init_containers[1])  # one of ours, for another image
    added.update(name=daemonset.container_name("docker.io/library/redis:7"),
                 image="docker.io/library/redis:7")
    apps.patch_namespaced_daemon_set("prewarm-images", prewarm_ns, [
        {"op": "add", "path": "/spec/template/spec/initContainers/-", "value": added},
        {"op": "replace", "path": f"/spec/template/spec/initContainers/{leaving}/"
                                  "imagePullPolicy", "value": "Always"}],
        field_manager="kubectl-patch")
    store = LearnedImagesStore(core, namespace=prewarm_ns, name=settings.configmap)

    def forget(learned) -> bool:
        del learned.records[key_for("a.example.com/leaving:1")]
        return True

    store.update(forget)
    assert reconciler.reconcile_once().daemonsets == {"prewarm-images": "updated"}
    live = apps.read_namespaced_daemon_set("prewarm-images", prewarm_ns)
    assert [c.image for c in live.spec.template.spec.init_containers][1:] == [
        "a.example.com/kept:1"]
    assert reconciler.reconcile_once().daemonsets == {"prewarm-images": "unchanged"}


def test_a_shard_the_api_server_refuses_holds_back_no_other(cluster, apps, prewarm_ns):
    """An admission policy of the cluster's (here a ValidatingAdmissionPolicy) refuses
    the DaemonSet of one shard, for one image in it. The other shards are still applied,
    and the pass fails with the API server's reason, to be retried with backoff; before,
    the pass stopped at the refused shard, and no later shard was ever applied."""
    admission = client.AdmissionregistrationV1Api(cluster.api_client())
    policy = f"no-refused-{prewarm_ns}"
    admission.create_validating_admission_policy({
        "metadata": {"name": policy},
        "spec": {"failurePolicy": "Fail",
                 "matchConstraints": {"resourceRules": [{
                     "apiGroups": ["apps"], "apiVersions": ["v1"], "resources": ["daemonsets"],
                     "operations": ["CREATE", "UPDATE"]}]},
                 "validations": [{
                     "expression": "!object.spec.template.spec.initContainers.exists(c, "
                                   "c.image.startsWith('a-refused.example.com/'))",
                     "message": "images from a-refused.example.com are not allowed here"}]}})
    admission.create_validating_admission_policy_binding({
        "metadata": {"name": policy},
        "spec": {"policyName": policy, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {
                     "kubernetes.io/metadata.name": prewarm_ns}}}}})
    try:
        probe = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "probe"},
                 "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                     "metadata": {"labels": {"a": "b"}}, "spec": {
                         "initContainers": [{"name": "i", "image": "a-refused.example.com/x"}],
                         "containers": [{"name": "c", "image": "pause"}]}}}}

        def policy_in_force() -> bool:  # the API server loads policies in the background
            try:
                apps.create_namespaced_daemon_set(prewarm_ns, probe, dry_run="All")
            except client.ApiException as error:
                return "a-refused.example.com are not allowed" in error.body
            return False

        eventually("the admission policy in force", policy_in_force, timeout=60)
        settings = settings_for(prewarm_ns, shard_size=1)
        # seen at once, placed by name: the refused image takes shard 0, applied first
        learn(cluster, prewarm_ns, ["a-refused.example.com/app:1", "b.example.com/one:1",
                                    "b.example.com/two:1"], settings)
        with pytest.raises(client.ApiException) as refused:
            Reconciler(settings, cluster.api_client()).reconcile_once()
        assert "a-refused.example.com are not allowed here" in refused.value.body
        shards = {ds.metadata.name: [c.image for c in ds.spec.template.spec.init_containers][1:]
                  for ds in apps.list_namespaced_daemon_set(prewarm_ns).items}
        assert shards == {"prewarm-images-1": ["b.example.com/one:1"],
                          "prewarm-images-2": ["b.example.com/two:1"]}
    finally:
        admission.delete_validating_admission_policy_binding(policy)
        admission.delete_validating_admission_policy(policy)


def test_a_leader_that_loses_its_lease_mid_pass_writes_no_further_daemonset(
        cluster, core, apps, prewarm_ns):
    settings = settings_for(prewarm_ns, shard_size=1)
    learn(cluster, prewarm_ns, ["a.example.com/one:1", "a.example.com/two:1"], settings)
    reconciler = Reconciler(settings, cluster.api_client())
    lapsed = []
    patch = reconciler.apps.patch_namespaced_daemon_set

    def patch_then_lose_the_lease(*args, **kwargs):  # the real call, then the lease lapses
        answer = patch(*args, **kwargs)
        lapsed.append(args[0])
        return answer

    reconciler.apps.patch_namespaced_daemon_set = patch_then_lose_the_lease
    reconciler.may_write = lambda: not lapsed
    with pytest.raises(NotLeader):
        reconciler.reconcile_once()
    assert len(lapsed) == 1
    assert [ds.metadata.name for ds in apps.list_namespaced_daemon_set(prewarm_ns).items] == \
        lapsed


def test_pods_that_existed_before_the_reconciler_are_backfilled(cluster, core, prewarm_ns,
                                                                namespace_factory):
    team = namespace_factory("team", {"prewarm.io/learn": "enabled"})
    quiet = namespace_factory("quiet")
    for namespace, image in ((team, "backfill.example.com/legacy:2"),
                             (quiet, "backfill.example.com/unlabelled:1")):
        core.create_namespaced_pod(namespace, {"metadata": {"name": "old"}, "spec": {
            "containers": [{"name": "c", "image": image}]}})
    reconciler = Reconciler(settings_for(prewarm_ns, backfill=True), cluster.api_client())
    result = reconciler.reconcile_once()
    assert "backfill.example.com/legacy:2" in result.backfilled
    learned = learned_images(core, prewarm_ns)
    assert learned["backfill.example.com/legacy:2"]["source"] == "backfill"
    assert learned["backfill.example.com/legacy:2"]["namespaces"] == [team]
    assert "backfill.example.com/unlabelled:1" not in learned


def test_images_backfill_cannot_record_are_logged_and_counted(cluster, core, prewarm_ns,
                                                              namespace_factory, caplog):
    from prometheus_client import REGISTRY

    team = namespace_factory("crowded", {"prewarm.io/learn": "enabled"})
    images = [f"capped.example.com/app-{i}:1" for i in range(3)]
    core.create_namespaced_pod(team, {"metadata": {"name": "many"}, "spec": {
        "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]}})
    refused_before = REGISTRY.get_sample_value("prewarm_images_refused_total") or 0.0
    reconciler = Reconciler(settings_for(prewarm_ns, backfill=True, max_images_per_namespace=1),
                            cluster.api_client())
    with caplog.at_level("WARNING", logger="webhook.reconciler"):
        result = reconciler.reconcile_once()
    mine = {image: reason for image, reason in result.refused if image in images}
    assert len(mine) == 2 and len(set(images) & set(result.backfilled)) == 1
    assert all(reason == "max images per namespace (1) reached for " + team
               for reason in mine.values())
    assert (REGISTRY.get_sample_value("prewarm_images_refused_total") or 0.0) \
        >= refused_before + 2
    assert any(r.getMessage().startswith("backfill could not record") for r in caplog.records)


def running_prepuller_pod(core, namespace: str):
    """A prepuller pod kwok has finished with (Running), so its own status updates are
    over."""
    return eventually("a Running prepuller pod", lambda: next(
        (p for p in pods_of(core, namespace, "prewarm-images") if p.status.phase == "Running"),
        None), timeout=60)


def set_init_statuses(core, namespace: str, pod, statuses: list[dict], container: str,
                      reason: str) -> None:
    """Plays the kubelet: takes `pod` from kwok and gives it these init container
    statuses, until the API server shows `container` waiting with `reason`."""
    name = pod.metadata.name
    core.patch_namespaced_pod(name, namespace, {"metadata": {
        "annotations": {"kwok.x-k8s.io/status": "custom"}}})

    def visible() -> bool:
        core.patch_namespaced_pod_status(name, namespace, {
            "status": {"initContainerStatuses": statuses}})
        read = core.read_namespaced_pod(name, namespace)
        return any(s.name == container and s.state.waiting and s.state.waiting.reason == reason
                   for s in read.status.init_container_statuses or [])

    eventually(f"{container} waiting with {reason} in the pod's status", visible, timeout=30)


def test_a_pull_failure_marks_the_image_failing_removes_it_and_retries_after_backoff(
        cluster, core, apps, prewarm_ns):
    broken, good = "broken.example.com/missing:1", "docker.io/library/alpine:3.20"
    settings = settings_for(prewarm_ns, failure_backoff=4.0)
    learn(cluster, prewarm_ns, [broken, good], settings)
    reconciler = Reconciler(settings, cluster.api_client())
    reconciler.reconcile_once()
    name = daemonset.container_name(broken)
    # play the kubelet: the pull of `broken` fails on this node, the others finished
    victim = running_prepuller_pod(core, prewarm_ns)

    def failing_at(pod, reason: str) -> list[dict]:
        return [{"name": c.name, "image": c.image, "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": reason, "message": "pull access denied"}}}
                if c.name == name else
                {"name": c.name, "image": c.image, "ready": True, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}
                for c in pod.spec.init_containers]

    set_init_statuses(core, prewarm_ns, victim, failing_at(victim, "ErrImagePull"), name,
                      "ErrImagePull")

    result = reconciler.reconcile_once()
    assert result.failing == [broken]
    record = learned_images(core, prewarm_ns)[broken]
    assert record["state"] == "failing: ErrImagePull" and record["retryAt"]
    assert reconciler.failures == {broken: 1}

    def images_in_daemonset() -> list[str]:
        ds = apps.read_namespaced_daemon_set("prewarm-images", prewarm_ns)
        return [c.image for c in ds.spec.template.spec.init_containers if c.name.startswith("pull-")]

    assert images_in_daemonset() == [good]

    # the rollout that left it out replaces the pod that failed, one node at a time;
    # until then that pod still reports the failure, and a pass after the backoff would
    # count it again (as it should: the pod still cannot pull the image)
    def victim_replaced() -> bool:
        try:
            pod = core.read_namespaced_pod(victim.metadata.name, prewarm_ns)
        except client.ApiException as error:
            return error.status == 404
        return pod.metadata.deletion_timestamp is not None

    eventually("the pod that failed replaced", victim_replaced, timeout=90)

    def retried():
        reconciler.reconcile_once()
        return broken in images_in_daemonset()

    eventually("the failing image back in the DaemonSet after the backoff", retried,
               timeout=60, interval=0.5)
    assert not learned_images(core, prewarm_ns)[broken]["state"].startswith("failing")

    # it fails again after the retry: left out twice as long (8 s)
    again = eventually("a Running prepuller pod with the retried pull", lambda: next(
        (p for p in pods_of(core, prewarm_ns, "prewarm-images")
         if p.status.phase == "Running" and p.metadata.deletion_timestamp is None
         and any(c.name == name for c in p.spec.init_containers)), None), timeout=60)
    set_init_statuses(core, prewarm_ns, again, failing_at(again, "ImagePullBackOff"), name,
                      "ImagePullBackOff")
    before = time.time()
    assert reconciler.reconcile_once().failing == [broken]
    record = learned_images(core, prewarm_ns)[broken]
    assert record["state"] == "failing: ImagePullBackOff" and reconciler.failures == {broken: 2}
    assert 6 <= parse_time(record["retryAt"]) - before <= 10, record["retryAt"]

    # the registry heals: pulled on every node after the next retry, the count is gone
    def warm() -> bool:
        reconciler.reconcile_once()
        return learned_images(core, prewarm_ns)[broken]["state"] == "warm"

    eventually("the image warm after its second retry", warm, timeout=90, interval=0.5)
    assert reconciler.failures == {}


def test_a_helper_that_cannot_start_is_reported_with_its_node(cluster, core, prewarm_ns,
                                                              caplog):
    """Prewarm's own image cannot be pulled on a node (a private registry without pull
    secrets): every pull after the helper waits for ever, and no image's state says
    why. The pass names the node and the reason, and the gauge counts the pods."""
    from prometheus_client import REGISTRY

    settings = settings_for(prewarm_ns)
    learn(cluster, prewarm_ns, ["docker.io/library/alpine:3.20"], settings)
    reconciler = Reconciler(settings, cluster.api_client())
    reconciler.reconcile_once()
    victim = running_prepuller_pod(core, prewarm_ns)
    statuses = [{"name": c.name, "image": c.image, "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": "ImagePullBackOff" if c.name == daemonset.
                                       HELPER_CONTAINER else "PodInitializing"}}}
                for c in victim.spec.init_containers]
    set_init_statuses(core, prewarm_ns, victim, statuses, daemonset.HELPER_CONTAINER,
                      "ImagePullBackOff")
    with caplog.at_level("WARNING", logger="webhook.reconciler"):
        result = reconciler.reconcile_once()
    assert result.helper_failing == {victim.metadata.name: (victim.spec.node_name,
                                                            "ImagePullBackOff")}
    assert result.failing == []  # no learned image is to blame
    assert REGISTRY.get_sample_value("prewarm_prepuller_helper_failing") == 1
    assert any(f"ImagePullBackOff on {victim.spec.node_name}" in r.getMessage() and
               "ghcr.io/prewarm/prewarm:test" in r.getMessage() for r in caplog.records)


def test_reconcile_once_cli_reports_and_exits_zero(cluster, core, prewarm_ns, tmp_path):
    settings = settings_for(prewarm_ns)
    learn(cluster, prewarm_ns, ["quay.io/prometheus/node-exporter:v1.8.0"], settings)
    env = python_env(KUBECONFIG=str(cluster.kubeconfig), PREWARM_NAMESPACE=prewarm_ns,
                     PREWARM_HELPER_IMAGE="ghcr.io/prewarm/prewarm:test", PREWARM_BACKFILL="false")
    run = subprocess.run(python_module("webhook", "reconcile", "--once"), env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["daemonsets"] == {"prewarm-images": "created"}
    rendered = subprocess.run(python_module("webhook", "render"), env=env, capture_output=True,
                              text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    assert "quay.io/prometheus/node-exporter:v1.8.0" in rendered.stdout
    again = subprocess.run(python_module("webhook", "reconcile", "--once"), env=env,
                           capture_output=True, text=True, timeout=120)
    assert json.loads(again.stdout.strip().splitlines()[-1])["outcome"] == "unchanged"
    broken_env = {**env, "KUBECONFIG": str(tmp_path / "missing")}
    failed = subprocess.run(python_module("webhook", "reconcile", "--once"), env=broken_env,
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "does not exist" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_only_one_of_two_candidates_leads_and_the_other_takes_over(cluster, prewarm_ns):
    settings = settings_for(prewarm_ns, lease_duration=2.0)
    first = LeaseElector(cluster.api_client(), settings, "replica-a")
    second = LeaseElector(cluster.api_client(), settings, "replica-b")
    assert first.try_acquire() is True
    assert second.try_acquire() is False
    assert first.try_acquire() is True  # renewal
    # replica-a stops renewing: replica-b takes over once the lease has expired
    eventually("takeover", second.try_acquire, timeout=15, interval=0.5)
    assert first.try_acquire() is False
    lease = client.CoordinationV1Api(cluster.api_client()).read_namespaced_lease(
        settings.lease_name, prewarm_ns)
    assert lease.spec.holder_identity == "replica-b" and lease.spec.lease_transitions == 1


def test_each_leadership_has_its_own_term_from_its_first_moment(cluster, prewarm_ns):
    """The loop starts a leadership afresh (a full pass, backoff and failure counts
    forgotten) when term() changes. The number is there as soon as is_leader() is true,
    not when the election thread's callback runs later: a pass in between was once
    counted, then forgotten, and a failing pass retried after 2 s twice."""
    settings = settings_for(prewarm_ns, lease_duration=2.0)
    clock = [1000.0]
    first = LeaseElector(cluster.api_client(), settings, "replica-a",
                         monotonic=lambda: clock[0])
    second = LeaseElector(cluster.api_client(), settings, "replica-b")
    assert first.term() is None
    assert first.try_acquire() is True and first.term() == 1
    clock[0] += 1.0
    assert first.try_acquire() is True and first.term() == 1  # a renewal: the same term
    clock[0] += 2.5  # no renewal for longer than the lease: it lapsed, though still ours
    assert first.term() is None
    assert first.try_acquire() is True and first.term() == 2  # another may have led
    assert second.try_acquire() is False and second.term() is None
    first.release()  # a standby takes over at once, then gives it back
    assert first.term() is None
    assert second.try_acquire() is True and second.term() == 1
    second.release()
    assert first.try_acquire() is True and first.term() == 3


def test_a_leader_that_finds_another_holder_stops_leading_at_once(cluster, prewarm_ns):
    """The Lease deleted (by hand, a restore, `helm upgrade --force`) and at once
    created by a standby: the old leader, at its next renewal, sees the other holder
    and stops writing then, not when its own last renewal would have lapsed."""
    settings = settings_for(prewarm_ns, lease_duration=60.0)
    first = LeaseElector(cluster.api_client(), settings, "replica-a")
    second = LeaseElector(cluster.api_client(), settings, "replica-b")
    assert first.try_acquire() is True and first.is_leader()
    leases = client.CoordinationV1Api(cluster.api_client())
    leases.delete_namespaced_lease(settings.lease_name, prewarm_ns)
    assert second.try_acquire() is True  # creates it anew, as its holder
    assert first.try_acquire() is False
    assert not first.is_leader() and second.is_leader()


def test_running_reconciler_follows_learned_images(cluster, core, apps, prewarm_ns, tmp_path):
    """The continuous mode: a change of learned-images reaches the DaemonSet via the watch,
    well before the (long) resync period."""
    # resync and status passes an hour apart: only the watch can bring the change in time
    env = python_env(KUBECONFIG=str(cluster.kubeconfig), PREWARM_NAMESPACE=prewarm_ns,
                     PREWARM_HELPER_IMAGE="ghcr.io/prewarm/prewarm:test",
                     PREWARM_RESYNC_PERIOD="1h", PREWARM_STATUS_INTERVAL="1h",
                     PREWARM_HEALTH_PORT="0", PREWARM_LEASE_DURATION="3s")
    process = Process(python_module("webhook", "reconcile"), env, tmp_path / "reconciler.log")
    try:
        settings = settings_for(prewarm_ns)
        eventually("DaemonSet created", lambda: apps.list_namespaced_daemon_set(prewarm_ns).items,
                   timeout=60)
        learn(cluster, prewarm_ns, ["docker.io/library/postgres:17"], settings)

        def applied() -> bool:
            process.alive()
            ds = apps.read_namespaced_daemon_set("prewarm-images", prewarm_ns)
            return any(c.image == "docker.io/library/postgres:17"
                       for c in ds.spec.template.spec.init_containers)

        eventually("the watch to apply the new image", applied, timeout=30)
    finally:
        process.stop()


def test_status_lists_images_with_state_and_warm_nodes(cluster, core, prewarm_ns):
    settings = settings_for(prewarm_ns)
    learn(cluster, prewarm_ns, ["docker.io/library/nginx:1.27", "ghcr.io/acme/api:v3"], settings)
    env = python_env(KUBECONFIG=str(cluster.kubeconfig), PREWARM_NAMESPACE=prewarm_ns)
    table = subprocess.run(python_module("webhook", "status"), env=env, capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["IMAGE", "STATE", "SOURCE"]
    assert any(line.startswith("docker.io/library/nginx:1.27") and "pending" in line
               and "team" in line for line in lines)
    assert lines[-1] == f"2 images in {prewarm_ns}/learned-images"
    # a hand edit gone wrong is shown, not silently left out of the table
    core.patch_namespaced_config_map("learned-images", prewarm_ns, {"data": {
        "my-pin": '{"image": "ghcr.io/acme/tool:1", "namespaces": "ops"}'}})
    table = subprocess.run(python_module("webhook", "status"), env=env, capture_output=True,
                           text=True, timeout=60)
    assert table.stdout.splitlines()[-2:] == [
        f"2 images in {prewarm_ns}/learned-images",
        "1 keys hold values that are not valid records, or records that cannot move to their "
        "key (kept, never pulled; fix or delete them): my-pin"]
    elsewhere = subprocess.run(python_module("webhook", "status", "--namespace", "default"),
                               env=env, capture_output=True, text=True, timeout=60)
    assert elsewhere.returncode == 1 and "Traceback" not in elsewhere.stderr
    assert "cannot read ConfigMap default/learned-images: HTTP 404" in elsewhere.stderr
    assert "check --namespace / PREWARM_NAMESPACE" in elsewhere.stderr
    as_json = subprocess.run(python_module("webhook", "status", "-o", "json"), env=env,
                             capture_output=True, text=True, timeout=60)
    assert {r["image"] for r in json.loads(as_json.stdout)} == {
        "docker.io/library/nginx:1.27", "ghcr.io/acme/api:v3"}


def test_backfill_from_the_watched_pod_cache_follows_pods_without_relisting(
        cluster, core, prewarm_ns, namespace_factory):
    import threading

    from webhook.images import ImageFilter
    from webhook.podcache import PodImages

    team = namespace_factory("team", {"prewarm.io/learn": "enabled"})
    quiet = namespace_factory("quiet")
    # Prewarm's own namespace (labelled too, to be sure): the API server leaves its pods
    # out of the cache's list and watch
    own = namespace_factory("own", {"prewarm.io/learn": "enabled"})
    core.create_namespaced_pod(own, {"metadata": {"name": "early"}, "spec": {
        "containers": [{"name": "c", "image": "cache.example.com/own-early:1"}]}})
    cache = PodImages(core, ImageFilter(), skip_namespace=own)
    stop = threading.Event()
    watcher = threading.Thread(target=cache.run, args=(stop,), daemon=True)
    watcher.start()
    try:
        eventually("pod cache synced", cache.synced.is_set, timeout=30)
        # created after the list: only the watch can bring these in
        core.create_namespaced_pod(team, {"metadata": {"name": "late"}, "spec": {
            "containers": [{"name": "c", "image": "cache.example.com/late:1"}]}})
        core.create_namespaced_pod(own, {"metadata": {"name": "late"}, "spec": {
            "containers": [{"name": "c", "image": "cache.example.com/own-late:1"}]}})
        core.create_namespaced_pod(quiet, {"metadata": {"name": "late"}, "spec": {
            "containers": [{"name": "c", "image": "cache.example.com/quiet:1"}]}})
        seen = eventually("the new pod's image in the cache", lambda: (lambda o: o if
                          "cache.example.com/late:1" in o else None)(
            cache.observations({team, own}, 0.0)), timeout=30)
        assert seen["cache.example.com/late:1"].namespaces == {team}
        assert "cache.example.com/quiet:1" not in seen  # not an opted-in namespace
        assert not {"cache.example.com/own-early:1", "cache.example.com/own-late:1"} & set(seen)

        reconciler = Reconciler(settings_for(prewarm_ns, backfill=True), cluster.api_client())
        reconciler.pod_images = cache
        assert "cache.example.com/late:1" in reconciler.reconcile_once().backfilled

        def lists_in(**once) -> float:
            """Fewest pod LISTs the API server served during one pass, of three: others
            (the namespace controller emptying earlier tests' namespaces) only add."""
            counts = []
            for _ in range(3):
                before = pod_lists(cluster)
                reconciler.reconcile_once(**once)
                counts.append(pod_lists(cluster) - before)
            return min(counts)

        # the prepuller pods, watched as run() does: what a pass reads from the cache is
        # what a list gives
        prepuller = reconciler.watch_prepuller_pods()
        threading.Thread(target=prepuller.run, args=(stop,), daemon=True).start()
        eventually("prepuller pod cache synced", prepuller.synced.is_set, timeout=30)

        def cached_and_listed() -> tuple[set, set]:
            reconciler.prepuller_cache = None
            listed = set(reconciler.prepuller_pods())
            reconciler.prepuller_cache = prepuller
            return set(reconciler.prepuller_pods()), listed

        cached, listed = eventually("the cache to match a list and hold every node's pod",
                                    lambda: (lambda c, lst: (c, lst) if c == lst and len(c) >=
                                             NODES else None)(*cached_and_listed()), timeout=60)
        assert {pod.node for pod in cached} >= set(cluster.node_names)

        # a pass from both caches lists no pods at all; without the prepuller cache it
        # lists its prepuller pods; backfill by listing lists every opted-in namespace's too
        from_caches = lists_in()
        reconciler.prepuller_cache = None
        with_cache, without = lists_in(), lists_in(backfill=False)
        reconciler.pod_images = None
        by_listing = lists_in()
        assert from_caches == 0 < with_cache == without < by_listing, (
            from_caches, with_cache, without, by_listing)

        core.delete_namespaced_pod("late", team, grace_period_seconds=0)
        eventually("the deleted pod gone from the cache", lambda: "cache.example.com/late:1"
                   not in cache.observations({team}, 0.0), timeout=30)
    finally:
        stop.set()


def pod_lists(cluster) -> float:
    """LIST requests for pods in one namespace the API server has served. Namespaced
    only: the pod cache's own relist (after its watch breaks) and the controllers' are
    cluster-wide, and would blur the count."""
    return apiserver_metric(cluster, "apiserver_request_total", 'resource="pods"',
                            'verb="LIST"', 'scope="namespace"')


def test_a_pass_that_keeps_failing_is_retried_ever_less_often_and_counted(
        cluster, core, prewarm_ns, tmp_path):
    """learned-images made immutable by hand: every pass must write (the new image's
    shard) and gets 422. The reconciler says so with the API server's reason, waits 2 s,
    then 4 s, ... between attempts, and counts each failure."""
    from hack.controlplane import free_port

    learn(cluster, prewarm_ns, ["immutable.example.com/app:1"], settings_for(prewarm_ns))
    core.patch_namespaced_config_map("learned-images", prewarm_ns, {"immutable": True})
    port = free_port()
    env = python_env(KUBECONFIG=str(cluster.kubeconfig), PREWARM_NAMESPACE=prewarm_ns,
                     PREWARM_HELPER_IMAGE="ghcr.io/prewarm/prewarm:test",
                     PREWARM_HEALTH_PORT=str(port), PREWARM_BACKFILL="false",
                     PREWARM_STATUS_INTERVAL="1s")
    process = Process(python_module("webhook", "reconcile"), env, tmp_path / "reconciler.log")
    try:
        log = eventually("a third failed pass", lambda: (lambda out: out if
                         "(3 in a row)" in out else None)(process.output()), timeout=90)
        failures = [line for line in log.splitlines() if "reconcile pass failed" in line]
        assert [line.split("next attempt in ")[1].split("s:")[0] for line in failures[:3]] \
            == ["2", "4", "8"]
        assert "field is immutable when `immutable` is set" in failures[0]
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            scrape = page.read().decode()
        assert any(line.startswith('prewarm_reconciles_total{outcome="error"} ') and
                   float(line.split()[-1]) >= 3 for line in scrape.splitlines()), scrape
        # ready all the same (a restart would not help), and the body says why not well
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as page:
            ready = json.loads(page.read())
        assert ready["status"] == "ok" and ready["leader"] is True
        assert ready["failedPasses"] >= 3
        from tests.support import loopback_ipv6

        if loopback_ipv6():  # an IPv6-only cluster probes the pod's IPv6 address
            with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=10) as page:
                assert json.loads(page.read()) == {"status": "ok"}
    finally:
        process.stop()
        core.delete_namespaced_config_map("learned-images", prewarm_ns)


def test_a_stopped_leader_releases_its_lease(cluster, prewarm_ns, tmp_path):
    env = python_env(KUBECONFIG=str(cluster.kubeconfig), PREWARM_NAMESPACE=prewarm_ns,
                     PREWARM_HELPER_IMAGE="ghcr.io/prewarm/prewarm:test",
                     PREWARM_HEALTH_PORT="0", PREWARM_IDENTITY="replica-x",
                     PREWARM_BACKFILL="false")
    process = Process(python_module("webhook", "reconcile"), env, tmp_path / "reconciler.log")
    leases = client.CoordinationV1Api(cluster.api_client())

    def holder():
        try:
            return leases.read_namespaced_lease("prewarm-reconciler", prewarm_ns).spec.holder_identity
        except client.ApiException:
            return None

    try:
        eventually("replica-x leading", lambda: holder() == "replica-x", timeout=60)
        # created by the reconciler (no chart here), labelled as everything Prewarm creates
        assert leases.read_namespaced_lease("prewarm-reconciler", prewarm_ns).metadata.labels \
            == {"app.kubernetes.io/name": "prewarm", "app.kubernetes.io/managed-by": "prewarm",
                "app.kubernetes.io/component": "reconciler"}
        process.stop(sig=15)
        assert process.popen.returncode == 0, process.output()[-2000:]
        assert holder() is None  # a standby can take over at once
        assert "released the lease" in process.output()
    finally:
        process.stop()
