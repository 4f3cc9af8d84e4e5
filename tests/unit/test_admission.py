"""The pure review function: which images a review yields, and which bodies are refused."""

from __future__ import annotations

import copy

import pytest

from webhook import admission, images

CONTAINERS = {"initContainers": [{"name": "init", "image": "busybox:1.36"}],
              "containers": [{"name": "app", "image": "nginx"},
                             {"name": "side", "image": "ghcr.io/acme/proxy:v2"}],
              "ephemeralContainers": [{"name": "dbg", "image": "localhost:5000/debug"}]}
EXPECTED = ("docker.io/library/busybox:1.36", "docker.io/library/nginx:latest",
            "ghcr.io/acme/proxy:v2", "localhost:5000/debug:latest")


def template(spec: dict) -> dict:
    return {"spec": {"template": {"spec": spec}}}


OBJECTS = {
    ("", "Pod"): {"spec": CONTAINERS},
    ("", "ReplicationController"): template(CONTAINERS),
    ("apps", "Deployment"): template(CONTAINERS),
    ("apps", "StatefulSet"): template(CONTAINERS),
    ("apps", "DaemonSet"): template(CONTAINERS),
    ("apps", "ReplicaSet"): template(CONTAINERS),
    ("batch", "Job"): template(CONTAINERS),
    ("batch", "CronJob"): {"spec": {"jobTemplate": template(CONTAINERS)}},
}


def make_review(group="", kind="Pod", obj=None, *, operation="CREATE", namespace="team-a",
                dry_run=False, uid="3f1c") -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "kind": {"group": group, "version": "v1", "kind": kind},
                        "namespace": namespace, "operation": operation, "dryRun": dry_run,
                        "object": copy.deepcopy(obj if obj is not None else OBJECTS[(group, kind)])}}


@pytest.mark.parametrize("group,kind", list(OBJECTS), ids=[k for _, k in OBJECTS])
def test_every_observed_kind_yields_all_container_images_normalized(group, kind):
    outcome = admission.review(make_review(group, kind))
    assert outcome.images == EXPECTED
    assert outcome.response == {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                "response": {"uid": "3f1c", "allowed": True}}


def test_update_of_a_workload_is_observed():
    outcome = admission.review(make_review("apps", "Deployment", operation="UPDATE"))
    assert outcome.images == EXPECTED


def test_dry_run_is_allowed_and_records_nothing():
    outcome = admission.review(make_review(dry_run=True))
    assert outcome.response["response"]["allowed"] is True
    assert outcome.images == () and outcome.skipped == "dry-run"


def test_excluded_namespace_records_nothing():
    outcome = admission.review(make_review(namespace="prewarm"),
                               excluded_namespaces=frozenset({"prewarm", "kube-system"}))
    assert outcome.images == () and outcome.skipped == "excluded-namespace"


def test_delete_is_allowed_without_looking_at_the_object():
    outcome = admission.review(make_review(operation="DELETE", obj={}))
    assert outcome.response["response"] == {"uid": "3f1c", "allowed": True}
    assert outcome.images == ()


def test_invalid_references_are_reported_not_recorded_and_do_not_block():
    obj = {"spec": {"containers": [{"name": "a", "image": "Bad/UPPER:1"},
                                   {"name": "b", "image": "nginx@sha256:abc"},
                                   {"name": "c", "image": "redis:7"}]}}
    outcome = admission.review(make_review(obj=obj))
    assert outcome.response["response"]["allowed"] is True
    assert outcome.images == ("docker.io/library/redis:7",)
    assert [ref for ref, _ in outcome.rejected] == ["Bad/UPPER:1", "nginx@sha256:abc"]
    assert all(reason for _, reason in outcome.rejected)


def test_duplicate_spellings_of_one_image_are_one_record():
    obj = {"spec": {"containers": [{"name": "a", "image": "nginx"},
                                   {"name": "b", "image": "docker.io/library/nginx:latest"},
                                   {"name": "c", "image": "index.docker.io/library/nginx"}]}}
    assert admission.review(make_review(obj=obj)).images == ("docker.io/library/nginx:latest",)


