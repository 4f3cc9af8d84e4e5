"""The desired DaemonSets as a pure function of the learned set."""

from __future__ import annotations

import re

from webhook import daemonset
from webhook.settings import Settings
from webhook.store import LearnedSet, Observation, merge, parse_time, rfc3339

NOW = parse_time("2026-11-21T12:00:00Z")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def learned_with(images: list[str], namespaces_of=lambda i: ["ns"]) -> LearnedSet:
    learned = LearnedSet()
    observed = {}
    for index, image in enumerate(images):
        seen = Observation()
        for namespace in namespaces_of(index):
            seen.add(namespace, NOW - 1000 + index)
        observed[image] = seen
    merge(learned, observed, source="admission",
          settings=Settings(max_images=100000, max_images_per_namespace=100000,
                            max_bytes=10**8))
    return learned


def persist(learned: LearnedSet, settings: Settings) -> None:
    """What the reconciler does with assign_shards' answer."""
    by_image = learned.by_image()
    for image, shard in daemonset.assign_shards(learned, settings).items():
        by_image[image].extra["shard"] = shard


def test_each_image_becomes_a_pull_init_container_running_the_helper():
    settings = Settings(namespace="prewarm")
    (manifest,) = daemonset.desired_daemonsets(
        learned_with(["docker.io/library/nginx:latest", "gcr.io/distroless/static:nonroot"]),
        settings, now=NOW)
    spec = manifest["spec"]["template"]["spec"]
    helper, *pulls = spec["initContainers"]
    assert helper["image"] == settings.helper_image
    assert helper["command"] == ["cp", settings.helper_path, daemonset.HELPER_BINARY]
    assert {c["image"] for c in pulls} == {"docker.io/library/nginx:latest",
                                           "gcr.io/distroless/static:nonroot"}
    for container in pulls:
        assert DNS_LABEL.match(container["name"]) and container["name"].startswith("pull-")
        assert container["command"] == [daemonset.HELPER_BINARY]  # no shell needed
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert container["resources"]["limits"] and container["resources"]["requests"]
        context = container["securityContext"]
        assert context["runAsUser"] == 65532 and context["runAsNonRoot"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["allowPrivilegeEscalation"] is False
    assert spec["containers"][0]["name"] == "pause"
    assert spec["automountServiceAccountToken"] is False
    assert spec["terminationGracePeriodSeconds"] == 0
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert manifest["metadata"]["name"] == "prewarm-images"
    assert manifest["metadata"]["namespace"] == "prewarm"


def test_same_input_gives_the_same_manifest_and_names_are_stable():
    settings = Settings()
    learned = learned_with([f"a.io/img{i}:1" for i in range(10)])
    first = daemonset.desired_daemonsets(learned, settings, now=NOW)
    again = daemonset.desired_daemonsets(learned, settings, now=NOW + 50)
    assert first == again
    assert daemonset.container_name("a.io/x:1") == daemonset.container_name("a.io/x:1")
    assert daemonset.container_name("a.io/x:1") != daemonset.container_name("a.io/x:2")


def test_more_used_images_are_placed_first_and_usage_changes_do_not_reorder():
    settings = Settings(shard_size=2)
    learned = learned_with(["a.io/rare:1", "a.io/popular:1", "a.io/medium:1"],
                           namespaces_of=lambda i: [["a"], ["a", "b", "c"], ["a", "b"]][i])
    persist(learned, settings)
    first, second = daemonset.desired_daemonsets(learned, settings, now=NOW)

    def pulls(manifest):
        return [c["image"] for c in manifest["spec"]["template"]["spec"]["initContainers"][1:]]

    # the two most used land in shard 0, in stable (first seen) order
    assert sorted(pulls(first)) == ["a.io/medium:1", "a.io/popular:1"]
    assert pulls(second) == ["a.io/rare:1"]
    # the rare image becomes the most used: nothing moves, nothing rolls
    learned.get("a.io/rare:1").namespaces.extend(["x", "y", "z", "w"])
    persist(learned, settings)
    assert daemonset.desired_daemonsets(learned, settings, now=NOW) == [first, second]


def test_a_failing_record_without_retry_time_is_not_left_out_forever():
    learned = learned_with(["a.io/x:1"])
    learned.get("a.io/x:1").state = "failing: ErrImagePull"
    (manifest,) = daemonset.desired_daemonsets(learned, Settings(), now=NOW)
    assert [c["image"] for c in manifest["spec"]["template"]["spec"]["initContainers"][1:]] == [
        "a.io/x:1"]


def test_adding_one_image_to_300_changes_only_one_shard():
    settings = Settings(shard_size=100)
    learned = learned_with([f"a.io/img{i:03d}:1" for i in range(300)])
    persist(learned, settings)
    before = {m["metadata"]["name"]: m for m in
              daemonset.desired_daemonsets(learned, settings, now=NOW)}
    assert sorted(before) == ["prewarm-images", "prewarm-images-1", "prewarm-images-2"]
    merge(learned, {"a.io/newcomer:1": Observation({"ns"}, NOW, NOW)}, source="admission",
          settings=Settings(max_images_per_namespace=1000))
    persist(learned, settings)
    after = {m["metadata"]["name"]: m for m in
             daemonset.desired_daemonsets(learned, settings, now=NOW)}
    changed = [name for name in after if before.get(name) != after[name]]
    assert changed == ["prewarm-images-3"]


def test_only_the_reconcilers_own_shards_say_managed_by_prewarm():
    """The first DaemonSet is the chart's placeholder: its managed-by label stays Helm's,
    or a reinstall could not adopt it. Later shards, and every pre-pull pod, are Prewarm's
    (the reconciler deletes an emptied shard only when it says so)."""
    settings = Settings(shard_size=1)
    learned = learned_with(["a.io/one:1", "a.io/two:1"])
    persist(learned, settings)
    first, second = daemonset.desired_daemonsets(learned, settings, now=NOW)
    key = "app.kubernetes.io/managed-by"
    assert first["metadata"]["name"] == settings.daemonset
    assert key not in first["metadata"]["labels"]
    assert second["metadata"]["labels"][key] == "prewarm"
    for manifest in (first, second):
        assert manifest["spec"]["template"]["metadata"]["labels"][key] == "prewarm"
        assert manifest["spec"]["selector"]["matchLabels"].items() <= \
            manifest["metadata"]["labels"].items()


def test_removing_an_image_changes_only_its_shard_and_the_slot_is_reused():
    settings = Settings(shard_size=2)
    learned = learned_with(["a.io/a:1", "a.io/b:1", "a.io/c:1", "a.io/d:1"])
    persist(learned, settings)
    victim = learned.get("a.io/a:1")
    victim_shard = victim.extra["shard"]
    del learned.records[next(k for k, r in learned.records.items() if r.image == "a.io/a:1")]
    merge(learned, {"a.io/e:1": Observation({"ns"}, NOW, NOW)}, source="admission",
          settings=Settings())
    persist(learned, settings)
    assert learned.get("a.io/e:1").extra["shard"] == victim_shard
    assert len(daemonset.desired_daemonsets(learned, settings, now=NOW)) == 2


def test_failing_images_are_left_out_until_their_retry_time():
    learned = learned_with(["a.io/good:1", "a.io/broken:1"])
    record = learned.get("a.io/broken:1")
    record.state = "failing: ErrImagePull"
    record.extra["retryAt"] = rfc3339(NOW + 600)

    def pulled(now):
        (manifest,) = daemonset.desired_daemonsets(learned, Settings(), now=now)
        return [c["image"] for c in manifest["spec"]["template"]["spec"]["initContainers"][1:]]

    assert pulled(NOW) == ["a.io/good:1"]
    assert "a.io/broken:1" in pulled(NOW + 601)


def test_scheduling_settings_reach_the_pod_template():
    settings = Settings(tolerations=[{"operator": "Exists"}], priority_class="low",
                        image_pull_secrets=("regcred",), max_unavailable="3",
                        affinity={"nodeAffinity": {}}, node_selector={"pool": "gpu"})
    (manifest,) = daemonset.desired_daemonsets(LearnedSet(), settings, now=NOW)
    spec = manifest["spec"]["template"]["spec"]
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["priorityClassName"] == "low"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"pool": "gpu"} and spec["affinity"] == {"nodeAffinity": {}}
    assert manifest["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 3


def test_only_its_own_shards_belong_to_a_reconciler():
    settings = Settings(daemonset="team-a-images")
    own = ["team-a-images", "team-a-images-1", "team-a-images-12"]
    others = ["team-b-images", "team-b-images-1", "team-a-images-", "team-a-images-01",
              "team-a-images-x", "team-a-images-1-2", "team-a", "prewarm-images"]
    assert [daemonset.is_own_shard(n, settings) for n in own] == [True] * len(own)
    assert [daemonset.is_own_shard(n, settings) for n in others] == [False] * len(others)


def test_a_shard_number_past_what_the_images_need_is_placed_anew():
    """A hand edit (or a larger shard size before) leaves a record in shard 10**50, whose
    DaemonSet name the API server refuses (a label value of over 63 characters), failing
    every pass: such a record is placed again, as are shard numbers that are not."""
    settings = Settings(shard_size=2, max_images=10)
    learned = learned_with(["a.io/a:1", "a.io/b:1", "a.io/c:1", "a.io/d:1"])
    persist(learned, settings)
    learned.get("a.io/a:1").extra["shard"] = 10 ** 50
    learned.get("a.io/b:1").extra["shard"] = True
    # max_images=10 at 2 a shard makes shards 0 to 4: 4 is kept, 5 is not
    learned.get("a.io/c:1").extra["shard"] = 4
    learned.get("a.io/d:1").extra["shard"] = 5
    persist(learned, settings)
    shards = {r.image: r.extra["shard"] for r in learned.records.values()}
    assert shards["a.io/c:1"] == 4
    assert all(type(s) is int and 0 <= s < 5 for s in shards.values()), shards
    names = [m["metadata"]["name"] for m in daemonset.desired_daemonsets(learned, settings,
                                                                         now=NOW)]
    assert all(len(name) <= 63 for name in names), names
