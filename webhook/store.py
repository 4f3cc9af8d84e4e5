"""The learned set: ConfigMap `learned-images`, one data key per image.

Each key is a short hash of the normalized reference (ConfigMap keys cannot hold `/` or
`:`); each value is one compact JSON record that `kubectl get configmap learned-images
-o yaml` shows on one line:

    {"image":"docker.io/library/nginx:latest","namespaces":["team-a"],
     "firstSeen":"2026-11-21T20:08:11Z","lastSeen":"2026-11-21T20:08:11Z",
     "source":"admission","state":"pending"}

Concurrency: every writer (webhook replicas x gunicorn workers x the reconciler) does a
read-modify-write on `resourceVersion` and retries on 409 Conflict, re-applying its
change to the fresh copy. We chose this over blind per-key merge patches because the
caps (total images, per namespace, bytes) need one consistent view of the whole set, and
because the `namespaces` of an image are a union: two writers blindly patching the same
key would each overwrite the other's namespace. Retrying on the fresh object loses
nothing; the cost is bounded because steady state (only known images) writes nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from webhook import images
from webhook.kube import server_message
from webhook.settings import MAX_BYTES_CEILING, Settings

logger = logging.getLogger(__name__)

Source = Literal["admission", "backfill", "static", "configmap", "registry"]
# An image is rarely used in many namespaces; past this we stop listing them so a
# popular base image cannot grow its record without bound.
MAX_NAMESPACES_PER_IMAGE = 20
KEY_HASH_LENGTH = 16
LABELS = {"app.kubernetes.io/name": "prewarm", "app.kubernetes.io/managed-by": "prewarm",
          "app.kubernetes.io/component": "learned-images"}
REQUEST_TIMEOUT = (3, 10)  # connect, read: a writer never hangs on a dead API server
# The API server refuses a ConfigMap whose values add up to more than 1 MiB (1,048,576
# bytes; ValidateConfigMap counts the values, not the keys); a write is kept under this,
# with a margin. PREWARM_MAX_BYTES (at most this) already counts the room the
# reconciler's fields take (RECONCILER_RESERVE), so only a set written under a larger cap
# or edited by hand needs LearnedSet.fit.
DATA_LIMIT = MAX_BYTES_CEILING  # 1 MiB less 8 KiB, defined with the setting it bounds
# The most the reconciler adds to a record the observer wrote: `,"shard":NNN` (12),
# the state `failing: CreateContainerConfigError` for `pending` (+28) and
# `,"retryAt":"<RFC 3339>"` (33); or, warm, the shard and `,"warmNodes":NNNNN` (17).
# merge() charges it up front, so a registry outage (every image failing at once) cannot
# push a set that was under the cap over what the API server takes.
RECONCILER_RESERVE = 80
# Writers' clocks (observer replicas, the reconciler) may disagree this much; a time
# further ahead than this is taken for a mistake (see stamp_last_seen).
MAX_CLOCK_SKEW = 300.0


OURS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")  # what rfc3339() writes
RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def rfc3339(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(int(timestamp), dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    """An RFC 3339 time: ours (`2026-11-21T10:00:00Z`, the fast path) or any other
    spelling a hand edit may use (fractions, `+00:00`, another offset)."""
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        # fromisoformat alone would also take ISO 8601 forms RFC 3339 does not allow
        # (week dates, no separators, no seconds, no offset)
        if not RFC3339.fullmatch(text):
            raise ValueError(f"not an RFC 3339 time: {text!r}") from None
        return dt.datetime.fromisoformat(text.upper().replace("Z", "+00:00")).timestamp()


def key_for(image: str) -> str:
    return images.short_hash(image, KEY_HASH_LENGTH)


@dataclass
class Record:
    image: str
    namespaces: list[str]
    first_seen: str
    last_seen: str
    source: str
    state: str = "pending"
    extra: dict[str, Any] = field(default_factory=dict)  # reconciler fields, kept as-is

    def to_json(self) -> str:
        doc: dict[str, Any] = {"image": self.image, "namespaces": self.namespaces,
                               "firstSeen": self.first_seen, "lastSeen": self.last_seen,
                               "source": self.source, "state": self.state}
        doc.update(self.extra)
        return json.dumps(doc, separators=(",", ":"))

    def combine(self, other: Record) -> None:
        """Takes in another record of the same image: namespaces (up to the cap), the
        earlier firstSeen, the later lastSeen, and `static` if either was pinned so (it
        never expires); this record's other fields win."""
        if other.source == "static":
            self.source = "static"
        for namespace in other.namespaces:
            if namespace not in self.namespaces and \
                    len(self.namespaces) < MAX_NAMESPACES_PER_IMAGE:
                self.namespaces.append(namespace)
        firsts = [t for t in (self.first_seen, other.first_seen) if _safe_time(t)]
        self.first_seen = min(firsts, key=_safe_time) if firsts else self.first_seen
        lasts = [t for t in (self.last_seen, other.last_seen) if _safe_time(t)]
        self.last_seen = max(lasts, key=_safe_time) if lasts else self.last_seen

    @classmethod
    def from_json(cls, text: str) -> Record:
        doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
            raise ValueError("record is not a JSON object with an 'image'")
        namespaces = doc.get("namespaces") or []
        if not isinstance(namespaces, list) or not all(isinstance(n, str) for n in namespaces):
            raise ValueError("'namespaces' is not a list of strings")
        for name in ("firstSeen", "lastSeen", "source", "state"):
            if not isinstance(doc.get(name, ""), str):
                raise ValueError(f"{name!r} is not a string")
        known = {"image", "namespaces", "firstSeen", "lastSeen", "source", "state"}
        extra = {k: v for k, v in doc.items() if k not in known}
        if _nested_deeper(extra, MAX_EXTRA_DEPTH):
            # it decodes here, but encoding it again, deeper in the stack of a write, would
            # pass the recursion limit and fail every write after it
            raise ValueError(f"a field is nested deeper than {MAX_EXTRA_DEPTH} levels")
        return cls(image=doc["image"], namespaces=list(namespaces),
                   first_seen=doc.get("firstSeen", ""), last_seen=doc.get("lastSeen", ""),
                   source=doc.get("source", "admission"), state=doc.get("state", "pending"),
                   extra=extra)


