"""Fixtures for tests against the real control plane (hack/controlplane.py).

`cluster`: one control plane for the session (etcd, kube-apiserver, controller-manager,
scheduler, kwok with 5 fake nodes). Tests isolate themselves with their own namespaces.
`private_plane`: etcd + kube-apiserver for one test, for tests that stop the API server.
"""

from __future__ import annotations

import uuid
from typing import Callable, Iterator

import pytest
from kubernetes import client

from hack import controlplane
from hack.controlplane import ControlPlane
from tests.support import NODES, Process


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Whatever a failing fixture left behind is stopped when the session ends."""
    yield
    for process in Process.started:
        process.stop(timeout=5)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ControlPlane]:
    plane = controlplane.start(nodes=NODES)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def private_plane() -> Iterator[ControlPlane]:
    plane = controlplane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def core(cluster) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.api_client())


@pytest.fixture(scope="session")
def apps(cluster) -> client.AppsV1Api:
    return client.AppsV1Api(cluster.api_client())


def new_namespace(core: client.CoreV1Api, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels=labels or {})))
    return name


@pytest.fixture
def namespace_factory(core) -> Iterator[Callable[..., str]]:
    created: list[str] = []

    def make(prefix: str = "t", labels: dict[str, str] | None = None) -> str:
        created.append(new_namespace(core, prefix, labels))
        return created[-1]

    yield make
    for name in created:
        try:
            core.delete_namespace(name)
        except client.ApiException:
            pass


