"""Merging observations into the learned set: caps, namespaces, lastSeen, expiry."""

from __future__ import annotations

import json

import pytest

from webhook.observer import MAX_BACKOFF, ImageBuffer, backoff
from webhook.settings import Settings
from webhook.store import (MAX_NAMESPACES_PER_IMAGE, LearnedSet, Observation, Record,
                           StoreUnavailable, expire, key_for, merge, merge_patch, needs_write,
                           parse_time, rfc3339)

T0 = parse_time("2026-11-21T10:00:00Z")


def seen(*namespaces: str, at: float = T0) -> Observation:
    observation = Observation()
    for namespace in namespaces or ("",):
        observation.add(namespace, at)
    return observation


def test_new_images_are_recorded_with_readable_fields():
    learned = LearnedSet()
    result = merge(learned, {"docker.io/library/nginx:latest": seen("team-a")},
                   source="admission", settings=Settings())
    assert result.added == ["docker.io/library/nginx:latest"] and result.changed
    (value,) = learned.encode().values()
    assert json.loads(value) == {"image": "docker.io/library/nginx:latest",
                                 "namespaces": ["team-a"], "firstSeen": "2026-11-21T10:00:00Z",
                                 "lastSeen": "2026-11-21T10:00:00Z", "source": "admission",
                                 "state": "pending"}


def test_known_image_in_known_namespace_is_no_change():
    learned = LearnedSet()
    merge(learned, {"a.io/x:1": seen("ns")}, source="admission", settings=Settings())
    again = merge(learned, {"a.io/x:1": seen("ns", at=T0 + 60)}, source="admission",
                  settings=Settings())
    assert not again.changed
    assert learned.get("a.io/x:1").last_seen == "2026-11-21T10:00:00Z"


def test_new_namespace_and_stale_last_seen_are_written():
    settings = Settings(last_seen_refresh=3600)
    learned = LearnedSet()
    merge(learned, {"a.io/x:1": seen("ns1")}, source="admission", settings=settings)
    assert merge(learned, {"a.io/x:1": seen("ns2", at=T0 + 10)}, source="admission",
                 settings=settings).changed
    assert learned.get("a.io/x:1").namespaces == ["ns1", "ns2"]
    assert merge(learned, {"a.io/x:1": seen("ns1", at=T0 + 7200)}, source="admission",
                 settings=settings).changed
    assert learned.get("a.io/x:1").last_seen == rfc3339(T0 + 7200)


def test_namespaces_per_image_are_capped():
    learned = LearnedSet()
    for index in range(MAX_NAMESPACES_PER_IMAGE + 5):
        merge(learned, {"a.io/x:1": seen(f"ns{index:02d}")}, source="admission",
              settings=Settings())
    assert len(learned.get("a.io/x:1").namespaces) == MAX_NAMESPACES_PER_IMAGE
    assert not needs_write(learned.get("a.io/x:1"), seen("another"), refresh=3600)


def test_total_cap_refuses_and_reports():
    learned = LearnedSet()
    batch = {f"a.io/img{i}:1": seen("ns") for i in range(5)}
    result = merge(learned, batch, source="admission", settings=Settings(max_images=3))
    assert len(learned.records) == 3 and len(result.refused) == 2
    assert all("max images" in reason for _, reason in result.refused)


def test_per_namespace_cap_counts_the_namespace_that_introduced_the_image():
    learned = LearnedSet()
    settings = Settings(max_images_per_namespace=2)
    result = merge(learned, {f"a.io/img{i}:1": seen("noisy") for i in range(4)} |
                   {"a.io/quiet:1": seen("quiet")}, source="admission", settings=settings)
    assert sorted(learned.by_image()) == sorted(result.added)
    assert len(result.added) == 3 and "a.io/quiet:1" in result.added
    assert all("noisy" in reason for _, reason in result.refused)


def test_byte_cap_keeps_the_configmap_under_budget():
    learned = LearnedSet()
    settings = Settings(max_bytes=20_000)
    result = merge(learned, {f"registry.example.com/team/app-{i}:v1": seen("ns")
                             for i in range(500)}, source="admission", settings=settings)
    assert learned.budget() <= 20_000
    assert result.refused and all("size cap" in reason for _, reason in result.refused)


