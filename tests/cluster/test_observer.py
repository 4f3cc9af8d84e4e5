"""The observer end to end: the real API server calls the real gunicorn server over TLS
through the chart's ValidatingWebhookConfiguration, and images land in learned-images."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from kubernetes import client

from hack.controlplane import find_binary
from tests.support import (Observer, apiserver_metric, eventually, learned_images,
                           new_namespace_name, register_chart_webhook, unregister_webhook)
from webhook.settings import MAX_BYTES_CEILING, Settings
from webhook.store import LearnedImagesStore, Observation, merge

LEARN = {"prewarm.io/learn": "enabled"}


class Setup:
    def __init__(self, cluster, core, release_ns, observer, labelled, unlabelled, webhook):
        self.cluster, self.core, self.release_ns = cluster, core, release_ns
        self.observer, self.labelled, self.unlabelled = observer, labelled, unlabelled
        self.webhook = webhook

    def learned(self) -> dict[str, dict]:
        return learned_images(self.core, self.release_ns)

    def wait_learned(self, *images: str, timeout: float = 30) -> dict[str, dict]:
        return eventually(f"{images} in learned-images",
                          lambda: (lambda got: got if all(i in got for i in images) else None)(
                              self.learned()), timeout=timeout)

    def sentinel(self) -> str:
        """Creates a pod with a fresh image in the labelled namespace and waits until it is
        learned: everything admitted before it has been flushed too."""
        image = f"sentinel.example.com/probe:{uuid.uuid4().hex[:8]}"
        self.core.create_namespaced_pod(self.labelled, pod(f"s-{uuid.uuid4().hex[:6]}", image))
        self.wait_learned(image)
        return image


def pod(name: str, image: str, init_image: str | None = None) -> dict:
    spec: dict = {"containers": [{"name": "app", "image": image}]}
    if init_image:
        spec["initContainers"] = [{"name": "init", "image": init_image}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def deployment(name: str, image: str, replicas: int = 1) -> dict:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "app", "image": image}]}}}}


@pytest.fixture(scope="module")
def setup(cluster, core, tmp_path_factory):
    release_ns = new_namespace_name("prewarm")
    # Prewarm's own namespace carries the learn label on purpose: it must still be ignored
    core.create_namespace({"metadata": {"name": release_ns, "labels": LEARN}})
    labelled, unlabelled = new_namespace_name("learn"), new_namespace_name("quiet")
    core.create_namespace({"metadata": {"name": labelled, "labels": LEARN}})
    core.create_namespace({"metadata": {"name": unlabelled}})
    workdir = tmp_path_factory.mktemp("observer")
    observer = Observer(cluster, release_ns, workdir)
    name = f"{release_ns}-observe"
    try:
        name, _ = register_chart_webhook(cluster, observer, release_ns)
        state = Setup(cluster, core, release_ns, observer, labelled, unlabelled, name)
        # the API server picks the configuration up asynchronously: wait until it calls us
        eventually("webhook active", lambda: _try_sentinel(state), timeout=60, interval=1)
        yield state
    finally:
        unregister_webhook(cluster, name)
        observer.stop()
        for namespace in (release_ns, labelled, unlabelled):
            core.delete_namespace(namespace)


def _try_sentinel(state: Setup) -> bool:
    image = f"sentinel.example.com/warmup:{uuid.uuid4().hex[:8]}"
    state.core.create_namespaced_pod(state.labelled, pod(f"w-{uuid.uuid4().hex[:6]}", image))
    try:
        state.wait_learned(image, timeout=3)
        return True
    except Exception:
        return False


def test_workloads_and_pods_in_a_labelled_namespace_are_learned_normalized(setup, apps):
    batch = client.BatchV1Api(setup.cluster.api_client())
    apps.create_namespaced_deployment(setup.labelled, deployment("web", "nginx:1.27"))
    batch.create_namespaced_cron_job(setup.labelled, {
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "job", "image": "busybox:1.36"}]}}}}}})
    setup.core.create_namespaced_pod(setup.labelled, pod(
        "bare", "ghcr.io/acme/api:v3", init_image="localhost:5000/migrate"))

    learned = setup.wait_learned("docker.io/library/nginx:1.27", "docker.io/library/busybox:1.36",
                                 "ghcr.io/acme/api:v3", "localhost:5000/migrate:latest")
    record = learned["docker.io/library/nginx:1.27"]
    assert record["namespaces"] == [setup.labelled]
    assert record["source"] == "admission" and record["state"] == "pending"
    assert record["firstSeen"].endswith("Z") and record["lastSeen"] >= record["firstSeen"]
    assert "nginx:1.27" not in learned  # only the normalized spelling is recorded


def test_unlabelled_namespace_and_own_namespace_record_nothing(setup):
    quiet, own = "quiet.example.com/never:1", "own.example.com/prewarm-pod:1"
    setup.core.create_namespaced_pod(setup.unlabelled, pod("q", quiet))
    setup.core.create_namespaced_pod(setup.release_ns, pod("own", own))
    setup.sentinel()
    learned = setup.learned()
    assert quiet not in learned
    assert own not in learned


def test_own_namespace_is_ignored_by_the_code_too_when_the_selector_lets_it_through(setup):
    """The namespaceSelector keeps Prewarm's namespace out; if a hand-edited configuration
    does not, the observer itself still records nothing from there."""
    import copy

    from kubernetes.client import AdmissionregistrationV1Api

    from tests.support import chart_object, helm_template, webhook_for_url

    config = copy.deepcopy(chart_object(helm_template(setup.release_ns),
                                        "ValidatingWebhookConfiguration"))
    for expression in config["webhooks"][0]["namespaceSelector"]["matchExpressions"]:
        if expression["operator"] == "NotIn":
            expression["values"].remove(setup.release_ns)
    name = f"{setup.release_ns}-observe-all"
    api = AdmissionregistrationV1Api(setup.cluster.api_client())
    api.create_validating_webhook_configuration(
        webhook_for_url(config, setup.observer.url, setup.observer.ca, name))
    excluded = 'prewarm_reviews_total{kind="Pod",result="excluded-namespace"}'
    before, reviews = setup.observer.metric(excluded), setup.observer.metric(
        "prewarm_reviews_total")
    images = []
    try:
        def reviewed() -> bool:  # the API server picks the configuration up in a moment
            images.append(f"own.example.com/called:{len(images)}")
            setup.core.create_namespaced_pod(setup.release_ns, pod(
                f"own-{uuid.uuid4().hex[:6]}", images[-1]))
            return setup.observer.metric("prewarm_reviews_total") > reviews

        eventually("a review from Prewarm's own namespace", reviewed, timeout=60, interval=1)
    finally:
        unregister_webhook(setup.cluster, name)
    setup.sentinel()
    assert not set(images) & set(setup.learned())
    assert setup.observer.metric(excluded) > before


def test_server_side_dry_run_records_nothing(setup, tmp_path):
    manifest = tmp_path / "pod.json"
    manifest.write_text(json.dumps(pod("dry", "dryrun.example.com/only:1")))
    result = subprocess.run([str(find_binary("kubectl")), "--kubeconfig", str(setup.cluster.kubeconfig),
                             "create", "--dry-run=server", "-n", setup.labelled, "-f", str(manifest)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "(server dry run)" in result.stdout
    setup.sentinel()
    assert "dryrun.example.com/only:1" not in setup.learned()


def test_an_image_bump_is_learned_from_the_update_before_any_pod_runs_it(setup, apps):
    # zero replicas: no pod will ever run the new image, so only the UPDATE can teach it
    apps.create_namespaced_deployment(setup.labelled, deployment("bump", "app.example.com/svc:1", 0))
    setup.wait_learned("app.example.com/svc:1")
    apps.patch_namespaced_deployment("bump", setup.labelled, {"spec": {"template": {"spec": {
        "containers": [{"name": "app", "image": "app.example.com/svc:2"}]}}}})
    learned = setup.wait_learned("app.example.com/svc:2")
    assert learned["app.example.com/svc:2"]["namespaces"] == [setup.labelled]


def test_an_ephemeral_container_added_to_a_running_pod_is_learned(setup):
    # the API server refuses ephemeralContainers on create: `kubectl debug` adds them
    # through the pods/ephemeralcontainers subresource, an UPDATE of the whole pod
    setup.core.create_namespaced_pod(setup.labelled, pod("debugged", "app.example.com/main:1"))
    setup.wait_learned("app.example.com/main:1")
    setup.core.patch_namespaced_pod_ephemeralcontainers("debugged", setup.labelled, {
        "spec": {"ephemeralContainers": [{"name": "debugger", "image": "busybox:1.37",
                                          "stdin": True, "tty": True}]}})
    learned = setup.wait_learned("docker.io/library/busybox:1.37")
    assert learned["docker.io/library/busybox:1.37"]["namespaces"] == [setup.labelled]


def test_known_images_cause_no_writes(setup):
    known = "steady.example.com/app:1"
    setup.core.create_namespaced_pod(setup.labelled, pod("known-first", known))
    setup.wait_learned(known)
    writes_before = setup.observer.metric("prewarm_api_writes_total")
    cm_before = setup.core.read_namespaced_config_map("learned-images", setup.release_ns)
    reviews = setup.observer.metric('prewarm_reviews_total{kind="Pod",result="observed"}')
    for index in range(20):
        setup.core.create_namespaced_pod(setup.labelled, pod(f"again-{index}", known))
    eventually("20 more reviews", lambda: setup.observer.metric(
        'prewarm_reviews_total{kind="Pod",result="observed"}') >= reviews + 20)
    # a claim that nothing happens needs a window: five flush intervals (0.2 s here),
    # watched throughout (a worker may still re-read a stale snapshot: a read, no write)
    window = time.monotonic() + 1.0
    while time.monotonic() < window:
        assert setup.observer.metric("prewarm_api_writes_total") == writes_before
    cm_after = setup.core.read_namespaced_config_map("learned-images", setup.release_ns)
    assert cm_after.metadata.resource_version == cm_before.metadata.resource_version
    assert cm_after.data == cm_before.data


REVIEW = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
          "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                      "namespace": "x", "operation": "CREATE",
                      "object": {"spec": {"containers": [{"name": "a", "image": "nginx"}]}}}}


def _review(**request_changes) -> bytes:
    body = json.loads(json.dumps(REVIEW))
    for key, value in request_changes.items():
        if value is None:
            body["request"].pop(key)
        else:
            body["request"][key] = value
    return json.dumps(body).encode()


JSON = {"Content-Type": "application/json"}
MALFORMED = {
    "not json": (b"{not json", JSON),
    "empty body": (b"", JSON),
    "truncated json": (json.dumps(REVIEW).encode()[:-5], JSON),
    "json array": (b"[1,2,3]", JSON),
    "json string": (b'"AdmissionReview"', JSON),
    "json null": (b"null", JSON),
    "text/plain content type": (json.dumps(REVIEW).encode(), {"Content-Type": "text/plain"}),
    "no content type": (json.dumps(REVIEW).encode(), {}),
    "form content type": (b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}),
    "over the size limit": (b'{"x":"' + b"a" * (4 * 1024 * 1024) + b'"}', JSON),
    "wrong kind": (json.dumps({**REVIEW, "kind": "Pod"}).encode(), JSON),
    "v1beta1 review": (json.dumps({**REVIEW, "apiVersion": "admission.k8s.io/v1beta1"}).encode(), JSON),
    "no request": (json.dumps({"apiVersion": REVIEW["apiVersion"], "kind": "AdmissionReview"}).encode(), JSON),
    "no uid": (_review(uid=None), JSON),
    "empty uid": (_review(uid=""), JSON),
    "uid is a number": (_review(uid=5), JSON),
    "no kind": (_review(kind=None), JSON),
    "unknown kind": (_review(kind={"group": "", "version": "v1", "kind": "Secret"}), JSON),
    "unknown kind on DELETE": (_review(kind={"group": "", "version": "v1", "kind": "Secret"},
                                       operation="DELETE"), JSON),
    "unknown operation": (_review(operation="PATCH"), JSON),
    "no object": (_review(object=None), JSON),
    "object is a string": (_review(object="pod"), JSON),
    "containers is a dict": (_review(object={"spec": {"containers": {"a": "b"}}}), JSON),
    "image is a number": (_review(object={"spec": {"containers": [{"image": 1}]}}), JSON),
    "deeply nested json": (b"[" * 100000 + b"]" * 100000, JSON),
    "invalid utf-8": (b'{"kind": "\xff\xfe"}', JSON),
}


@pytest.mark.parametrize("body,headers", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_reviews_get_400_with_a_json_error(setup, body, headers):
    status, payload = setup.observer.request("POST", "/observe", body, headers)
    assert status == 400, payload[:300]
    assert json.loads(payload)["error"]
    setup.observer.process.alive()


def test_server_keeps_answering_well_formed_reviews_after_malformed_ones(setup):
    for body, headers in list(MALFORMED.values())[:10]:
        setup.observer.request("POST", "/observe", body, headers)
    status, payload = setup.observer.request("POST", "/observe", _review(), JSON)
    assert status == 200
    assert json.loads(payload)["response"] == {"uid": "u-1", "allowed": True}
    assert setup.observer.request("GET", "/observe")[0] == 405


def _first_record(tls_socket, request: bytes) -> bytes:
    """Sends a request and returns the first TLS record of the answer: an SSL read
    never returns more than one record's data."""
    tls_socket.sendall(request)
    return tls_socket.recv(1 << 20)


