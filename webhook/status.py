"""`python -m webhook status`: the learned set as a table (or JSON)."""

from __future__ import annotations

import json

from kubernetes import client

from webhook.kube import api_client
from webhook.settings import Settings
from webhook.store import LearnedImagesStore, LearnedSet

COLUMNS = ("IMAGE", "STATE", "SOURCE", "NAMESPACES", "WARM NODES", "LAST SEEN")


def read(settings: Settings, api: client.ApiClient | None = None) -> LearnedSet:
    store = LearnedImagesStore(client.CoreV1Api(api or api_client()),
                               namespace=settings.namespace, name=settings.configmap,
                               create_missing=False)
    return store.read().learned


def rows(learned: LearnedSet) -> list[dict]:
    result = []
    for record in sorted(learned.records.values(), key=lambda r: r.image):
        result.append({"image": record.image, "state": record.state, "source": record.source,
                       "namespaces": record.namespaces,
                       "warmNodes": record.extra.get("warmNodes", 0),
                       "firstSeen": record.first_seen, "lastSeen": record.last_seen})
    return result


def status(settings: Settings, *, output: str = "table", api: client.ApiClient | None = None) -> str:
    learned = read(settings, api)
    data = rows(learned)
    if output == "json":
        return json.dumps(data, indent=2) + "\n"
    table = [COLUMNS] + [(r["image"], r["state"], r["source"],
                          ",".join(r["namespaces"]) or "-", str(r["warmNodes"]), r["lastSeen"])
                         for r in data]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in table]
    lines.append(f"{len(data)} images in {settings.namespace}/{settings.configmap}")
    if learned.unparsed:
        lines.append(f"{len(learned.unparsed)} keys hold values that are not valid records, "
                     f"or records that cannot move to their key (kept, never pulled; fix "
                     f"or delete them): {', '.join(sorted(learned.unparsed))}")
    return "\n".join(lines) + "\n"
