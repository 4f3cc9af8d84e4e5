"""`python -m webhook status`: the learned set as a table (or JSON)."""

from __future__ import annotations

import json

from kubernetes import client

from webhook.kube import api_client
from webhook.settings import Settings
from webhook.store import LearnedImagesStore

COLUMNS = ("IMAGE", "STATE", "SOURCE", "NAMESPACES", "WARM NODES", "LAST SEEN")


def rows(settings: Settings, api: client.ApiClient | None = None) -> list[dict]:
    store = LearnedImagesStore(client.CoreV1Api(api or api_client()),
                               namespace=settings.namespace, name=settings.configmap,
                               create_missing=False)
    learned = store.read().learned
    result = []
    for record in sorted(learned.records.values(), key=lambda r: r.image):
        result.append({"image": record.image, "state": record.state, "source": record.source,
                       "namespaces": record.namespaces,
                       "warmNodes": record.extra.get("warmNodes", 0),
                       "firstSeen": record.first_seen, "lastSeen": record.last_seen})
    return result


def status(settings: Settings, *, output: str = "table", api: client.ApiClient | None = None) -> str:
    data = rows(settings, api)
    if output == "json":
        return json.dumps(data, indent=2) + "\n"
    table = [COLUMNS] + [(r["image"], r["state"], r["source"],
                          ",".join(r["namespaces"]) or "-", str(r["warmNodes"]), r["lastSeen"])
                         for r in data]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in table]
    lines.append(f"{len(data)} images in {settings.namespace}/{settings.configmap}")
    return "\n".join(lines) + "\n"
