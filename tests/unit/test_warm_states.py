"""warm / pending from the prepuller pods' statuses (reconciler.apply_warm_states), as pure
logic on the objects the API server returns."""

from __future__ import annotations

from webhook import daemonset
from webhook.reconciler import PrepullerPod, apply_warm_states, failed_pulls, helper_failures
from webhook.settings import Settings
from webhook.store import LearnedSet, Observation, merge, parse_time

NOW = parse_time("2026-11-22T10:00:00Z")
IMAGE = "docker.io/library/nginx:1.27"
PULL = daemonset.container_name(IMAGE)


def learned_set(state: str = "pending", warm_nodes: int = 0) -> LearnedSet:
    learned = LearnedSet()
    merge(learned, {IMAGE: Observation({"team"}, NOW, NOW)}, source="admission",
          settings=Settings())
    (record,) = learned.records.values()
    record.state = state
    if warm_nodes:
        record.extra["warmNodes"] = warm_nodes
    return learned


def live(*, generation: int = 1, observed: int = 1, desired: int = 3,
         updated: int = 3) -> dict:
    return {"prewarm-images": {
        "metadata": {"name": "prewarm-images", "generation": generation},
        "spec": {"template": {"spec": {"initContainers": [
            {"name": "prewarm-helper", "image": "helper"}, {"name": PULL, "image": IMAGE}]}}},
        "status": {"observedGeneration": observed, "desiredNumberScheduled": desired,
                   "updatedNumberScheduled": updated}}}


def pod(node: str, *, pulled: bool) -> PrepullerPod:
    state = ({"terminated": {"exitCode": 0}} if pulled
             else {"waiting": {"reason": "PodInitializing"}})
    return PrepullerPod.of({"spec": {"nodeName": node},
                            "status": {"initContainerStatuses": [{"name": PULL, "state": state}]}})


def state_of(learned: LearnedSet) -> tuple[str, int]:
    (record,) = learned.records.values()
    return record.state, record.extra.get("warmNodes", 0)


def test_warm_once_the_pull_finished_on_every_scheduled_node():
    learned = learned_set()
    pods = [pod("n1", pulled=True), pod("n2", pulled=True), pod("n3", pulled=False)]
    assert apply_warm_states(learned, Settings(), live(), pods, {PULL: IMAGE})
    assert state_of(learned) == ("pending", 2)
    pods[2] = pod("n3", pulled=True)
    assert apply_warm_states(learned, Settings(), live(), pods, {PULL: IMAGE})
    assert state_of(learned) == ("warm", 3)
    assert not apply_warm_states(learned, Settings(), live(), pods, {PULL: IMAGE})


def test_a_warm_image_stays_warm_while_its_daemonset_rolls_out():
    # another image joined the shard: n3's pod is replaced and its new pod has not got
    # to this pull yet, but n3 still holds the image
    learned = learned_set("warm", 3)
    pods = [pod("n1", pulled=True), pod("n2", pulled=True), pod("n3", pulled=False)]
    for rolling in (live(generation=2, observed=1), live(generation=2, observed=2, updated=2)):
        assert not apply_warm_states(learned, Settings(), rolling, pods, {PULL: IMAGE})
        assert state_of(learned) == ("warm", 3)


def test_a_new_node_makes_a_warm_image_pending_until_it_pulled_there_too():
    learned = learned_set("warm", 3)
    pods = [pod(n, pulled=True) for n in ("n1", "n2", "n3")] + [pod("n4", pulled=False)]
    assert apply_warm_states(learned, Settings(), live(desired=4, updated=4), pods,
                             {PULL: IMAGE})
    assert state_of(learned) == ("pending", 3)


def test_a_daemonset_scheduling_no_pod_makes_nothing_warm():
    learned = learned_set()
    assert not apply_warm_states(learned, Settings(), live(desired=0, updated=0), [],
                                 {PULL: IMAGE})
    assert state_of(learned) == ("pending", 0)


def full_pod(*, deleting: bool = False) -> dict:
    """A prepuller pod as the API server lists it (abridged): the helper done, one pull
    done, one pull failing, one not started."""
    done = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    metadata = {"name": "prewarm-images-x1", "namespace": "prewarm",
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]}
    if deleting:
        metadata["deletionTimestamp"] = "2026-11-22T09:00:00Z"
    return {"metadata": metadata,
            "spec": {"nodeName": "n1", "initContainers": [{"name": PULL, "image": IMAGE}]},
            "status": {"initContainerStatuses": [
                {"name": daemonset.HELPER_CONTAINER, "state": done},
                {"name": PULL, "state": done},
                {"name": "pull-broken", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                              "message": "back-off"}}},
                {"name": "pull-later", "state": {"waiting": {"reason": "PodInitializing"}}},
                {"name": "pull-crashed", "state": {"terminated": {"exitCode": 1}}}]}}


def test_a_prepuller_pod_is_kept_as_what_a_pass_reads():
    kept = PrepullerPod.of(full_pod())
    assert kept == PrepullerPod(name="prewarm-images-x1", node="n1", terminating=False,
                                pulled=frozenset({daemonset.HELPER_CONTAINER, PULL}),
                                failing=(("pull-broken", "ImagePullBackOff"),))
    assert PrepullerPod.of(full_pod(deleting=True)).terminating


def test_a_terminating_pods_old_failures_mark_nothing_failing():
    # a pod stuck terminating on a lost node keeps its last statuses for ever: they
    # must not mark the image failing again at each retry
    containers = {"pull-broken": "registry.example.com/broken:1"}
    assert failed_pulls([PrepullerPod.of(full_pod())], containers) == {
        "registry.example.com/broken:1": "ImagePullBackOff"}
    assert failed_pulls([PrepullerPod.of(full_pod(deleting=True))], containers) == {}
    helper_stuck = full_pod(deleting=True)
    helper_stuck["status"]["initContainerStatuses"][0]["state"] = {
        "waiting": {"reason": "ErrImagePull"}}
    assert helper_failures([PrepullerPod.of(helper_stuck)]) == {}
    helper_stuck["metadata"].pop("deletionTimestamp")
    assert helper_failures([PrepullerPod.of(helper_stuck)]) == {
        "prewarm-images-x1": ("n1", "ErrImagePull")}