@dataclass
class LearnedSet:
    """The decoded ConfigMap data. Values we cannot parse (a hand edit gone wrong) are
    kept verbatim in `unparsed` and written back untouched: nothing is dropped."""

    records: dict[str, Record] = field(default_factory=dict)
    unparsed: dict[str, str] = field(default_factory=dict)
    raw: dict[str, str] = field(default_factory=dict)  # the data as read, for patches
    moved: int = 0  # records decode() moved to their key: a write is due to save that

    @classmethod
    def decode(cls, data: Mapping[str, str] | None) -> LearnedSet:
        """Records keyed by the hash of their normalized image. A record added by hand
        under another key or with another spelling of the image is moved to its key (and
        combined with the record already there) on the next write; one whose image is
        not a valid reference is kept verbatim with what cannot be parsed."""
        learned = cls(raw=dict(data or {}))
        elsewhere: list[tuple[str, Record]] = []
        for key, value in (data or {}).items():
            try:
                record = Record.from_json(value)
                record.image = images.normalize(record.image)
            # InvalidReference is a ValueError; RecursionError: JSON nested too deep
            except (ValueError, TypeError, RecursionError) as error:
                _warn_once(key, value, f"learned-images key {key} is not a valid record "
                                       f"({error}); kept as is until it is fixed or deleted")
                learned.unparsed[key] = value
                continue
            if key == key_for(record.image):
                learned.records[key] = record
            else:
                elsewhere.append((key, record))
        learned.moved = len(elsewhere)
        for key, record in elsewhere:
            canonical = key_for(record.image)
            if canonical in learned.unparsed:  # moving it there would overwrite a hand edit
                _warn_once(key, data[key], f"learned-images key {key} holds {record.image}, "
                                           f"whose key {canonical} holds a value that is not "
                                           f"a valid record: both kept as they are")
                learned.unparsed[key] = data[key]
                learned.moved -= 1
                continue
            logger.info("learned-images key %s holds %s: moved to its key %s", key,
                        record.image, canonical)
            if canonical in learned.records:
                learned.records[canonical].combine(record)
            else:
                learned.records[canonical] = record
        return learned

    def encode(self) -> dict[str, str]:
        data = dict(self.unparsed)
        data.update((key, record.to_json()) for key, record in sorted(self.records.items()))
        return data

    def value_bytes(self) -> int:
        """What the API server's size check counts: the values' bytes."""
        return sum(len(v.encode()) for v in self.unparsed.values()) + sum(
            len(r.to_json().encode()) for r in self.records.values())

    def budget(self) -> int:
        """What PREWARM_MAX_BYTES caps: the values' bytes, plus RECONCILER_RESERVE for
        each record, the most the reconciler's fields may still add to it."""
        return self.value_bytes() + RECONCILER_RESERVE * len(self.records)

    def fit(self, limit: int) -> int:
        """Brings the values' bytes under `limit` without dropping an image: the records
        listing the most namespaces keep only the first (the one the image is charged
        to; the list only orders the pull and informs). Returns how many records were
        cut; raises StoreUnavailable if even that is not enough."""
        size = self.value_bytes()
        cut = 0
        for record in sorted(self.records.values(), key=lambda r: -len(r.namespaces)):
            if size <= limit or len(record.namespaces) <= 1:
                break
            before = len(record.to_json().encode())
            del record.namespaces[1:]
            size -= before - len(record.to_json().encode())
            cut += 1
        if size > limit:
            raise StoreUnavailable(
                f"learned-images would hold {size} bytes, over the {limit} a ConfigMap can "
                f"take even with one namespace per image: lower PREWARM_MAX_BYTES or "
                f"PREWARM_MAX_IMAGES, or delete images from it")
        return cut

    def get(self, image: str) -> Record | None:
        return self.records.get(key_for(image))

    def by_image(self) -> dict[str, Record]:
        return {record.image: record for record in self.records.values()}