def _complete(response: bytes) -> bool:
    head, separator, body = response.partition(b"\r\n\r\n")
    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
              if line.lower().startswith(b"content-length:")]
    return bool(separator) and bool(length) and len(body) == length[0]


def test_each_answer_is_one_tls_record_on_a_kept_alive_connection(setup):
    """The API server reads each review's answer in one piece: one TLS record, one TCP
    segment and one wake-up of its reader, not one for the headers and one for the body.
    Two reviews and a malformed one on the same connection, all whole in their first
    record."""
    import socket

    body, bad = _review(), b"{not json"
    requests = [(b"POST /observe HTTP/1.1\r\nHost: observer\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
                for payload in (body, bad, body)]
    with socket.create_connection(("127.0.0.1", setup.observer.port), timeout=10) as raw:
        with setup.observer.ssl_context().wrap_socket(raw, server_hostname="localhost") as tls:
            answers = [_first_record(tls, request) for request in requests]
    assert all(_complete(answer) for answer in answers), answers
    assert [answer.split(b" ", 2)[1] for answer in answers] == [b"200", b"400", b"200"]
    assert json.loads(answers[2].partition(b"\r\n\r\n")[2])["response"]["allowed"] is True


def test_eight_concurrent_writers_lose_no_image(cluster, core):
    namespace = new_namespace_name("writers")
    core.create_namespace({"metadata": {"name": namespace}})
    # caps out of the way (4,000 images of this size need the largest byte cap allowed):
    # this is about writers racing, not about caps
    settings = Settings(namespace=namespace, max_images=5000, max_images_per_namespace=5000,
                        max_bytes=MAX_BYTES_CEILING)
    now = time.time()

    def writer(index: int) -> None:
        api = client.CoreV1Api(cluster.api_client())
        store = LearnedImagesStore(api, namespace=namespace, name="learned-images")
        for batch in range(10):  # 10 flushes of 50 images each, racing the other writers
            observed = {f"registry.example.com/w{index}/img-{batch * 50 + i}:v1":
                        Observation({f"team-{index}"}, now, now) for i in range(50)}
            store.update(lambda learned: merge(learned, observed, source="admission",
                                               settings=settings).changed)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))
    learned = learned_images(core, namespace)
    assert len(learned) == 4000
    assert all(f"registry.example.com/w{w}/img-{i}:v1" in learned
               for w in range(8) for i in range(500))
    core.delete_namespace(namespace)