def test_the_byte_cap_holds_when_known_images_are_seen_in_new_namespaces():
    """Records grow too: 4,000 images filling the default cap, then each seen in 19 more
    namespaces, would more than double the set (past the API server's 1 MiB, after which
    no write succeeds). Their lastSeen still moves; the namespaces past the cap are not
    listed, and no image is lost."""
    learned = LearnedSet()
    settings = Settings(max_images_per_namespace=10_000)
    images = [f"registry.example.com/team/app-{i:05d}:v1" for i in range(5000)]
    merge(learned, {image: seen("ns") for image in images}, source="admission",
          settings=settings)
    kept = {r.image for r in learned.records.values()}
    assert len(kept) > 3000 and learned.budget() <= settings.max_bytes
    later = T0 + 7 * 3600
    result = merge(learned, {image: seen(*(f"team-{n:02d}" for n in range(19)), at=later)
                             for image in kept}, source="admission", settings=settings)
    assert learned.budget() <= settings.max_bytes
    assert {r.image for r in learned.records.values()} == kept
    assert all(r.last_seen == rfc3339(later) for r in learned.records.values())
    assert result.unlisted and set(result.unlisted) <= kept and not result.refused


def test_fit_brings_a_grown_set_under_the_limit_by_listing_fewer_namespaces():
    learned = LearnedSet()
    merge(learned, {f"a.io/x{i}:1": seen(*(f"ns-{n:02d}" for n in range(10)))
                    for i in range(100)}, source="admission",
          settings=Settings(max_images_per_namespace=1000))
    for record in learned.records.values():  # what the reconciler adds to a failing image
        record.state = "failing: ImagePullBackOff"
        record.extra.update(retryAt="2026-11-21T10:30:00Z", shard=0)
    size = learned.value_bytes()
    limit = size * 85 // 100  # some records must give up their other nine namespaces
    cut = learned.fit(limit)
    assert 0 < cut < 100 and learned.value_bytes() <= limit
    assert len(learned.records) == 100
    assert all(r.namespaces and r.namespaces[0] == "ns-00" for r in learned.records.values())
    assert learned.fit(learned.value_bytes()) == 0  # nothing to do when it fits
    with pytest.raises(StoreUnavailable, match="lower PREWARM_MAX_BYTES"):
        learned.fit(1000)


def test_at_the_default_cap_every_image_failing_at_once_still_fits_a_configmap():
    """A registry outage: the reconciler marks every image failing, with the longest
    reason, a retryAt and a shard number of three digits. The set the observer filled to
    the default cap must still be one the API server takes, with no namespace cut."""
    from webhook.store import DATA_LIMIT

    learned = LearnedSet()
    settings = Settings(max_images=10_000, max_images_per_namespace=10_000)
    merge(learned, {f"registry.example.com/team{i % 8}/app-{i}:v1": seen(f"ns{i % 8}")
                    for i in range(5000)}, source="admission", settings=settings)
    assert len(learned.records) > 3500 and learned.budget() <= settings.max_bytes
    for record in learned.records.values():
        record.state = "failing: CreateContainerConfigError"
        record.extra.update(retryAt="2026-11-21T10:30:00Z", shard=123)
    assert learned.value_bytes() <= settings.max_bytes <= DATA_LIMIT
    assert learned.fit(DATA_LIMIT) == 0


def test_unparseable_values_are_kept_verbatim():
    learned = LearnedSet.decode({"handedit": "not json", "abc": "{\"x\":1}"})
    merge(learned, {"a.io/x:1": seen("ns")}, source="admission", settings=Settings())
    data = learned.encode()
    assert data["handedit"] == "not json" and data["abc"] == "{\"x\":1}"


