"""Image reference normalization, allow/deny patterns and short hashes.

Most normalization cases are ported from github.com/distribution/reference
(`normalize_test.go`, `reference_test.go`): the grammar containerd and the kubelet use.
"""

from __future__ import annotations

import re

import pytest

from webhook.images import (
    ImageFilter,
    InvalidReference,
    Reference,
    normalize,
    parse,
    short_hash,
)

SHA256 = "sha256:" + "f" * 64
SHA512 = "sha512:" + "f" * 128
REDIS_DIGEST = "sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"
BUSYBOX_DIGEST = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa"
HEX64 = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"


def case(ref: str, expected: str, id: str | None = None):
    return pytest.param(ref, expected, id=id or ref)


# input -> normalized string
VALID = [
    # The familiar forms users write in pod specs.
    case("nginx", "docker.io/library/nginx:latest"),
    case("nginx:1.25", "docker.io/library/nginx:1.25"),
    case("user/img", "docker.io/user/img:latest"),
    case("index.docker.io/x", "docker.io/library/x:latest"),
    case("localhost/img", "localhost/img:latest"),
    case("localhost:5000/img", "localhost:5000/img:latest"),
    case(
        f"reg.example.com:443/ns/img:tag@{SHA256}",
        f"reg.example.com:443/ns/img:tag@{SHA256}",
        id="registry-port-tag-and-digest",
    ),
    case(f"img@{SHA256}", f"docker.io/library/img@{SHA256}", id="digest-without-latest"),
    case("[::1]:5000/img", "[::1]:5000/img:latest"),
    case("Example.COM/foo", "Example.COM/foo:latest", id="uppercase-domain"),
    # normalize_test.go TestValidateReferenceName
    case("docker/docker", "docker.io/docker/docker:latest"),
    case("library/debian", "docker.io/library/debian:latest"),
    case("debian", "docker.io/library/debian:latest"),
    case("docker.io/docker/docker", "docker.io/docker/docker:latest"),
    case("docker.io/library/debian", "docker.io/library/debian:latest"),
    case("docker.io/debian", "docker.io/library/debian:latest"),
    case("index.docker.io/docker/docker", "docker.io/docker/docker:latest"),
    case("index.docker.io/library/debian", "docker.io/library/debian:latest"),
    case("index.docker.io/debian", "docker.io/library/debian:latest"),
    case("127.0.0.1:5000/docker/docker", "127.0.0.1:5000/docker/docker:latest"),
    case("127.0.0.1:5000/library/debian", "127.0.0.1:5000/library/debian:latest"),
    case("127.0.0.1:5000/debian", "127.0.0.1:5000/debian:latest", id="no-library-off-hub"),
    case("192.168.0.1", "docker.io/library/192.168.0.1:latest", id="lone-ip-is-hub-name"),
    case("192.168.0.1:80", "docker.io/library/192.168.0.1:80", id="lone-ip-port-is-tag"),
    case("192.168.0.1:8/debian", "192.168.0.1:8/debian:latest"),
    case("192.168.0.2:25000/debian", "192.168.0.2:25000/debian:latest"),
    case(
        "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        "docker.io/library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev:latest",
        id="64-char-non-hex-name",
    ),
    case("[fc00::1]:5000/docker", "[fc00::1]:5000/docker:latest"),
    case("[fc00::1]:5000/docker/docker", "[fc00::1]:5000/docker/docker:latest"),
    case(
        "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
        "[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest",
    ),
    case(f"docker.io/{HEX64}", f"docker.io/library/{HEX64}:latest", id="hex-name-with-domain"),
    case("Docker/docker", "Docker/docker:latest", id="uppercase-first-segment-is-domain"),
    case("DOCKER/docker", "DOCKER/docker:latest"),
    # normalize_test.go TestValidateRemoteName
    case("docker-rules/docker", "docker.io/docker-rules/docker:latest"),
    case("docker---rules/docker", "docker.io/docker---rules/docker:latest"),
    case("doc/docker", "docker.io/doc/docker:latest"),
    case("d/docker", "docker.io/d/docker:latest"),
    case("jess/t", "docker.io/jess/t:latest"),
    case("dock__er/docker", "docker.io/dock__er/docker:latest"),
    # normalize_test.go TestParseRepositoryInfo / TestNormalizedSplitHostname
    case("library/foo/bar", "docker.io/library/foo/bar:latest"),
    case("store/foo/bar", "docker.io/store/foo/bar:latest"),
    case("other/library", "docker.io/other/library:latest"),
    case("ubuntu-12.04-base", "docker.io/library/ubuntu-12.04-base:latest"),
    case("test_com/foo", "docker.io/test_com/foo:latest"),
    case("test-com:8080/foo", "test-com:8080/foo:latest"),
    case("xn--n3h.com:18080/foo", "xn--n3h.com:18080/foo:latest"),
    case("example.com:8000/private/moonbase", "example.com:8000/private/moonbase:latest"),
    case(
        f"busybox:latest@{BUSYBOX_DIGEST}",
        f"docker.io/library/busybox:latest@{BUSYBOX_DIGEST}",
        id="tag-and-digest-short-name",
    ),
    # normalize_test.go TestParseAnyReference (named forms)
    case(f"redis@{REDIS_DIGEST}", f"docker.io/library/redis@{REDIS_DIGEST}", id="redis-digest"),
    case(
        f"dmcgowan/myapp@{REDIS_DIGEST}",
        f"docker.io/dmcgowan/myapp@{REDIS_DIGEST}",
        id="user-repo-digest",
    ),
    case(HEX64[:63], f"docker.io/library/{HEX64[:63]}:latest", id="63-hex-is-a-name"),
    # reference_test.go TestReferenceParse (valid ones, normalized)
    case("test.com:tag", "docker.io/library/test.com:tag", id="lone-dotted-name-colon-tag"),
    case("test.com:5000", "docker.io/library/test.com:5000", id="lone-host-port-is-tag"),
    case("test:5000/repo:tag", "test:5000/repo:tag"),
    case(f"test:5000/repo@{SHA256}", f"test:5000/repo@{SHA256}", id="port-digest"),
    case("lowercase:Uppercase", "docker.io/library/lowercase:Uppercase", id="uppercase-tag"),
    case(
        "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
        "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
    ),
    case(
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "b.gcr.io/test.example.com/my-app:test.example.com",
    ),
    case("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com/myimage:xn--n3h.com"),
    case(
        f"xn--7o8h.com/myimage:xn--7o8h.com@{SHA512}",
        f"xn--7o8h.com/myimage:xn--7o8h.com@{SHA512}",
        id="sha512-digest",
    ),
    case("foo_bar.com:8080", "docker.io/library/foo_bar.com:8080"),
    case("foo/foo_bar.com:8080", "docker.io/foo/foo_bar.com:8080"),
    case("192.168.1.1:5000/repo:5050", "192.168.1.1:5000/repo:5050"),
    case("[2001:db8::1]/repo", "[2001:db8::1]/repo:latest"),
    case("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]/repo:tag"),
    case(
        f"[2001:db8::1]:5000/repo:tag@{SHA256}",
        f"[2001:db8::1]:5000/repo:tag@{SHA256}",
        id="ipv6-tag-digest",
    ),
    case("[2001:db8::]:5000/repo", "[2001:db8::]:5000/repo:latest"),
    case(
        "example.com/" + "a" * 255 + ":tag",
        "example.com/" + "a" * 255 + ":tag",
        id="path-of-255-is-allowed",
    ),
    case(
        "a/" * 127 + "a:tag-puts-this-over-max",
        "docker.io/" + "a/" * 127 + "a:tag-puts-this-over-max",
        id="255-char-path-with-long-tag",
    ),
    case("nginx:" + "t" * 128, "docker.io/library/nginx:" + "t" * 128, id="tag-of-128"),
    case("nginx:_under.score-1", "docker.io/library/nginx:_under.score-1", id="tag-charset"),
]