class _Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _flusher_on(core, namespace: str, clock: _Clock, **caps):
    """A worker's buffer and flusher writing to the real learned-images in `namespace`,
    on a clock the test moves."""
    from webhook.observer import Flusher, ImageBuffer

    store = LearnedImagesStore(core, namespace=namespace, name="learned-images")
    buffer = ImageBuffer(1000)
    return buffer, Flusher(buffer, lambda: store, Settings(namespace=namespace, **caps),
                           clock=clock)


def test_an_image_refused_in_a_full_namespace_is_learned_from_one_with_room(core):
    """A Deployment's image refused in a namespace at its cap, then used in another one
    that has room, moments later: learned there, not dropped as recently refused."""
    namespace = new_namespace_name("refused")
    core.create_namespace({"metadata": {"name": namespace}})
    clock = _Clock()
    buffer, flusher = _flusher_on(core, namespace, clock, max_images_per_namespace=1)
    buffer.add(["a.io/first:1"], "full", clock())
    assert flusher.flush().added == ["a.io/first:1"]
    clock.now += 1
    buffer.add(["a.io/shared:1"], "full", clock())
    assert flusher.flush().refused[0][0] == "a.io/shared:1"
    clock.now += 1
    buffer.add(["a.io/shared:1"], "roomy", clock())
    flusher.flush()
    assert learned_images(core, namespace)["a.io/shared:1"]["namespaces"] == ["roomy"]
    # seen in the full namespace alone again: still refused, and not even merged
    clock.now += 1
    buffer.add(["a.io/again:1"], "full", clock())
    assert flusher.flush().refused[0][0] == "a.io/again:1"
    clock.now += 1
    buffer.add(["a.io/again:1"], "full", clock())
    assert flusher.flush() is None and len(buffer) == 0
    # "roomy" is full now too: refused there as well, after which neither namespace's
    # sightings are merged again (not one the other in turn)
    clock.now += 1
    buffer.add(["a.io/again:1"], "roomy", clock())
    assert flusher.flush().refused[0][0] == "a.io/again:1"
    for namespace_seen in ("full", "roomy", "full"):
        clock.now += 1
        buffer.add(["a.io/again:1"], namespace_seen, clock())
        assert flusher.flush() is None
    core.delete_namespace(namespace)