def test_deny_list_filters_images():
    image_filter = images.ImageFilter(deny=["ghcr.io/acme"])
    outcome = admission.review(make_review(), image_filter=image_filter)
    assert "ghcr.io/acme/proxy:v2" not in outcome.images
    assert [image for image, _ in outcome.filtered] == ["ghcr.io/acme/proxy:v2"]


def test_template_without_image_is_skipped_not_refused():
    obj = template({"containers": [{"name": "a"}, {"name": "b", "image": "nginx"}]})
    outcome = admission.review(make_review("apps", "Deployment", obj))
    assert outcome.images == ("docker.io/library/nginx:latest",)


def _without(path: list[str]) -> dict:
    review = make_review()
    node = review
    for step in path[:-1]:
        node = node[step]
    del node[path[-1]]
    return review


def _with(path: list[str], value, *, base: dict | None = None) -> dict:
    review = make_review() if base is None else base
    node = review
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return review


BAD = {
    "not an object": [1, 2],
    "string body": "AdmissionReview",
    "null body": None,
    "wrong kind": _with(["kind"], "Pod"),
    "wrong apiVersion": _with(["apiVersion"], "admission.k8s.io/v1beta1"),
    "no request": _without(["request"]),
    "request is a list": _with(["request"], []),
    "no uid": _without(["request", "uid"]),
    "empty uid": _with(["request", "uid"], ""),
    "numeric uid": _with(["request", "uid"], 42),
    "no kind": _without(["request", "kind"]),
    "kind is a string": _with(["request", "kind"], "Pod"),
    "unknown kind": _with(["request", "kind"], {"group": "", "version": "v1", "kind": "Secret"}),
    "group of wrong type": _with(["request", "kind"], {"group": 1, "version": "v1", "kind": "Pod"}),
    "no operation": _without(["request", "operation"]),
    "unknown operation": _with(["request", "operation"], "PATCH"),
    "unknown kind, DELETE": _with(["request", "kind"], {"group": "", "version": "v1",
                                                        "kind": "Secret"},
                                  base=make_review(operation="DELETE", obj={})),
    "namespace not a string": _with(["request", "namespace"], ["a"]),
    "dryRun not a bool": _with(["request", "dryRun"], "yes"),
    "no object": _without(["request", "object"]),
    "object is a list": _with(["request", "object"], []),
    "pod without spec": _with(["request", "object"], {"metadata": {}}),
    "containers not a list": _with(["request", "object"], {"spec": {"containers": {"a": 1}}}),
    "container not an object": _with(["request", "object"], {"spec": {"containers": ["nginx"]}}),
    "image not a string": _with(["request", "object"],
                                {"spec": {"containers": [{"name": "a", "image": 7}]}}),
    "deployment without template": make_review("apps", "Deployment", {"spec": {"replicas": 1}}),
}


MESSAGES = [
    ("wrong kind", "kind must be 'AdmissionReview', got 'Pod'"),
    ("wrong apiVersion", "apiVersion must be 'admission.k8s.io/v1' (admissionReviewVersions: "
                         "[v1]), got 'admission.k8s.io/v1beta1'"),
    ("unknown kind", "kind Secret is not observed (Pods and pod-template workloads only)"),
    ("unknown kind, DELETE", "kind Secret is not observed (Pods and pod-template workloads "
                             "only)"),
    ("unknown operation", "request.operation must be one of CREATE, UPDATE, DELETE, CONNECT, "
                          "got 'PATCH'"),
    ("pod without spec", "request.object.spec must be an object"),
    ("deployment without template", "request.object.spec.template must be an object"),
    ("containers not a list", "spec.containers must be a list"),
    ("container not an object", "spec.containers[0] must be an object"),
    ("image not a string", "spec.containers[0].image must be a string"),
    ("not an object", "body must be a JSON object (an AdmissionReview)"),
    ("string body", "body must be a JSON object (an AdmissionReview)"),
    ("null body", "body must be a JSON object (an AdmissionReview)"),
    ("no request", "review has no 'request' object"),
    ("request is a list", "review's 'request' must be an object"),
    ("no uid", "request.uid must be a non-empty string"),
    ("empty uid", "request.uid must be a non-empty string"),
    ("numeric uid", "request.uid must be a non-empty string"),
    ("no kind", "request.kind must be an object with a string 'kind'"),
    ("kind is a string", "request.kind must be an object with a string 'kind'"),
    ("group of wrong type", "request.kind.group must be a string"),
    ("no operation", "request.operation must be one of CREATE, UPDATE, DELETE, CONNECT, got None"),
    ("namespace not a string", "request.namespace must be a string"),
    ("dryRun not a bool", "request.dryRun must be a boolean"),
    ("no object", "request.object must be an object"),
    ("object is a list", "request.object must be an object"),
]