# input -> reason
INVALID = [
    pytest.param("", "empty reference", id="empty"),
    pytest.param(" nginx", "leading or trailing whitespace", id="leading-space"),
    pytest.param("nginx ", "leading or trailing whitespace", id="trailing-space"),
    pytest.param("nginx\n", "leading or trailing whitespace", id="trailing-newline"),
    pytest.param("\tnginx", "leading or trailing whitespace", id="leading-tab"),
    pytest.param("ng inx", "invalid reference format", id="inner-space"),
    pytest.param("a" * 2000, "reference too long", id="huge-input"),
    pytest.param(HEX64, "cannot be a 64-character hex string", id="bare-64-hex"),
    pytest.param(
        f"sha256:{HEX64}", "cannot be a 64-character hex string", id="image-id-with-algorithm"
    ),
    # normalize_test.go TestValidateReferenceName (invalid)
    pytest.param("https://github.com/docker/docker", "invalid reference format", id="url"),
    pytest.param("docker/Docker", "repository name must be lowercase", id="docker/Docker"),
    pytest.param("-docker", "invalid reference format", id="-docker"),
    pytest.param("-docker/docker", "invalid reference format", id="-docker/docker"),
    pytest.param("-docker.io/docker/docker", "invalid reference format", id="-docker.io"),
    pytest.param("docker///docker", "invalid reference format", id="docker///docker"),
    pytest.param(
        "docker.io/docker/Docker",
        "repository name must be lowercase",
        id="docker.io/docker/Docker",
    ),
    pytest.param("docker.io/docker///docker", "invalid reference format", id="empty-segments"),
    pytest.param("[fc00::1]", "invalid reference format", id="[fc00::1]"),
    pytest.param("[fc00::1]:5000", "invalid reference format", id="[fc00::1]:5000"),
    pytest.param("fc00::1:5000/debian", "invalid reference format", id="ipv6-no-brackets"),
    pytest.param("[fe80::1%eth0]:5000/debian", "invalid reference format", id="ipv6-zone"),
    pytest.param(
        "[2001:db8:3:4::192.0.2.33]:5000/debian", "invalid reference format", id="ipv4-mapped"
    ),
    # normalize_test.go TestValidateRemoteName (invalid)
    pytest.param("docker-/docker", "invalid reference format", id="docker-/docker"),
    pytest.param("-docker-/docker", "invalid reference format", id="-docker-/docker"),
    pytest.param("____/____", "invalid reference format", id="underscores-only"),
    pytest.param("_docker/_docker", "invalid reference format", id="_docker/_docker"),
    pytest.param("dock..er/docker", "invalid reference format", id="double-period"),
    pytest.param("dock_.er/docker", "invalid reference format", id="underscore-period"),
    pytest.param("dock-.er/docker", "invalid reference format", id="dash-period"),
    pytest.param("docker/", "invalid reference format", id="no-repository"),
    pytest.param(
        "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255" * 4 + "/docker",
        "repository name too long",
        id="namespace-too-long",
    ),
    # reference_test.go TestReferenceParse (invalid)
    pytest.param(":justtag", "invalid reference format", id=":justtag"),
    pytest.param(f"@{SHA256}", "invalid reference format", id="digest-without-name"),
    pytest.param("repo@sha256:" + "f" * 34, "invalid digest", id="digest-too-short"),
    pytest.param(
        "validname@invaliddigest:" + "f" * 64,
        "unsupported digest algorithm",
        id="unknown-digest-algorithm",
    ),
    pytest.param("Uppercase:tag", "repository name must be lowercase", id="Uppercase:tag"),
    pytest.param(
        "test:5000/Uppercase/lowercase:tag",
        "repository name must be lowercase",
        id="uppercase-after-registry",
    ),
    pytest.param("Foo_Bar/x", "repository name must be lowercase", id="uppercase-non-host"),
    pytest.param("domain/" + "a" * 256 + ":tag", "repository name too long", id="path-of-256"),
    pytest.param("a/" * 128 + "a:tag", "repository name too long", id="257-char-path"),
    # a first segment that is not a grammatical host is part of the path upstream, and
    # counts towards its 255 characters (found by test_images_runtime.py)
    pytest.param("foo_bar.com/" + "x" * 250, "repository name too long",
                 id="non-grammar-host-counts-in-path"),
    pytest.param("aa/asdf$$^/aa", "invalid reference format", id="symbols"),
    pytest.param("[2001:db8::1]", "invalid reference format", id="lone-ipv6"),
    pytest.param("[2001:db8::1]:5000", "invalid reference format", id="lone-ipv6-port"),
    pytest.param("[2001:db8::1]:tag", "invalid reference format", id="lone-ipv6-tag"),
    pytest.param(
        "[fe80::1%@invalidzone]:5000/repo", "invalid reference format", id="ipv6-zone-with-at"
    ),
    # Tags and digests.
    pytest.param("nginx:" + "t" * 129, "invalid tag", id="tag-of-129"),
    pytest.param("nginx:", "invalid tag", id="empty-tag"),
    pytest.param("nginx:-dash", "invalid tag", id="tag-starting-with-dash"),
    pytest.param("nginx:.dot", "invalid tag", id="tag-starting-with-dot"),
    pytest.param("nginx:t\u00e9", "invalid tag", id="non-ascii-tag"),
    pytest.param("nginx@", "invalid digest", id="empty-digest"),
    pytest.param("nginx@sha256:" + "a" * 63, "invalid digest", id="digest-63-hex"),
    pytest.param("nginx@sha256:" + "a" * 65, "invalid digest", id="digest-65-hex"),
    pytest.param("nginx@sha256:" + "A" * 64, "invalid digest", id="digest-uppercase-hex"),
    pytest.param("nginx@sha256:" + "g" * 64, "invalid digest", id="digest-non-hex"),
    pytest.param("nginx@sha512:" + "a" * 64, "invalid digest", id="sha512-wrong-length"),
    pytest.param("nginx@md5:" + "a" * 32, "unsupported digest algorithm", id="md5"),
    pytest.param("nginx@SHA256:" + "a" * 64, "unsupported digest algorithm", id="algorithm-case"),
    pytest.param(f"nginx@{SHA256}:tag", "invalid digest", id="tag-after-digest"),
]


