"""The pod cache (webhook/podcache.py) resuming its watch against the real API server."""

from __future__ import annotations

import logging
import threading

from hack import controlplane
from tests.support import compact_etcd, eventually
from webhook.images import ImageFilter
from webhook.podcache import PodImages


def test_a_watch_from_a_compacted_version_lists_again_without_a_failure(caplog):
    # without the watch cache the API server watches etcd directly, so a compacted
    # resourceVersion is answered with the 410 ERROR event a long-lived cache meets
    # when its version falls out of the API server's window
    plane = controlplane.start(extra_apiserver_args=["--watch-cache=false"])
    stop = threading.Event()
    try:
        from kubernetes import client

        core = client.CoreV1Api(plane.api_client())
        lists: list[str] = []

        class Cache(PodImages):
            def relist(self) -> str:
                version = super().relist()
                lists.append(version)
                if len(lists) == 1:  # compact past the version the watch resumes from
                    for name in ("bump-1", "bump-2"):  # (a watch from v reads v + 1 on)
                        core.create_namespace({"metadata": {"name": name}})
                    assert int(compact_etcd(plane)) > int(version) + 1
                return version

        cache = Cache(core, ImageFilter())
        with caplog.at_level(logging.INFO, logger="webhook.podcache"):
            threading.Thread(target=cache.run, args=(stop,), daemon=True).start()
            eventually("the pod cache listing again after the 410", lambda: len(lists) >= 2)
            core.create_namespaced_pod("default", {"metadata": {"name": "after"}, "spec": {
                "containers": [{"name": "c", "image": "cache.example.com/after:1"}]}})
            eventually("the new pod's image in the cache", lambda:
                       "cache.example.com/after:1" in cache.observations({"default"}, 0.0))
        records = [r for r in caplog.records if r.name == "webhook.podcache"]
        assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
        assert any("expired" in r.getMessage() and "too old" in r.getMessage()
                   for r in records), [r.getMessage() for r in records]
    finally:
        stop.set()
        plane.stop()