def test_a_stream_of_images_refused_at_the_cap_is_not_remembered_for_ever(core):
    """Past the total cap, every new image (a CI tag a build) is refused and remembered
    for a while, so that it is not merged again at every flush; remembered for ever,
    each worker's memory grew with every image refused."""
    namespace = new_namespace_name("stream")
    core.create_namespace({"metadata": {"name": namespace}})
    clock = _Clock()
    buffer, flusher = _flusher_on(core, namespace, clock, max_images=1)
    buffer.add(["a.io/only:1"], "ci", clock())
    flusher.flush()
    for build in range(120):  # one a second, two minutes
        clock.now += 1
        buffer.add([f"a.io/ci:{build}"], "ci", clock())
        assert flusher.flush().refused[0][0] == f"a.io/ci:{build}"
    from webhook.observer import SNAPSHOT_MAX_AGE

    assert len(flusher._refused) <= SNAPSHOT_MAX_AGE  # the last 30 s only
    assert list(learned_images(core, namespace)) == ["a.io/only:1"]
    core.delete_namespace(namespace)


def seen_widely(count: int, namespaces: list[str]) -> dict[str, Observation]:
    """`count` images, each just seen in every one of `namespaces`."""
    now = time.time()
    observed = {}
    for index in range(count):
        seen = Observation()
        for namespace in namespaces:
            seen.add(namespace, now)
        observed[f"registry.example.com/platform/service-{index:05d}:v1"] = seen
    return observed