def test_expiry_removes_only_stale_non_static_images():
    learned = LearnedSet()
    merge(learned, {"a.io/old:1": seen("ns", at=T0), "a.io/new:1": seen("ns", at=T0 + 5000)},
          source="admission", settings=Settings())
    merge(learned, {"a.io/pinned:1": seen(at=T0)}, source="static", settings=Settings())
    removed = expire(learned, now=T0 + 6000, ttl=3000)
    assert removed == ["a.io/old:1"]
    assert set(learned.by_image()) == {"a.io/new:1", "a.io/pinned:1"}


def test_merge_patch_carries_only_changes_and_the_precondition():
    patch = merge_patch({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}, "77")
    assert patch == {"metadata": {"resourceVersion": "77"}, "data": {"b": "3", "c": "4"}}
    assert merge_patch({"a": "1"}, {}, "1")["data"] == {"a": None}


def test_record_round_trip_keeps_reconciler_fields():
    record = Record(image="a.io/x:1", namespaces=[], first_seen="x", last_seen="y",
                    source="static", state="failing: ErrImagePull", extra={"retryAt": "z"})
    assert Record.from_json(record.to_json()) == record


def test_buffer_is_bounded_and_counts_drops():
    buffer = ImageBuffer(limit=3)
    assert buffer.add([f"a.io/{i}:1" for i in range(5)], "ns", T0) == 2
    assert buffer.add(["a.io/0:1"], "other", T0 + 1) == 0  # known image: merged, not dropped
    pending = buffer.drain()
    assert len(pending) == 3 and pending["a.io/0:1"].namespaces == {"ns", "other"}
    assert len(buffer) == 0
    assert buffer.restore(pending) == 0 and len(buffer) == 3


def test_flush_backoff_doubles_to_its_cap_and_stays_there_through_a_long_outage():
    assert [backoff(n, 1.0) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, MAX_BACKOFF,
                                                      MAX_BACKOFF]
    # 30 s apart, 1,024 failures is eight and a half hours of an unreachable API server
    for failures in (1023, 1024, 10**6):
        assert backoff(failures, 1.0) == MAX_BACKOFF
    assert backoff(10**6, 1e-6) == MAX_BACKOFF


@pytest.mark.parametrize("bad", ["", "2026-11-21", "yesterday"])
def test_unparseable_last_seen_counts_as_stale(bad):
    record = Record(image="a.io/x:1", namespaces=["ns"], first_seen=bad, last_seen=bad,
                    source="admission")
    assert needs_write(record, seen("ns"), refresh=3600)


def test_per_namespace_cap_charges_a_namespace_that_still_has_room():
    learned = LearnedSet()
    settings = Settings(max_images_per_namespace=1)
    merge(learned, {"a.io/first:1": seen("aaa")}, source="admission", settings=settings)
    result = merge(learned, {"a.io/shared:1": seen("aaa", "zzz")}, source="backfill",
                   settings=settings)
    assert result.added == ["a.io/shared:1"]
    assert learned.get("a.io/shared:1").namespaces == ["zzz", "aaa"]  # charged to zzz
    refused = merge(learned, {"a.io/third:1": seen("aaa", "zzz")}, source="admission",
                    settings=settings)
    assert refused.added == [] and "aaa, zzz" in refused.refused[0][1]


@pytest.mark.parametrize("value", ['{"image":"a.io/x:1","namespaces":"team-a"}',
                                   '{"image":"a.io/x:1","namespaces":[{"a":1}]}',
                                   '{"image":"a.io/x:1","lastSeen":5}'])
def test_records_of_the_wrong_shape_are_kept_verbatim_not_misread(value):
    learned = LearnedSet.decode({"k": value})
    assert learned.records == {} and learned.unparsed == {"k": value}
    merge(learned, {"a.io/y:1": seen("ns")}, source="admission", settings=Settings())
    assert learned.encode()["k"] == value


@pytest.fixture
def fresh_warnings():
    """The once-per-value warnings are remembered per process: start from none."""
    from webhook import store

    store._WARNED.clear()


