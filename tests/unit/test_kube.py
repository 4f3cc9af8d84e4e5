"""One-line descriptions of errors for the logs (webhook/kube.py, describe_error)."""

from __future__ import annotations

import json

from kubernetes.client.exceptions import ApiException

from webhook.kube import describe_error


class Response:
    """What the client's REST layer hands ApiException: status, reason, body, headers."""

    def __init__(self, status: int, reason: str, body: object):
        self.status, self.reason = status, reason
        self.data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.headers = {"Audit-Id": "0b4c", "Content-Type": "application/json"}


def test_an_api_error_is_one_line_with_the_servers_message_and_no_headers():
    error = ApiException(http_resp=Response(403, "Forbidden", {
        "kind": "Status", "code": 403, "message": 'leases.coordination.k8s.io "prewarm" is '
        'forbidden: User "system:serviceaccount:p:r" cannot create resource "leases"'}))
    assert "\n" in str(error) and "Audit-Id" in str(error)  # the client's own rendering
    assert describe_error(error) == (
        'HTTP 403 Forbidden: leases.coordination.k8s.io "prewarm" is forbidden: User '
        '"system:serviceaccount:p:r" cannot create resource "leases"')


def test_a_body_that_is_not_a_status_and_other_errors_still_read_on_one_line():
    assert describe_error(ApiException(http_resp=Response(502, "Bad Gateway", b"<html>\n"
                                                          b"proxy down</html>"))) == \
        "HTTP 502 Bad Gateway: <html> proxy down</html>"
    assert describe_error(ConnectionRefusedError(111, "Connection refused")) == \
        "ConnectionRefusedError: [Errno 111] Connection refused"
    assert len(describe_error(ValueError("x" * 1000))) == 300