@pytest.mark.parametrize(("ref", "expected"), VALID)
def test_normalizes_like_the_runtime(ref: str, expected: str) -> None:
    assert normalize(ref) == expected


@pytest.mark.parametrize(("ref", "expected"), VALID)
def test_normalized_form_is_a_fixed_point(ref: str, expected: str) -> None:
    # Records store the normalized string and are parsed again on every read.
    assert normalize(expected) == expected
    assert parse(expected) == parse(ref)


@pytest.mark.parametrize(("ref", "reason"), INVALID)
def test_rejects_with_reason(ref: str, reason: str) -> None:
    with pytest.raises(InvalidReference) as excinfo:
        parse(ref)
    assert excinfo.value.reason == reason
    assert isinstance(excinfo.value, ValueError)
    assert reason in str(excinfo.value)


@pytest.mark.parametrize(
    ("ref", "domain", "path", "tag", "digest"),
    [
        pytest.param("nginx", "docker.io", "library/nginx", "latest", None, id="familiar"),
        pytest.param(
            "docker/migrator", "docker.io", "docker/migrator", "latest", None, id="hub-user"
        ),
        pytest.param(
            "localhost:5000/a/b:1", "localhost:5000", "a/b", "1", None, id="localhost-port"
        ),
        pytest.param(f"img@{SHA256}", "docker.io", "library/img", None, SHA256, id="digest-only"),
        pytest.param(
            f"[::1]:5000/img:v1@{SHA256}", "[::1]:5000", "img", "v1", SHA256, id="ipv6-tag-digest"
        ),
        pytest.param("FOO/bar", "FOO", "bar", "latest", None, id="uppercase-domain-kept"),
        pytest.param("foo_bar.com/x", "foo_bar.com", "x", "latest", None, id="non-grammar-host"),
    ],
)
def test_parse_fields(
    ref: str, domain: str, path: str, tag: str | None, digest: str | None
) -> None:
    parsed = parse(ref)
    assert parsed == Reference(domain=domain, path=path, tag=tag, digest=digest)
    assert parsed.name == f"{domain}/{path}"


