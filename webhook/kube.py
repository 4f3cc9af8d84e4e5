"""Kubernetes API clients, configured as kubectl finds its cluster: the given kubeconfig,
else KUBECONFIG, else ~/.kube/config when it exists, else the in-cluster ServiceAccount.
The observer, the reconciler and the certs tool all resolve it here."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

LIST_TIMEOUT = (3, 30)  # connect, read


class KubeconfigError(RuntimeError):
    pass


class NoCluster(KubeconfigError):
    """Neither a kubeconfig nor a pod's ServiceAccount to find the cluster with."""

    def __init__(self, how: str = "set KUBECONFIG") -> None:
        super().__init__(f"no cluster to talk to: {how}, create ~/.kube/config, or run in "
                         "a pod")


def kubeconfig_path(kubeconfig: str | None = None) -> str | None:
    """The kubeconfig to use, or None for the in-cluster configuration; NoCluster when
    there is neither. A file given (`kubeconfig`) must exist. KUBECONFIG is a list, as
    for kubectl: its files that exist are merged by the client, and at least one must
    exist; one that was asked for but is missing is an error, not a fallback."""
    if kubeconfig:
        if not os.path.exists(os.path.expanduser(kubeconfig)):
            raise KubeconfigError(f"kubeconfig {kubeconfig} does not exist")
        return kubeconfig
    listed = [path for path in os.environ.get("KUBECONFIG", "").split(os.pathsep) if path]
    if listed:
        if not any(os.path.exists(os.path.expanduser(path)) for path in listed):
            raise KubeconfigError(f"kubeconfig {listed[0]} does not exist" if len(listed) == 1
                                  else f"no file of KUBECONFIG exists: {', '.join(listed)}")
        return os.pathsep.join(listed)
    default = os.path.expanduser("~/.kube/config")
    if os.path.exists(default):
        return default
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    raise NoCluster()


def check_config(kubeconfig: str | None = None) -> None:
    """Fails with KubeconfigError if no usable configuration exists, without building a
    client. The client writes a kubeconfig's embedded certificates to temp files that
    it deletes at exit: built in gunicorn's master, those files would be shared by the
    forked workers, and the first worker to exit would delete them under the others."""
    path = kubeconfig_path(kubeconfig)
    if path is not None:
        try:
            config.list_kube_config_contexts(config_file=path)
        except Exception as error:
            raise KubeconfigError(f"kubeconfig {path} is not usable: {error}") from None


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """A client for the cluster kubeconfig_path() finds; KubeconfigError, with the
    reason, for a kubeconfig the client cannot use. A kubeconfig is only read:
    refreshed credentials are not written back into the user's file."""
    path = kubeconfig_path(kubeconfig)
    try:
        if path is not None:
            return config.new_client_from_config(config_file=path, persist_config=False)
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    except (config.ConfigException, yaml.YAMLError, OSError) as error:
        where = f"kubeconfig {path}" if path else "in-cluster configuration"
        raise KubeconfigError(f"{where} is not usable: "
                              f"{' '.join(str(error).split())}") from None


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def server_message(error: ApiException, limit: int = 300) -> str:
    """The API server's own explanation of a refusal (its Status message: which user
    was refused which verb, which field is invalid), on one line, cut to `limit`; the
    body as it came when it is not a Status; "" when there is none."""
    try:
        message = json.loads(error.body or "{}").get("message") or ""
    except (ValueError, AttributeError, TypeError):
        message = str(error.body or "")
    return _one_line(message, limit)


def describe_error(error: BaseException, limit: int = 300) -> str:
    """One line for a log: an API error as its status and the API server's own message
    (the client's str() of it spans lines, with every response header), anything else
    as its type and text."""
    if isinstance(error, ApiException):
        message = server_message(error, limit)
        text = f"HTTP {error.status} {error.reason}" + (f": {message}" if message else "")
    else:
        text = f"{error.__class__.__name__}: {error}"
    return _one_line(text, limit)


def list_pages(call: Callable[..., Any], *args: Any, page_size: int = 500,
               **kwargs: Any) -> Iterator[dict[str, Any]]:
    """A list call in pages of `page_size`, each page's JSON decoded by us: building the
    client's model objects for 20,000 pods costs seconds, and callers need a handful of
    fields."""
    token = None
    while True:
        response = call(*args, limit=page_size, _continue=token, _preload_content=False,
                        _request_timeout=LIST_TIMEOUT, **kwargs)
        page = json.loads(response.data)
        yield page
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return


def list_items(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
    for page in list_pages(call, *args, **kwargs):
        yield from page.get("items") or []
