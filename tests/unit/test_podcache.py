"""The pod cache's reading of a watch response (the watch itself runs against the real
API server in tests/cluster/test_podcache.py and tests/cluster/test_reconciler.py)."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException

from webhook.podcache import WatchExpired, events


def line(kind: str, obj: dict) -> str:
    return json.dumps({"type": kind, "object": obj})


POD = {"metadata": {"name": "p", "namespace": "n", "resourceVersion": "12"}}


def test_events_pass_objects_through_as_json_and_skip_blank_lines():
    bookmark = {"metadata": {"resourceVersion": "13"}}
    assert list(events([line("ADDED", POD), "", line("BOOKMARK", bookmark)])) == [
        ("ADDED", POD), ("BOOKMARK", bookmark)]


def test_a_410_error_event_is_an_expiry_not_a_failure():
    gone = {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410,
            "message": "The resourceVersion for the provided watch is too old."}
    stream = events([line("ADDED", POD), line("ERROR", gone), line("ADDED", POD)])
    assert next(stream) == ("ADDED", POD)
    with pytest.raises(WatchExpired, match="too old"):
        next(stream)


def test_other_error_events_fail_with_the_servers_reason_and_message():
    broken = {"kind": "Status", "status": "Failure", "reason": "InternalError",
              "code": 500, "message": "etcd is unhappy"}
    with pytest.raises(ApiException) as raised:
        list(events([line("ERROR", broken)]))
    assert raised.value.status == 500
    assert "InternalError: etcd is unhappy" in str(raised.value)