def test_invalid_reference_names_the_reference() -> None:
    with pytest.raises(InvalidReference) as excinfo:
        parse("docker/Docker")
    assert excinfo.value.reference == "docker/Docker"
    assert "'docker/Docker'" in str(excinfo.value)


# --- ImageFilter -----------------------------------------------------------------------

# pattern, image, matches
MATCHES = [
    pytest.param("myregistry.io", "myregistry.io/a/b:1", True, id="registry"),
    pytest.param("myregistry.io", "myregistry.io.evil.com/x", False, id="registry-suffix-trick"),
    pytest.param("myregistry.io", "myregistry.iox/x", False, id="registry-longer-host"),
    pytest.param("myregistry.io", "evil.com/myregistry.io/x", False, id="registry-as-path"),
    pytest.param("myregistry.io", "MyRegistry.IO/a", True, id="registry-case-insensitive"),
    pytest.param("MyRegistry.IO", "myregistry.io/a", True, id="pattern-case-insensitive"),
    pytest.param("myregistry.io", "myregistry.io:5000/a", True, id="portless-any-port"),
    pytest.param("reg.io:5000", "reg.io:5000/x", True, id="port"),
    pytest.param("reg.io:5000", "reg.io:5001/x", False, id="port-mismatch"),
    pytest.param("reg.io:5000", "reg.io:50001/x", False, id="port-prefix"),
    pytest.param("reg.io:5000", "reg.io/x", False, id="port-vs-none"),
    # a reference without a port is pulled over HTTPS, from 443: the same server
    pytest.param("reg.io:443", "reg.io/x", True, id="https-port-vs-none"),
    pytest.param("reg.io:443", "reg.io:5000/x", False, id="https-port-vs-other"),
    pytest.param("reg.io:80", "reg.io/x", False, id="http-port-vs-none"),
    pytest.param("[::1]:443", "[::1]/x", True, id="ipv6-https-port-vs-none"),
    pytest.param("reg.io:5000", "reg.io:05000/x", True, id="port-leading-zero"),
    pytest.param("reg:5000", "reg:5000/x", True, id="dotless-host-with-port"),
    pytest.param("docker.io/library", "nginx", True, id="official-namespace"),
    pytest.param("docker.io/library", "library2/x", False, id="namespace-prefix-trick"),
    pytest.param("docker.io/library", "docker.io/library", True, id="namespace-as-repo"),
    pytest.param("docker.io/bitnami", "bitnami/redis", True, id="explicit-registry-literal-path"),
    pytest.param("docker.io", "nginx", True, id="hub"),
    pytest.param("docker.io", "ghcr.io/x", False, id="hub-vs-other"),
    pytest.param("index.docker.io", "user/img", True, id="legacy-hub-alias"),
    pytest.param("docker.io", "index.docker.io:443/library/nginx", True, id="legacy-hub-port"),
    pytest.param("docker.io", "INDEX.DOCKER.IO/library/nginx", True, id="legacy-hub-upper"),
    pytest.param("docker.io/library", "Index.Docker.IO:443/library/x", True,
                 id="legacy-hub-path"),
    pytest.param("index.docker.io:443", "INDEX.docker.io:443/a/b", True,
                 id="legacy-hub-pattern-port"),
    pytest.param("docker.io", "index.docker.io.evil.com/x", False, id="legacy-hub-suffix-trick"),
    pytest.param("ghcr.io/acme/*", "ghcr.io/acme/team/x", True, id="star"),
    pytest.param("ghcr.io/acme/*", "ghcr.io/acme", False, id="star-needs-a-segment"),
    pytest.param("ghcr.io/acme/*/tools", "ghcr.io/acme/team/tools/x", True, id="star-middle"),
    pytest.param("ghcr.io/acme/*/tools", "ghcr.io/acme/team/other/x", False, id="star-miss"),
    pytest.param("ghcr.io/acme/*/tools", "ghcr.io/acme/a/b/tools", False, id="star-one-segment"),
    pytest.param("ghcr.io/acme/*/tools", "ghcr.io/acme/tools/x", False, id="star-not-zero"),
    pytest.param("ghcr.io/acme/app", "ghcr.io/acme/app:1.0", True, id="repo-any-tag"),
    pytest.param("ghcr.io/acme/app", f"ghcr.io/acme/app@{SHA256}", True, id="repo-any-digest"),
    pytest.param("ghcr.io/acme/app", "ghcr.io/acme/app-evil:1", False, id="repo-prefix-trick"),
    pytest.param("ghcr.io/acme/app", "ghcr.io/acme/app/sub", True, id="repo-nested"),
    pytest.param("nginx", "docker.io/library/nginx:1.25", True, id="familiar-pattern"),
    pytest.param("nginx", "nginx-evil", False, id="familiar-prefix-trick"),
    pytest.param("nginx", "ghcr.io/nginx", False, id="familiar-is-hub-only"),
    pytest.param("nginx", "bitnami/nginx", False, id="familiar-is-library"),
    pytest.param("library/nginx", "nginx:1", True, id="library-pattern"),
    pytest.param("bitnami/redis", "docker.io/bitnami/redis:7", True, id="hub-user-pattern"),
    pytest.param("*/redis", "bitnami/redis", True, id="any-hub-namespace"),
    pytest.param("*", "alpine", True, id="star-all-official"),
    pytest.param("*", "bitnami/redis", False, id="star-not-user-repos"),
    pytest.param("localhost", "localhost:5000/x", True, id="localhost-any-port"),
    pytest.param("localhost", "localhost/x", True, id="localhost"),
    pytest.param("localhost", "localhost.evil.io/x", False, id="localhost-suffix-trick"),
    pytest.param("[::1]:5000", "[::1]:5000/img", True, id="ipv6-port"),
    pytest.param("[::1]:5000", "[::1]:5001/img", False, id="ipv6-port-mismatch"),
    pytest.param("[::1]", "[::1]:5000/img", True, id="ipv6-any-port"),
    # one address, however written: a deny must not be dodged by another spelling
    pytest.param("[::1]:5000", "[0:0::1]:5000/x", True, id="ipv6-other-spelling"),
    pytest.param("[::1]:5000", "[::0001]:5000/x", True, id="ipv6-leading-zeros"),
    pytest.param("[FD00::A]", "[fd00:0::a]/x", True, id="ipv6-case-and-zeros"),
    pytest.param("[::1]", "[::2]/x", False, id="ipv6-other-address"),
    pytest.param("10.0.0.1", "[::ffff:a00:1]:5000/x", True, id="ipv4-mapped"),
    pytest.param("10.0.0.1:5000", "[0:0:0:0:0:ffff:a00:1]:5000/x", True, id="ipv4-mapped-long"),
    pytest.param("[::ffff:a00:1]", "10.0.0.1/x", True, id="ipv4-mapped-pattern"),
    pytest.param("10.0.0.1", "[::ffff:a00:2]/x", False, id="ipv4-mapped-other"),
    pytest.param("10.0.0.1", "10.0.0.10/img", False, id="ip-prefix-trick"),
]