def test_a_write_that_would_pass_one_mebibyte_still_lands_and_keeps_every_image(cluster, core):
    """A set without the room PREWARM_MAX_BYTES now keeps for the reconciler's fields
    (written under a larger cap, or grown by hand), images used in many namespaces, then
    every image failing at once (a registry outage: a state and a retryAt on each). The
    API server refuses a ConfigMap over 1 MiB, which would stop every writer for good;
    the store lists fewer namespaces instead, and keeps every image."""
    from webhook.store import DATA_LIMIT

    namespace = new_namespace_name("full")
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        # built directly: load() would refuse a cap over what a ConfigMap takes
        settings = Settings(namespace=namespace, max_images_per_namespace=10_000,
                            max_bytes=2 * 1024 * 1024)
        store = LearnedImagesStore(core, namespace=namespace, name="learned-images")
        observed = seen_widely(3500, [f"team-{team:02d}" for team in range(8)])
        store.update(lambda learned: merge(learned, observed, source="admission",
                                           settings=settings).changed)
        images = set(learned_images(core, namespace))
        assert len(images) == 3500

        def outage(learned) -> bool:
            for record in learned.records.values():
                record.state = "failing: ImagePullBackOff"
                record.extra.update(retryAt="2026-11-22T10:30:00Z", shard=12, warmNodes=0)
            return True

        grown = store.read().learned
        outage(grown)
        encoded = grown.encode()
        assert sum(len(v.encode()) for v in encoded.values()) > 1024 * 1024
        with pytest.raises(client.ApiException) as refused:  # what the store must avoid
            core.patch_namespaced_config_map("learned-images", namespace, {"data": encoded})
        assert refused.value.status == 422

        store.update(outage)
        learned = learned_images(core, namespace)
        assert set(learned) == images
        assert all(r["state"] == "failing: ImagePullBackOff" and r["namespaces"]
                   for r in learned.values())
        data = core.read_namespaced_config_map("learned-images", namespace).data
        assert sum(len(v.encode()) for v in data.values()) <= DATA_LIMIT
    finally:
        core.delete_namespace(namespace)