def test_an_unreadable_value_at_an_images_own_key_is_never_written_over(caplog,
                                                                      fresh_warnings):
    """A hand edit of a pinned record gone wrong (a string for the namespace list): the
    value stays as the operator left it, the image is refused with the reason, a record
    moved from another key does not land on it either, and the warning comes once."""
    image = "ghcr.io/acme/pinned:1"
    broken = json.dumps({"image": image, "namespaces": "ops", "source": "static"})
    stray = json.dumps({"image": "ghcr.io/acme/pinned:1", "namespaces": ["dev"]})
    data = {key_for(image): broken, "my-pin": stray}
    with caplog.at_level("WARNING", logger="webhook.store"):
        for _ in range(3):  # every flush and every pass reads the set
            learned = LearnedSet.decode(data)
    result = merge(learned, {image: seen("team")}, source="admission", settings=Settings())
    assert result.added == [] and result.changed is False
    assert result.refused == [(image, f"its key {key_for(image)} in learned-images holds a "
                                      f"value that is not a valid record (fix or delete it)")]
    assert learned.encode() == data and learned.moved == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "webhook.store"]
    assert len(warnings) == 2, warnings  # one per key, not one per read
    assert "not a valid record" in warnings[0] and "both kept" in warnings[1]


def test_an_observation_keeps_the_earliest_and_latest_time_whatever_the_order():
    # request threads take the time before the buffer's lock, so adds can come out of order
    observation = Observation()
    for at, namespace in ((T0 + 5, "b"), (T0, ""), (T0 + 9, "a"), (T0 + 2, "b")):
        observation.add(namespace, at)
    assert (observation.first, observation.last) == (T0, T0 + 9)
    assert observation.namespaces == {"a", "b"}


def test_a_record_added_by_hand_is_moved_to_its_key_and_combined_not_duplicated():
    """An operator pins an image by adding a record under a key of their own, in a
    familiar spelling, while the observer already has the same image: one record comes
    out, under the hash of the normalized image, and the next write removes the odd key."""
    canonical = "docker.io/library/nginx:1.27"
    known = Record(image=canonical, namespaces=["team-a"], first_seen="2026-11-20T10:00:00Z",
                   last_seen="2026-11-21T10:00:00Z", source="admission", state="warm")
    data = {key_for(canonical): known.to_json(),
            "pinned-nginx": json.dumps({"image": "nginx:1.27", "namespaces": ["ops"],
                                        "firstSeen": "2026-11-01T00:00:00Z"}),
            "pinned-bad": json.dumps({"image": "Not/A:Valid:Ref"})}
    learned = LearnedSet.decode(data)
    assert list(learned.records) == [key_for(canonical)]
    record = learned.records[key_for(canonical)]
    assert record.image == canonical and record.state == "warm"
    assert record.namespaces == ["team-a", "ops"]
    assert record.first_seen == "2026-11-01T00:00:00Z"
    assert record.last_seen == "2026-11-21T10:00:00Z"
    assert learned.unparsed == {"pinned-bad": data["pinned-bad"]}  # kept, never used
    patch = merge_patch(learned.raw, learned.encode(), "7")["data"]
    assert patch == {"pinned-nginx": None, key_for(canonical): record.to_json()}


def test_a_record_without_times_starts_its_ttl_instead_of_expiring_at_once():
    from webhook.store import stamp_last_seen

    learned = LearnedSet.decode({"pinned": json.dumps({"image": "ghcr.io/acme/tool:1"})})
    assert expire(learned, now=T0, ttl=3600) == []
    assert stamp_last_seen(learned, now=T0) == ["ghcr.io/acme/tool:1"]
    (record,) = learned.records.values()
    assert record.last_seen == record.first_seen == rfc3339(T0)
    assert stamp_last_seen(learned, now=T0 + 60) == []
    assert expire(learned, now=T0 + 3599, ttl=3600) == []
    assert expire(learned, now=T0 + 3601, ttl=3600) == ["ghcr.io/acme/tool:1"]