@pytest.mark.parametrize(("pattern", "image", "matches"), MATCHES)
def test_pattern_matches_whole_segments(pattern: str, image: str, matches: bool) -> None:
    ref = parse(image)
    denied = ImageFilter(deny=[pattern]).check(ref)
    allowed = ImageFilter(allow=[pattern]).check(ref)
    if matches:
        assert denied == f"denied by pattern '{pattern}'"
        assert allowed is None
    else:
        assert denied is None
        assert allowed == "not in allow list"


def test_empty_filter_allows_everything() -> None:
    image_filter = ImageFilter()
    for image in ("nginx", "ghcr.io/acme/app:1", f"[::1]:5000/x@{SHA256}"):
        assert image_filter.check(parse(image)) is None


def test_deny_wins_over_allow() -> None:
    image_filter = ImageFilter(allow=["ghcr.io/acme"], deny=["ghcr.io/acme/secret"])
    assert image_filter.check(parse("ghcr.io/acme/app:1")) is None
    assert (
        image_filter.check(parse("ghcr.io/acme/secret/x:1"))
        == "denied by pattern 'ghcr.io/acme/secret'"
    )
    assert image_filter.check(parse("ghcr.io/other/x")) == "not in allow list"


def test_first_matching_deny_is_named() -> None:
    image_filter = ImageFilter(deny=["quay.io", "docker.io/library", "nginx"])
    assert image_filter.check(parse("nginx")) == "denied by pattern 'docker.io/library'"