@dataclass
class Observation:
    """Images seen, aggregated in memory before a flush."""

    namespaces: set[str] = field(default_factory=set)
    first: float = 0.0
    last: float = 0.0

    def add(self, namespace: str | None, when: float) -> None:
        if namespace:
            self.namespaces.add(namespace)
        # comparisons, not min()/max(): this runs for every image of every review
        if not self.first or when < self.first:
            self.first = when
        if when > self.last:
            self.last = when

    def absorb(self, other: Observation) -> None:
        self.namespaces |= other.namespaces
        self.first = min(self.first, other.first) if self.first else other.first
        self.last = max(self.last, other.last)


@dataclass
class MergeResult:
    changed: bool = False
    added: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    # images refused only because every namespace they were seen in is full: those
    # namespaces (a sighting elsewhere may still be learned)
    full_in: dict[str, frozenset[str]] = field(default_factory=dict)
    # known images seen in namespaces their record could not list (byte cap): recorded,
    # and nothing lost but the listing
    unlisted: list[str] = field(default_factory=list)


def needs_write(record: Record | None, seen: Observation, *, refresh: float) -> bool:
    """False when merging `seen` into `record` would change nothing worth a write: the
    image is known, its namespaces are listed (or the list is full) and lastSeen is
    fresher than the refresh period."""
    if record is None:
        return True
    if len(record.namespaces) < MAX_NAMESPACES_PER_IMAGE and not seen.namespaces <= set(
            record.namespaces):
        return True
    try:
        return seen.last - parse_time(record.last_seen) >= refresh
    except ValueError:
        return True