def test_a_time_far_ahead_is_brought_back_so_the_image_can_expire_and_be_refreshed():
    from webhook.store import MAX_CLOCK_SKEW, stamp_last_seen

    ahead = json.dumps({"image": "ghcr.io/acme/tool:1", "firstSeen": "2036-01-01T00:00:00Z",
                        "lastSeen": "2036-01-01T00:00:00Z"})
    close = json.dumps({"image": "ghcr.io/acme/other:1", "firstSeen": rfc3339(T0),
                        "lastSeen": rfc3339(T0 + MAX_CLOCK_SKEW)})  # a clock a bit fast
    learned = LearnedSet.decode({"a": ahead, "b": close})
    assert stamp_last_seen(learned, now=T0) == ["ghcr.io/acme/tool:1"]
    record = learned.get("ghcr.io/acme/tool:1")
    assert record.last_seen == record.first_seen == rfc3339(T0)
    assert learned.get("ghcr.io/acme/other:1").last_seen == rfc3339(T0 + MAX_CLOCK_SKEW)
    # sightings refresh it again, and it expires a TTL after the last one
    merge(learned, {"ghcr.io/acme/tool:1": seen("ns", at=T0 + 7 * 3600)},
          source="admission", settings=Settings())
    assert record.last_seen == rfc3339(T0 + 7 * 3600)
    assert "ghcr.io/acme/tool:1" in expire(learned, now=T0 + 7 * 3600 + 86401, ttl=86400)


@pytest.mark.parametrize("text,expected", [
    ("2026-11-21T10:00:00Z", "2026-11-21T10:00:00Z"),
    ("2026-11-21T10:00:00.5Z", "2026-11-21T10:00:00Z"),
    ("2026-11-21T10:00:00+00:00", "2026-11-21T10:00:00Z"),
    ("2026-11-21T12:00:00+02:00", "2026-11-21T10:00:00Z"),
    ("2026-11-21 10:00:00z", "2026-11-21T10:00:00Z"),
])
def test_any_rfc3339_spelling_of_a_time_is_read(text, expected):
    assert rfc3339(parse_time(text)) == expected


def test_other_spellings_are_rewritten_as_ours_so_the_pull_order_holds():
    from webhook.store import stamp_last_seen

    value = json.dumps({"image": "ghcr.io/acme/tool:1", "firstSeen": "2026-11-21T12:00:00+02:00",
                        "lastSeen": "2026-11-21T10:00:00.5Z"})
    learned = LearnedSet.decode({"k": value})
    assert stamp_last_seen(learned, now=T0 + 86400 * 365) == ["ghcr.io/acme/tool:1"]
    record = learned.get("ghcr.io/acme/tool:1")
    assert (record.first_seen, record.last_seen) == ("2026-11-21T10:00:00Z",) * 2
    assert stamp_last_seen(learned, now=T0 + 86400 * 365) == []  # once


@pytest.mark.parametrize("text", ["2026-11-21", "2026-11-21T10:00:00", "yesterday", "",
                                  "2026-W47-1T10:00:00Z", "20261121T100000Z",
                                  "2026-11-21T10:00Z"])