def test_binary_data_added_by_hand_counts_toward_the_mebibyte(cluster, core):
    """Someone stores 950 kB of binaryData in learned-images: the API server counts it
    in the 1 MiB with the records, so a write sized by the records alone is refused
    (422) for every writer, for good. The store counts it, lists fewer namespaces, and
    every image stays."""
    import base64

    namespace = new_namespace_name("binary")
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        core.create_namespaced_config_map(namespace, {
            "metadata": {"name": "learned-images"},
            "binaryData": {"blob": base64.b64encode(b"\0" * 950_000).decode()}})
        store = LearnedImagesStore(core, namespace=namespace, name="learned-images")
        observed = seen_widely(200, [f"team-with-a-long-name-{team:02d}" for team in range(20)])
        settings = Settings(namespace=namespace, max_images_per_namespace=10_000)
        grown = store.read().learned
        merge(grown, observed, source="admission", settings=settings)
        records = sum(len(v.encode()) for v in grown.encode().values())
        assert records + 950_000 > 1024 * 1024 > records  # only together too big
        store.update(lambda learned: merge(learned, observed, source="admission",
                                           settings=settings).changed)
        learned = learned_images(core, namespace)
        assert set(learned) == set(observed) and all(r["namespaces"] for r in learned.values())
        cm = core.read_namespaced_config_map("learned-images", namespace)
        assert len(base64.b64decode(cm.binary_data["blob"])) == 950_000  # left alone
    finally:
        core.delete_namespace(namespace)


def test_a_worker_that_exits_is_replaced_and_the_observer_keeps_serving(cluster, core,
                                                                       tmp_path):
    """A worker leaves by itself (gunicorn's timeout abort, a SIGTERM to it alone): the
    master starts another and serving goes on. The metrics directory `serve` creates is
    the master's: a worker's exit must not remove it, or the replacement fails to boot
    and the master shuts the whole observer down."""
    import signal

    namespace = new_namespace_name("respawn")
    core.create_namespace({"metadata": {"name": namespace}})
    observer = Observer(cluster, namespace, tmp_path, workers=1)
    try:
        observer.replace_worker(signal.SIGTERM)
        body = _review(uid="after-respawn", namespace="team", object={
            "spec": {"containers": [{"image": "respawn.example.com/app:1"}]}})
        status, _ = eventually("a review answered by the new worker", lambda: (
            lambda answer: answer if answer[0] == 200 else None)(
            observer.request("POST", "/observe", body, JSON)), timeout=30)
        assert observer.metric('prewarm_reviews_total{kind="Pod",result="observed"}') >= 1
        assert observer.process.popen.poll() is None, observer.process.output()[-3000:]
        assert "Worker failed to boot" not in observer.process.output()
    finally:
        observer.stop()
        core.delete_namespace(namespace)