def merge(learned: LearnedSet, observed: Mapping[str, Observation], *, source: str,
          settings: Settings) -> MergeResult:
    """Merges observations into `learned` in place, enforcing the caps. Pure apart from
    mutating `learned`; `observed` keys are normalized references."""
    result = MergeResult()
    size = learned.budget()
    per_namespace: dict[str, int] = {}
    for record in learned.records.values():
        if record.namespaces:
            per_namespace[record.namespaces[0]] = per_namespace.get(record.namespaces[0], 0) + 1
    for image in sorted(observed, key=lambda i: observed[i].first):
        seen = observed[image]
        key = key_for(image)
        if key in learned.unparsed:  # a hand edit gone wrong: never written over
            result.refused.append((image, f"its key {key} in learned-images holds a value "
                                          f"that is not a valid record (fix or delete it)"))
            continue
        record = learned.records.get(key)
        if record is not None:
            if not needs_write(record, seen, refresh=settings.last_seen_refresh):
                continue
            before = record.to_json()
            listed = len(record.namespaces)
            for namespace in sorted(seen.namespaces):
                if (namespace not in record.namespaces
                        and len(record.namespaces) < MAX_NAMESPACES_PER_IMAGE):
                    record.namespaces.append(namespace)
            if len(record.namespaces) > listed and \
                    size + len(record.to_json()) - len(before) > settings.max_bytes:
                # the byte cap holds for growth too: the image stays, its new namespaces
                # are not listed (see MergeResult.unlisted)
                del record.namespaces[listed:]
                result.unlisted.append(image)
            if seen.last and (not record.last_seen or seen.last > _safe_time(record.last_seen)):
                record.last_seen = rfc3339(seen.last)
            after = record.to_json()
            if after != before:
                size += len(after) - len(before)
                result.changed = True
            continue
        if len(learned.records) >= settings.max_images:
            result.refused.append((image, f"max images reached ({settings.max_images})"))
            continue
        # The image is charged to one namespace it was seen in (listed first): one that
        # still has room, so a full namespace does not block an image others use too;
        # looked for among all of them, before the list is cut to its cap.
        seen_in = sorted(seen.namespaces)
        origin = next((n for n in seen_in
                       if per_namespace.get(n, 0) < settings.max_images_per_namespace), None)
        if seen_in and origin is None:
            shown = ", ".join(seen_in[:MAX_NAMESPACES_PER_IMAGE]) + (
                f" and {len(seen_in) - MAX_NAMESPACES_PER_IMAGE} more"
                if len(seen_in) > MAX_NAMESPACES_PER_IMAGE else "")
            result.refused.append((image, f"max images per namespace "
                                          f"({settings.max_images_per_namespace}) reached "
                                          f"for {shown}"))
            result.full_in[image] = frozenset(seen_in)
            continue
        if origin is not None:
            seen_in.remove(origin)
            seen_in.insert(0, origin)
        namespaces = seen_in[:MAX_NAMESPACES_PER_IMAGE]
        record = Record(image=image, namespaces=namespaces, first_seen=rfc3339(seen.first),
                        last_seen=rfc3339(seen.last), source=source)
        entry = len(record.to_json()) + RECONCILER_RESERVE
        if size + entry > settings.max_bytes:
            result.refused.append((image, f"learned-images size cap reached "
                                          f"({settings.max_bytes} bytes)"))
            continue
        learned.records[key] = record
        size += entry
        if origin:
            per_namespace[origin] = per_namespace.get(origin, 0) + 1
        result.added.append(image)
        result.changed = True
    return result


# the reconciler's own fields are flat; a hand edit may nest, not without end
MAX_EXTRA_DEPTH = 32