def test_any_allow_pattern_admits() -> None:
    image_filter = ImageFilter(allow=["ghcr.io/acme", "nginx"])
    assert image_filter.check(parse("nginx:1.25")) is None
    assert image_filter.check(parse("ghcr.io/acme/x")) is None
    assert image_filter.check(parse("redis")) == "not in allow list"


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("", id="empty"),
        pytest.param(" ghcr.io", id="leading-space"),
        pytest.param("ghcr.io/", id="trailing-slash"),
        pytest.param("ghcr.io//x", id="empty-segment"),
        pytest.param("ghcr.io/Acme", id="uppercase-path"),
        pytest.param("ghcr.io/ac*", id="partial-star"),
        pytest.param("ghcr.io/**", id="double-star"),
        pytest.param("*.example.com", id="star-in-registry"),
        pytest.param("nginx:1.25", id="tag-on-familiar"),
        pytest.param("ghcr.io/app:1.0", id="tag"),
        pytest.param(f"ghcr.io/app@{SHA256}", id="digest"),
        pytest.param("-bad.io", id="bad-host"),
        pytest.param("reg.io:port", id="non-numeric-port"),
        pytest.param("https://ghcr.io", id="url"),
        pytest.param("[fe80::1%eth0]", id="ipv6-zone"),
    ],
)
def test_invalid_pattern_is_rejected_naming_it(pattern: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        ImageFilter(allow=["ghcr.io"], deny=[pattern])
    assert repr(pattern) in str(excinfo.value)


def test_a_bare_string_is_not_a_pattern_list() -> None:
    with pytest.raises(TypeError):
        ImageFilter(allow="ghcr.io")


# --- short_hash ------------------------------------------------------------------------


def test_short_hash_is_pinned() -> None:
    # These name pull-<hash> containers in deployed DaemonSets: a change renames them all.
    assert short_hash("nginx") == "86cee2c108"
    assert short_hash(f"ghcr.io/acme/app@sha256:{'a' * 64}", 64) == (
        "15717019d9b80ea2bebf17df3be880c632c197283159d6736ee36f3fd3b77b13"
    )


def test_short_hash_is_the_same_for_every_spelling() -> None:
    spellings = [
        "nginx",
        "nginx:latest",
        "library/nginx",
        "docker.io/nginx",
        "docker.io/library/nginx:latest",
        "index.docker.io/library/nginx",
    ]
    assert {short_hash(s) for s in spellings} == {short_hash("nginx")}


def test_short_hash_tells_images_apart() -> None:
    images = [
        "nginx:1.25",
        "nginx:1.26",
        "nginx",
        f"nginx@{SHA256}",
        "ghcr.io/nginx",
        "localhost/nginx",
    ]
    assert len({short_hash(i) for i in images}) == len(images)


@pytest.mark.parametrize("length", [1, 10, 12, 64])
def test_short_hash_charset_and_length(length: int) -> None:
    value = short_hash("ghcr.io/acme/app:1.0", length)
    assert re.fullmatch(rf"[0-9a-f]{{{length}}}", value)
    # It ends up in a DNS-1123 label.
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", f"pull-{value}")


@pytest.mark.parametrize("length", [0, -1, 65])
def test_short_hash_rejects_bad_length(length: int) -> None:
    with pytest.raises(ValueError):
        short_hash("nginx", length)


def test_short_hash_rejects_invalid_reference() -> None:
    with pytest.raises(InvalidReference):
        short_hash("docker/Docker")