@contextlib.contextmanager
def observed_namespace(cluster, core, tmp_path, prefix: str):
    """An observer of its own, registered with the chart's webhook configuration and
    answering for a labelled namespace; yields (observer, the configuration, namespace),
    everything removed afterwards."""
    release_ns = new_namespace_name(prefix)
    target = new_namespace_name("learn")
    core.create_namespace({"metadata": {"name": release_ns}})
    core.create_namespace({"metadata": {"name": target, "labels": LEARN}})
    observer = Observer(cluster, release_ns, tmp_path)
    name = f"{release_ns}-observe"
    try:
        name, config = register_chart_webhook(cluster, observer, release_ns)
        probe = Setup(cluster, core, release_ns, observer, target, "", name)
        eventually("webhook active", lambda: _try_sentinel(probe), timeout=60, interval=1)
        yield observer, config, target
    finally:
        unregister_webhook(cluster, name)
        observer.stop()
        core.delete_namespace(release_ns)
        core.delete_namespace(target)


def fail_open_count(cluster) -> float:
    """How often the API server let a request through a failing observe webhook
    (failurePolicy Ignore)."""
    return apiserver_metric(cluster, "apiserver_admission_webhook_fail_open_count",
                            'name="observe.prewarm.io"')


def test_pods_are_still_created_when_the_webhook_process_is_killed(cluster, core, tmp_path):
    with observed_namespace(cluster, core, tmp_path, "killed") as (observer, config, target):
        failed_open = fail_open_count(cluster)
        observer.process.stop(sig=9)
        started = time.monotonic()
        created = core.create_namespaced_pod(target, pod("after-kill", "nginx:1.27"))
        elapsed = time.monotonic() - started
        assert created.metadata.name == "after-kill"
        assert fail_open_count(cluster) > failed_open  # the webhook was called, and failed
        timeout = config["webhooks"][0]["timeoutSeconds"]
        assert timeout <= 5 and elapsed < timeout + 3