def _nested_deeper(fields: dict[str, Any], limit: int) -> bool:
    """Whether lists and objects in the values of `fields` nest deeper than `limit`
    (without recursion: the point is values too deep for it). Only containers are
    visited: the reconciler's fields, all scalars, cost one look each (this runs for
    every record of every read)."""
    containers = (dict, list)
    stack = [(value, 1) for value in fields.values() if isinstance(value, containers)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        stack.extend((child, depth + 1)
                     for child in (item.values() if isinstance(item, dict) else item)
                     if isinstance(child, containers))
    return False


_WARNED: set[tuple[str, int]] = set()


def _warn_once(key: str, value: str, message: str) -> None:
    """Every read decodes the whole set (each flush, each pass): an unreadable value is
    reported once per process while it stays the same, not at every read."""
    if (key, hash(value)) in _WARNED:
        return
    if len(_WARNED) >= 10_000:
        _WARNED.clear()
    _WARNED.add((key, hash(value)))
    logger.warning("%s", message)


def _safe_time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError:
        return 0.0


def expire(learned: LearnedSet, *, now: float, ttl: float,
           keep_sources: Iterable[str] = ("static",)) -> list[str]:
    """Removes images not seen for `ttl` seconds (static entries never expire). A record
    without a readable lastSeen (added by hand) is not expired: see stamp_last_seen."""
    keep = set(keep_sources)
    gone = [key for key, record in learned.records.items()
            if record.source not in keep and _safe_time(record.last_seen)
            and now - _safe_time(record.last_seen) > ttl]
    removed = [learned.records.pop(key).image for key in gone]
    return removed


def stamp_last_seen(learned: LearnedSet, *, now: float) -> list[str]:
    """Gives records without a readable lastSeen (or firstSeen) the time `now`, so that
    their TTL starts counting instead of expiring them at once; brings times ahead of
    `now` (beyond MAX_CLOCK_SKEW: a hand edit, a writer's clock far ahead) back to it,
    or the image would never expire and later sightings would never refresh it; and
    rewrites other RFC 3339 spellings as ours. Returns the images changed."""
    stamped = []
    latest = now + MAX_CLOCK_SKEW
    for record in learned.records.values():
        before = (record.last_seen, record.first_seen)
        last, first = _safe_time(record.last_seen), _safe_time(record.first_seen)
        if not 0 < last <= latest:
            record.last_seen = rfc3339(now)
        elif not OURS.fullmatch(record.last_seen):
            record.last_seen = rfc3339(last)
        if not 0 < first <= latest:
            record.first_seen = record.last_seen
        elif not OURS.fullmatch(record.first_seen):  # the pull order sorts it as text
            record.first_seen = rfc3339(first)
        if (record.last_seen, record.first_seen) != before:
            stamped.append(record.image)
    return stamped


class StoreUnavailable(RuntimeError):
    """The API server could not be reached or refused the write; the caller keeps its
    data and retries later."""


@dataclass
class Snapshot:
    learned: LearnedSet
    resource_version: str
    # bytes of binaryData (added by hand): the API server's 1 MiB counts them too
    other_bytes: int = 0

    @classmethod
    def of(cls, cm: client.V1ConfigMap) -> Snapshot:
        other = 0
        for value in (cm.binary_data or {}).values():
            try:
                other += len(base64.b64decode(value))
            except (ValueError, TypeError):
                other += len(value or "")
        return cls(LearnedSet.decode(cm.data), cm.metadata.resource_version, other)


class LearnedImagesStore:
    """Reads and writes the ConfigMap. All writes go through `update`."""

    def __init__(self, core: client.CoreV1Api, *, namespace: str, name: str,
                 create_missing: bool = True, on_write: Callable[[], None] | None = None):
        self.core, self.namespace, self.name = core, namespace, name
        self.create_missing = create_missing
        self.on_write = on_write or (lambda: None)

    def read(self) -> Snapshot:
        try:
            cm = self.core.read_namespaced_config_map(self.name, self.namespace,
                                                      _request_timeout=REQUEST_TIMEOUT)
        except ApiException as error:
            if error.status == 404 and self.create_missing:
                return self._create()
            raise StoreUnavailable(self._describe(error, "read")) from error
        except Exception as error:  # urllib3 connection errors and timeouts
            raise StoreUnavailable(f"reading ConfigMap {self.namespace}/{self.name}: "
                                   f"{error.__class__.__name__}: {error}") from error
        return Snapshot.of(cm)

    def _create(self) -> Snapshot:
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(
            name=self.name, namespace=self.namespace, labels=dict(LABELS)), data={})
        try:
            cm = self.core.create_namespaced_config_map(self.namespace, body,
                                                        _request_timeout=REQUEST_TIMEOUT)
            self.on_write()
            logger.info("created ConfigMap %s/%s", self.namespace, self.name)
        except ApiException as error:
            if error.status == 409:  # another writer created it first
                return self.read()
            if error.status == 403:  # the chart's Roles have no create: it pre-creates it
                raise StoreUnavailable(
                    f"ConfigMap {self.namespace}/{self.name} is missing and this identity may "
                    f"not create it ({_server_message(error)}): `helm upgrade` restores it "
                    f"(or create it by hand); images are kept until it exists") from error
            raise StoreUnavailable(self._describe(error, "create")) from error
        except Exception as error:
            raise StoreUnavailable(f"creating ConfigMap {self.namespace}/{self.name}: "
                                   f"{error}") from error
        return Snapshot.of(cm)

    def _describe(self, error: ApiException, verb: str) -> str:
        hint = ""
        if error.status == 404:
            hint = (" (not there: check --namespace / PREWARM_NAMESPACE; the Helm chart "
                    "creates it in the release's namespace)")
        elif error.status == 403:
            hint = " (forbidden: check the ServiceAccount's Role)"
        return (f"cannot {verb} ConfigMap {self.namespace}/{self.name}: HTTP {error.status} "
                f"{error.reason}{hint}: {_server_message(error)}")

    def update(self, mutate: Callable[[LearnedSet], bool], *, attempts: int = 50) -> Snapshot:
        """Read-modify-write: `mutate` changes the set in place and returns whether it
        changed anything; on 409 the fresh object is read and `mutate` runs again. Returns
        the snapshot as written (or as read, when nothing changed)."""
        current: Snapshot | None = None
        for attempt in range(attempts):
            if current is None:
                if attempt:
                    time.sleep(conflict_delay(attempt))
                current = self.read()
            before = current.learned.raw
            if not mutate(current.learned):
                return current
            after = current.learned.encode()
            limit = DATA_LIMIT - current.other_bytes
            if sum(len(value.encode()) for value in after.values()) > limit:
                try:
                    cut = current.learned.fit(limit)
                except StoreUnavailable as error:
                    if not current.other_bytes:
                        raise
                    raise StoreUnavailable(f"{error}; its binaryData (added by hand) takes "
                                           f"{current.other_bytes} bytes of the 1 MiB: "
                                           f"remove it") from error
                logger.error("learned-images would be over %d bytes%s: %d images now list "
                             "only their first namespace (written under a larger cap, or "
                             "edited by hand)", limit, f" (binaryData takes "
                             f"{current.other_bytes})" if current.other_bytes else "", cut)
                after = current.learned.encode()
            patch = merge_patch(before, after, current.resource_version)
            if not patch["data"]:
                return current
            try:
                written = self.core.patch_namespaced_config_map(
                    self.name, self.namespace, patch,
                    _content_type="application/merge-patch+json",
                    _request_timeout=REQUEST_TIMEOUT)
            except ApiException as error:
                if error.status == 409:
                    current = None
                    continue
                raise StoreUnavailable(self._describe(error, "write")) from error
            except Exception as error:
                raise StoreUnavailable(f"writing ConfigMap {self.namespace}/{self.name}: "
                                       f"{error.__class__.__name__}: {error}") from error
            self.on_write()
            return Snapshot.of(written)
        raise StoreUnavailable(f"ConfigMap {self.namespace}/{self.name}: still conflicting "
                               f"after {attempts} attempts")


def conflict_delay(conflicts: int, *, rng: random.Random | None = None) -> float:
    """Seconds to wait before reading again after the `conflicts`-th 409 in a row: random
    (writers that collided must not collide again in step), within a window doubling
    from 10 ms up to 0.5 s, so a burst of replicas x workers spreads out instead of each
    re-reading the whole ConfigMap (up to 1 MiB) at once, dozens of times."""
    return (rng or random).uniform(0, min(0.5, 0.01 * 2 ** min(conflicts - 1, 16)))


def _server_message(error: ApiException) -> str:
    return server_message(error) or str(error.reason or "no message")


def merge_patch(before: Mapping[str, str], after: Mapping[str, str],
                resource_version: str) -> dict[str, Any]:
    """A JSON merge patch carrying only the keys that changed (null deletes a key) and
    `resourceVersion` as a precondition: the API server answers 409 if another writer got
    there first, which is what `update` retries on, and labels or annotations owned by
    others (Helm) are left alone."""
    data: dict[str, str | None] = {k: v for k, v in after.items() if before.get(k) != v}
    data.update((k, None) for k in before if k not in after)
    return {"metadata": {"resourceVersion": resource_version}, "data": data}