@pytest.mark.parametrize("case,message", MESSAGES, ids=[c for c, _ in MESSAGES])
def test_the_message_names_what_is_wrong_and_where(case, message):
    with pytest.raises(admission.BadReview) as caught:
        admission.review(BAD[case])
    assert str(caught.value) == message


def test_every_malformed_review_has_its_message():
    cases = [case for case, _ in MESSAGES]
    assert sorted(cases) == sorted(BAD) and len(cases) == len(set(cases))


# -- /mutate -----------------------------------------------------------------------------

def _patch_of(answer: dict) -> list:
    import base64
    import json

    response = answer["response"]
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"]))


def test_mutate_relaxes_always_only_for_warm_images():
    obj = {"spec": {"initContainers": [{"name": "i", "image": "busybox", "imagePullPolicy": "Always"}],
                    "containers": [{"name": "a", "image": "nginx", "imagePullPolicy": "Always"},
                                   {"name": "b", "image": "redis:7", "imagePullPolicy": "Always"},
                                   {"name": "c", "image": "ghcr.io/x/y:1",
                                    "imagePullPolicy": "IfNotPresent"}]}}
    warm = frozenset({"docker.io/library/nginx:latest", "docker.io/library/busybox:latest",
                      "ghcr.io/x/y:1"})
    answer = admission.mutate(make_review(obj=obj), warm=warm)
    assert answer["response"]["allowed"] is True and answer["response"]["uid"] == "3f1c"
    assert sorted(op["path"] for op in _patch_of(answer)) == [
        "/spec/containers/0/imagePullPolicy", "/spec/initContainers/0/imagePullPolicy"]
    assert all(op["value"] == "IfNotPresent" for op in _patch_of(answer))


