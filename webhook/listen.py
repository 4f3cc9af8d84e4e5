"""Where Prewarm's servers listen: every address, IPv6 and IPv4, unless told otherwise.

The kubelet probes a pod, and the API server calls a webhook's Service, on the pod's
address, which on an IPv6-only cluster is an IPv6 one: a server bound to 0.0.0.0 never
answers there. Bound to `::`, a socket takes IPv4 connections too (as IPv4-mapped
addresses), so one socket serves IPv4, IPv6 and dual-stack clusters alike. A kernel
booted without IPv6 (`ipv6.disable=1`, found on some hardened nodes) cannot make that
socket; there the servers fall back to 0.0.0.0.

Whether a `::` socket also takes IPv4 is the socket's IPV6_V6ONLY option. The health
server turns it off itself. gunicorn makes the observer's socket and leaves the option
at the kernel's default, `net.ipv6.bindv6only`, which is 0 in every new network
namespace, so in every pod.
"""

from __future__ import annotations

import socket
from http.server import ThreadingHTTPServer


def ipv6_available() -> bool:
    """Whether this kernel can make an IPv6 socket."""
    if not socket.has_ipv6:
        return False
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def any_address() -> str:
    """The address meaning every address: `::` (IPv6 and IPv4), else 0.0.0.0."""
    return "::" if ipv6_available() else "0.0.0.0"


def bind_string(host: str, port: int) -> str:
    """gunicorn's `bind` for host and port: "" is every address (any_address()), an IPv6
    address gets its brackets (gunicorn reads `::` as a host "" and port ":")."""
    host = host.strip() or any_address()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class DualStackHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on every address, IPv6 and IPv4 (any_address()): IPv6-only
    off explicitly, whatever the host's `net.ipv6.bindv6only` says."""

    def __init__(self, port: int, handler):
        host = any_address()
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