def test_a_time_without_date_time_and_offset_is_not_read(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_a_hand_pin_as_static_survives_being_combined_with_a_learned_record():
    canonical = "docker.io/library/nginx:1.27"
    learned_record = Record(image=canonical, namespaces=["team-a"], first_seen=rfc3339(T0),
                            last_seen=rfc3339(T0), source="admission")
    learned = LearnedSet.decode({
        key_for(canonical): learned_record.to_json(),
        "pinned": json.dumps({"image": "nginx:1.27", "source": "static"})})
    (record,) = learned.records.values()
    assert record.source == "static" and learned.moved == 1
    assert expire(learned, now=T0 + 10**9, ttl=3600) == []


def test_writers_that_collided_wait_a_random_growing_while_before_reading_again():
    import random

    from webhook.store import conflict_delay

    rng = random.Random(7)
    windows = {n: max(conflict_delay(n, rng=rng) for _ in range(2000)) for n in (1, 2, 4, 7, 50)}
    # the window doubles from 10 ms and stops at half a second
    assert 0.009 < windows[1] <= 0.01 and 0.019 < windows[2] <= 0.02
    assert 0.079 < windows[4] <= 0.08 and 0.49 < windows[7] <= 0.5 and windows[50] <= 0.5
    # two writers that collided do not come back in step
    assert len({round(conflict_delay(3, rng=rng), 6) for _ in range(100)}) > 95


def test_a_namespace_with_room_is_found_past_the_listed_twenty():
    """An image first seen in more namespaces than a record lists is charged to one
    with room wherever it sorts, not refused because the first twenty are full."""
    learned = LearnedSet()
    settings = Settings(max_images_per_namespace=1)
    full = [f"a{index:02d}" for index in range(MAX_NAMESPACES_PER_IMAGE)]
    for index, namespace in enumerate(full):
        merge(learned, {f"a.io/own-{index}:1": seen(namespace)}, source="admission",
              settings=settings)
    result = merge(learned, {"a.io/shared:1": seen(*full, "zz-has-room")},
                   source="admission", settings=settings)
    assert result.added == ["a.io/shared:1"] and not result.refused
    listed = learned.get("a.io/shared:1").namespaces
    assert listed[0] == "zz-has-room" and len(listed) == MAX_NAMESPACES_PER_IMAGE
    # all full: refused, with the namespaces it may still be learned from elsewhere
    refused = merge(learned, {"a.io/other:1": seen(*full, "zz-has-room")},
                    source="admission", settings=settings)
    assert refused.added == [] and refused.full_in == {
        "a.io/other:1": frozenset(full + ["zz-has-room"])}
    assert refused.refused[0][1].startswith("max images per namespace (1) reached for a00, a01")
    assert refused.refused[0][1].endswith(", a19 and 1 more")


def test_other_refusals_are_not_tied_to_namespaces():
    learned = LearnedSet()
    merge(learned, {"a.io/x:1": seen("ns")}, source="admission", settings=Settings(max_images=1))
    result = merge(learned, {"a.io/y:1": seen("ns")}, source="admission",
                   settings=Settings(max_images=1))
    assert result.refused and result.full_in == {}


def test_json_nested_too_deep_is_kept_verbatim_and_the_rest_still_merges():
    """A hand edit no JSON decoder can hold (nesting past the recursion limit) must not
    stop every read, and with it every write, of learned-images."""
    deep = "[" * 100_000 + "]" * 100_000
    good = LearnedSet()
    merge(good, {"a.io/kept:1": seen("ns")}, source="admission", settings=Settings())
    learned = LearnedSet.decode({"deep": deep, **good.encode()})
    assert learned.unparsed == {"deep": deep}
    assert [r.image for r in learned.records.values()] == ["a.io/kept:1"]
    result = merge(learned, {"a.io/new:1": seen("ns")}, source="admission", settings=Settings())
    assert result.added == ["a.io/new:1"] and learned.encode()["deep"] == deep


def test_a_field_nested_too_deep_to_write_back_is_kept_verbatim():
    """Nesting that decodes where it is read, but whose encoding, deeper in the stack of
    a write, could pass the recursion limit (near 1,000 levels, hit at 950 to 985): any
    field nested past MAX_EXTRA_DEPTH is kept as a bad value, so that writes go on."""
    from webhook.store import MAX_EXTRA_DEPTH

    depth = MAX_EXTRA_DEPTH + 1
    value = ('{"image":"a.io/x:1","note":' + "[" * depth + "]" * depth + "}")
    learned = LearnedSet.decode({key_for("a.io/x:1"): value})
    assert learned.records == {} and learned.unparsed == {key_for("a.io/x:1"): value}
    result = merge(learned, {"a.io/y:1": seen("ns")}, source="admission", settings=Settings())
    assert result.added == ["a.io/y:1"] and len(learned.encode()) == 2
    # what the reconciler writes stays well within the limit, as does nesting to it
    at_limit = "[" * MAX_EXTRA_DEPTH + "]" * MAX_EXTRA_DEPTH
    flat = LearnedSet.decode({key_for("a.io/z:1"): json.dumps(
        {"image": "a.io/z:1", "shard": 0, "warmNodes": 3, "retryAt": "2026-11-21T10:00:00Z",
         "note": json.loads(at_limit)})})
    assert list(flat.records) == [key_for("a.io/z:1")]