def test_mutate_is_idempotent_and_adds_no_patch_when_nothing_changes():
    import jsonpatch

    obj = {"spec": {"containers": [{"name": "a", "image": "nginx:latest", "imagePullPolicy": "Always"}]}}
    warm = frozenset({"docker.io/library/nginx:latest"})
    first = _patch_of(admission.mutate(make_review(obj=obj), warm=warm))
    patched = jsonpatch.apply_patch(obj, first)
    assert patched["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert "patch" not in admission.mutate(make_review(obj=patched), warm=warm)["response"]
    assert "patch" not in admission.mutate(make_review(obj=obj), warm=frozenset())["response"]


def test_mutate_applies_the_api_server_default_when_the_policy_is_missing():
    obj = {"spec": {"containers": [{"name": "a", "image": "nginx"},
                                   {"name": "b", "image": "redis:7"}]}}
    warm = frozenset({"docker.io/library/nginx:latest", "docker.io/library/redis:7"})
    patch = _patch_of(admission.mutate(make_review(obj=obj), warm=warm))
    # nginx defaults to Always (latest) and is relaxed; redis:7 defaults to IfNotPresent
    assert patch == [{"op": "add", "path": "/spec/containers/0/imagePullPolicy",
                      "value": "IfNotPresent"}]


def test_mutate_ignores_workloads_and_updates_and_rejects_malformed():
    warm = frozenset({"docker.io/library/nginx:latest"})
    assert "patch" not in admission.mutate(make_review("apps", "Deployment"), warm=warm)["response"]
    assert "patch" not in admission.mutate(make_review(operation="UPDATE"), warm=warm)["response"]
    with pytest.raises(admission.BadReview):
        admission.mutate(BAD["no uid"], warm=warm)


def test_reviews_of_thousands_of_images_leave_nothing_behind_in_memory():
    """Small lists repeat and are remembered; a review may carry thousands of images (up
    to the body limit), or hundreds of short names, and what it leaves behind must not
    grow with each distinct one."""
    import gc
    import tracemalloc

    def huge(index: int) -> dict:
        if index % 2:  # many short names: under 2,048 characters in all
            images = [f"i{index % 100:02d}{n:03d}" for n in range(300)]
        else:
            images = [f"reg{index}.example.com/team/app-{n:05d}:v1" for n in range(1000)]
        containers = [{"name": f"c{n}", "image": image} for n, image in enumerate(images)]
        return make_review(obj={"spec": {"containers": containers}})

    tracemalloc.start()  # before the warm-up, so what it makes and later frees is traced
    try:
        # fill what is bounded by entries and made once: images.parse's cache of 8,192
        # valid references (each a few hundred characters at most, by the grammar; 40
        # reviews of MAX_IMAGES_PER_OBJECT read), ...
        for index in range(-40, 0):
            admission.review(huge(index))
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for index in range(30):
            outcome = admission.review(huge(index))
            assert len(outcome.images) == admission.MAX_IMAGES_PER_OBJECT
            assert len(outcome.rejected) == (300 if index % 2 else 1000) - len(outcome.images)
        del outcome
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 15 reviews of 1,000 references and 15 of 300 short names are some 3 MB of strings:
    # none of it may stay
    assert kept < 512 * 1024, f"{kept} bytes kept after 30 distinct reviews"


def test_an_object_past_the_image_cap_has_the_rest_counted_not_parsed():
    """A review may name thousands of images, each invalid one costing its whole parse:
    past MAX_IMAGES_PER_OBJECT distinct references the rest are rejected unread (and
    counted as such by the caller), so one review cannot hold a worker for seconds."""
    cap = admission.MAX_IMAGES_PER_OBJECT
    names = [f"ghcr.io/acme/app-{n:04d}:v1" for n in range(cap + 44)]
    containers = [{"name": f"c{n}", "image": image} for n, image in enumerate(names)]
    # the first cap learned, in order; duplicates of them later do not count twice
    containers += [{"name": "again", "image": names[0]}]
    outcome = admission.review(make_review(obj={"spec": {"containers": containers}}))
    assert outcome.response["response"]["allowed"] is True
    assert outcome.images == tuple(names[:cap])
    assert outcome.rejected == tuple((name, admission.TOO_MANY_IMAGES) for name in names[cap:])


def test_mutate_looks_at_no_more_images_than_the_cap():
    cap = admission.MAX_IMAGES_PER_OBJECT
    containers = [{"name": f"c{n}", "image": f"ghcr.io/acme/app-{n:04d}", "imagePullPolicy": "Always"}
                  for n in range(cap + 10)]
    warm = frozenset(f"ghcr.io/acme/app-{n:04d}:latest" for n in range(cap + 10))
    patch = _patch_of(admission.mutate(make_review(obj={"spec": {"containers": containers}}),
                                       warm=warm))
    assert [op["path"] for op in patch] == [f"/spec/containers/{n}/imagePullPolicy"
                                            for n in range(cap)]


def test_mutate_parses_a_repeated_image_once(monkeypatch):
    """A pod naming one long invalid reference in thousands of containers: one parse, not
    thousands (a failed parse is not cached)."""
    bad = "a" * 1000 + "!"
    containers = [{"name": f"c{n}", "image": bad} for n in range(3000)]
    calls = []
    real = images.parse

    def counting(ref):
        calls.append(ref)
        return real(ref)

    monkeypatch.setattr(images, "parse", counting)
    answer = admission.mutate(make_review(obj={"spec": {"containers": containers}}),
                              warm=frozenset())
    assert "patch" not in answer["response"] and calls == [bad]