def test_pods_are_still_created_when_the_webhook_hangs(cluster, core, tmp_path):
    """A webhook that accepts connections but never answers (stopped, not dead: a node
    under memory pressure, a stuck process) costs each admission the configuration's
    timeoutSeconds, after which failurePolicy Ignore lets the pod through."""
    import os
    import signal

    with observed_namespace(cluster, core, tmp_path, "hung") as (observer, config, target):
        failed_open = fail_open_count(cluster)
        os.killpg(observer.process.popen.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            created = core.create_namespaced_pod(target, pod("while-hung", "nginx:1.27"))
            elapsed = time.monotonic() - started
        finally:
            os.killpg(observer.process.popen.pid, signal.SIGCONT)
        assert created.metadata.name == "while-hung"
        # the API server waited out the timeout, then let the pod through (fail open)
        timeout = config["webhooks"][0]["timeoutSeconds"]
        assert timeout <= 5 and elapsed >= timeout
        assert fail_open_count(cluster) > failed_open


def test_images_buffered_while_the_api_server_is_down_are_written_when_it_returns(
        private_plane, tmp_path):
    core = client.CoreV1Api(private_plane.api_client())
    core.create_namespace({"metadata": {"name": "prewarm"}})
    observer = Observer(private_plane, "prewarm", tmp_path)
    try:
        private_plane.stop_apiserver()
        images = [f"outage.example.com/img-{i}:1" for i in range(30)]
        for index, image in enumerate(images):
            body = json.loads(_review(uid=f"u-{index}", namespace="team",
                                      object={"spec": {"containers": [{"image": image}]}}))
            status, payload = observer.request("POST", "/observe", json.dumps(body).encode(), JSON)
            assert status == 200 and json.loads(payload)["response"]["allowed"] is True
        eventually("a failed flush", lambda: observer.metric('prewarm_flushes_total{result="error"}') >= 1
                   or observer.get("/readyz")[1].find(b'"lastFlushError":""') == -1, timeout=30)
        private_plane.restart_apiserver()
        core = client.CoreV1Api(private_plane.api_client())
        learned = eventually("buffered images written after the outage",
                             lambda: (lambda got: got if all(i in got for i in images) else None)(
                                 learned_images(core, "prewarm")), timeout=60)
        assert learned[images[0]]["namespaces"] == ["team"]
        assert observer.metric("prewarm_images_dropped_total") == 0
    finally:
        observer.stop()


def test_a_worker_stopped_during_an_outage_exits_in_time_and_counts_what_it_lost(
        private_plane, tmp_path):
    """A rolling restart while the API server is down: the last write cannot land, and
    the worker must neither hang past gunicorn's kill (20 s) nor lose images silently."""
    core = client.CoreV1Api(private_plane.api_client())
    core.create_namespace({"metadata": {"name": "prewarm"}})
    observer = Observer(private_plane, "prewarm", tmp_path, workers=1)
    try:
        private_plane.stop_apiserver()
        for index in range(4):
            body = _review(uid=f"o-{index}", namespace="team", object={
                "spec": {"containers": [{"image": f"lost.example.com/img-{index}:1"}]}})
            assert observer.request("POST", "/observe", body, JSON)[0] == 200
        observer.process.stop(sig=15)
        assert observer.process.popen.returncode == 0  # exited by itself, not killed
        assert "stopping with 4 images not written to learned-images" in \
            observer.process.output()
    finally:
        observer.stop()


def test_optional_mutate_endpoint_relaxes_pull_policy_of_warm_images(setup, core):
    """Chart value mutate.enabled: in namespaces also labelled prewarm.io/pull-policy=
    IfNotPresent, a warm image's Always pull policy becomes IfNotPresent."""
    namespace = new_namespace_name("relaxed")
    core.create_namespace({"metadata": {"name": namespace, "labels": {
        **LEARN, "prewarm.io/pull-policy": "IfNotPresent"}}})
    mutating = "MutatingWebhookConfiguration"
    name = f"{setup.release_ns}-mutate"
    try:
        name, _ = register_chart_webhook(setup.cluster, setup.observer, setup.release_ns,
                                         "mutate.enabled=true", kind=mutating)
        # the reconciler would mark it warm once pulled everywhere; here we write it
        store = LearnedImagesStore(core, namespace=setup.release_ns, name="learned-images")

        def mark_warm(learned) -> bool:
            merge(learned, {"docker.io/library/nginx:latest": Observation({namespace}, time.time(),
                                                                         time.time())},
                  source="admission", settings=Settings())
            learned.get("docker.io/library/nginx:latest").state = "warm"
            return True

        store.update(mark_warm)

        def relaxed_pod():
            created = core.create_namespaced_pod(namespace, {"metadata": {"generateName": "w-"},
                                                             "spec": {"containers": [{"name": "a", "image": "nginx"}]}})
            return created if created.spec.containers[0].image_pull_policy == "IfNotPresent" else None

        pod = eventually("a warm image's pod relaxed to IfNotPresent", relaxed_pod, timeout=90,
                         interval=1)
        assert pod.spec.containers[0].image == "nginx"  # only the policy changes
        cold = core.create_namespaced_pod(namespace, {"metadata": {"name": "cold"}, "spec": {
            "containers": [{"name": "a", "image": "cold.example.com/app:latest"}]}})
        assert cold.spec.containers[0].image_pull_policy == "Always"
    finally:
        unregister_webhook(setup.cluster, name, mutating)
        core.delete_namespace(namespace)


def test_a_graceful_stop_writes_what_the_workers_buffered(cluster, core, tmp_path):
    """A rolling restart (SIGTERM) must not lose reviewed images: with an hour between
    flushes, only the workers' exit flush can write them."""
    namespace = new_namespace_name("restart")
    core.create_namespace({"metadata": {"name": namespace}})
    observer = Observer(cluster, namespace, tmp_path, env={"PREWARM_FLUSH_INTERVAL": "1h"})
    try:
        images = [f"restart.example.com/img-{i}:1" for i in range(20)]
        for index, image in enumerate(images):
            body = _review(uid=f"r-{index}", namespace="team",
                           object={"spec": {"containers": [{"image": image}]}})
            status, _ = observer.request("POST", "/observe", body, JSON)
            assert status == 200
        assert learned_images(core, namespace) == {}  # nothing written yet
        observer.process.stop(sig=15)
        assert observer.process.popen.returncode == 0
        learned = learned_images(core, namespace)
        assert sorted(learned) == sorted(images)
    finally:
        observer.stop()
        core.delete_namespace(namespace)
