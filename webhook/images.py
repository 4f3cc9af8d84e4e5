"""Image references, normalized the way the container runtime resolves them.

containerd, CRI-O and the kubelet all resolve an image name with the grammar of
github.com/distribution/reference (`ParseNormalizedNamed`): `nginx` is
`docker.io/library/nginx`, `localhost:5000/app` keeps its registry and port, a digest is
kept. Prewarm records and pulls the normalized form, so two spellings of one image are
one record and one `pull-<hash>` container. The grammar below is ported from upstream's
`regexp.go` (named pieces composed into anchored expressions) and `normalize.go`.

Deliberate differences from upstream, each because Prewarm must be able to *pull* what it
records:

- A bare image ID (`sha256:<64 hex>`, or 64 hex alone) is rejected. Upstream
  `ParseNormalizedNamed` reads `sha256:<hex>` as repository `library/sha256` with a tag,
  but the runtime resolves it as a local image ID, which no registry can serve.
- Whitespace around a reference is rejected with its own reason (the API server rejects
  such container images too) rather than a generic format error.
- References longer than `MAX_REFERENCE_LENGTH` are rejected before any regular
  expression runs: admission input is untrusted, and no pullable reference comes near it.
- For a first path segment that names a registry but is not a grammatical host
  (`foo_bar.com/x`), upstream accepts the whole string as a path with an empty domain;
  here `domain` is that first segment, since it is the host the runtime will contact.
  The normalized string is the same, and so is the length limit: such a segment counts
  towards the path's 255 characters, as it does upstream.

Also here: `ImageFilter`, the allow/deny patterns on registries and repositories, and
`short_hash`, the stable short name of an image.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ImageFilter",
    "InvalidReference",
    "Reference",
    "normalize",
    "parse",
    "short_hash",
]

DEFAULT_DOMAIN = "docker.io"
# The "Docker Index" domain, still accepted and canonicalized to docker.io upstream.
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
LOCALHOST = "localhost"

# Upstream's RepositoryNameTotalLengthMax, applied to the path (the domain excluded),
# as distribution/reference does since it stopped counting the domain.
REPOSITORY_NAME_MAX = 255
# DNS name (253) + path (255) + tag (128) + sha512 digest (135) + separators < 800.
MAX_REFERENCE_LENGTH = 1024

# Digest algorithms the runtimes register (go-digest: crypto/sha256, crypto/sha512),
# with the length of their lowercase hex encoding.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


# --- grammar (distribution/reference regexp.go) ----------------------------------------

# One path component: lowercase alphanumerics joined by one period, one or two
# underscores, or any number of dashes.
_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"

# A registry: a DNS-like name (upper case allowed), an IPv4 address, or an IPv6 address
# in brackets without a zone, optionally with a port.
_DOMAIN_NAME_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_NAME_COMPONENT}(?:\.{_DOMAIN_NAME_COMPONENT})*"
_IPV6_ADDRESS = r"\[(?:[a-fA-F0-9:]+)\]"
_HOST = rf"(?:{_DOMAIN_NAME}|{_IPV6_ADDRESS})"
_OPTIONAL_PORT = r"(?::[0-9]+)?"
_DOMAIN_AND_PORT = _HOST + _OPTIONAL_PORT

_NAME = rf"(?:{_DOMAIN_AND_PORT}/)?{_REMOTE_NAME}"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}"
_IDENTIFIER = r"[a-f0-9]{64}"

_REFERENCE = rf"({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?"


def _anchored(pattern: str) -> re.Pattern[str]:
    # Always used with fullmatch: `$` would also accept a trailing newline. ASCII so
    # that `\w` is Go's [0-9A-Za-z_], not every Unicode letter.
    return re.compile(pattern, re.ASCII)


_REFERENCE_RE = _anchored(_REFERENCE)
_NAME_RE = _anchored(_NAME)
_TAG_RE = _anchored(_TAG)
_DIGEST_RE = _anchored(_DIGEST)
_IDENTIFIER_RE = _anchored(_IDENTIFIER)
_PATH_COMPONENT_RE = _anchored(_PATH_COMPONENT)
_DOMAIN_AND_PORT_RE = _anchored(_DOMAIN_AND_PORT)
_LOWER_HEX_RE = _anchored(r"[a-f0-9]+")


# --- references ------------------------------------------------------------------------


class InvalidReference(ValueError):
    """An image reference the runtime would not resolve; `reason` says why, briefly."""

    def __init__(self, reference: str, reason: str) -> None:
        super().__init__(f"invalid image reference {reference!r}: {reason}")
        self.reference = reference
        self.reason = reason


@dataclass(frozen=True)
class Reference:
    """A normalized image reference: `domain/path[:tag][@digest]`.

    `parse` gives every reference a tag or a digest: `latest` is added only when there
    is neither, since a digest alone already pins the image.
    """

    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """The repository, without tag or digest: `docker.io/library/nginx`."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        return self._text

    @functools.cached_property
    def _text(self) -> str:  # parse() caches references: each is written out once
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse(ref: str) -> Reference:
    """Parse and normalize an image reference, or raise `InvalidReference`."""
    # The same few hundred images come back in review after review: a hit costs a dict
    # lookup instead of the grammar's regular expressions. Invalid references are not
    # cached (lru_cache does not keep exceptions), so garbage cannot fill the cache.
    return _parse_cached(ref)


@functools.lru_cache(maxsize=8192)
def _parse_cached(ref: str) -> Reference:
    if not ref:
        raise InvalidReference(ref, "empty reference")
    if ref != ref.strip():
        raise InvalidReference(ref, "leading or trailing whitespace")
    if len(ref) > MAX_REFERENCE_LENGTH:
        raise InvalidReference(ref, "reference too long")
    if _IDENTIFIER_RE.fullmatch(ref) or _is_digest(ref):
        raise InvalidReference(ref, "cannot be a 64-character hex string")

    domain, remainder = _split_docker_domain(ref)
    # Checked before the grammar so the reason names the real problem: the grammar only
    # knows that `Nginx` is not a valid path. Upstream cuts at ":" only, which blames the
    # name for `nginx@SHA256:...`; cutting at "@" too rejects the same references.
    remote = re.split("[:@]", remainder, maxsplit=1)[0]
    if remote.lower() != remote:
        raise InvalidReference(ref, "repository name must be lowercase")

    candidate = f"{domain}/{remainder}"
    match = _REFERENCE_RE.fullmatch(candidate)
    if match is None:
        raise InvalidReference(ref, _diagnose(candidate))
    name, tag, digest = match.groups()
    # Tags and digests hold no "/", so the matched name always starts with domain + "/".
    path = name[len(domain) + 1 :]
    # a domain that is not a grammatical host is part of the path upstream (see above)
    counted = path if _DOMAIN_AND_PORT_RE.fullmatch(domain) else name
    if len(counted) > REPOSITORY_NAME_MAX:
        raise InvalidReference(ref, "repository name too long")
    if digest is not None:
        _check_digest(ref, digest)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest)


def normalize(ref: str) -> str:
    """The normalized string of an image reference: `nginx` -> `docker.io/library/nginx:latest`."""
    return str(parse(ref))


def short_hash(ref: str, length: int = 10) -> str:
    """First `length` lowercase hex characters of sha256(normalized reference).

    Stable across spellings of one image and across releases: it names `pull-<hash>`
    containers and record keys, so changing it renames them all (and rolls the DaemonSet).
    """
    if not 1 <= length <= 64:
        raise ValueError(f"hash length must be between 1 and 64, not {length}")
    return hashlib.sha256(normalize(ref).encode()).hexdigest()[:length]


def _split_docker_domain(name: str) -> tuple[str, str]:
    """Split into registry and the rest, filling in Docker Hub's defaults (splitDockerDomain)."""
    maybe_domain, slash, maybe_remote = name.partition("/")
    if not slash:
        # A single component is always a Docker Hub official image, even `localhost`
        # or `example.com` (an upstream FIXME, kept: the runtime does the same).
        return DEFAULT_DOMAIN, OFFICIAL_REPO_PREFIX + name
    if maybe_domain == LEGACY_DEFAULT_DOMAIN:
        domain, remote = DEFAULT_DOMAIN, maybe_remote
    elif (
        maybe_domain == LOCALHOST
        or "." in maybe_domain
        or ":" in maybe_domain
        # Repository paths are lowercase, so an upper-case first segment must be a host.
        or maybe_domain.lower() != maybe_domain
    ):
        domain, remote = maybe_domain, maybe_remote
    else:
        domain, remote = DEFAULT_DOMAIN, name
    if domain == DEFAULT_DOMAIN and "/" not in remote:
        remote = OFFICIAL_REPO_PREFIX + remote
    return domain, remote


def _is_digest(text: str) -> bool:
    algorithm, colon, encoded = text.partition(":")
    return (
        bool(colon)
        and DIGEST_HEX_LENGTHS.get(algorithm) == len(encoded)
        and _LOWER_HEX_RE.fullmatch(encoded) is not None
    )


def _check_digest(ref: str, digest: str) -> None:
    # go-digest's Parse, which the grammar leaves to: a registered algorithm, and exactly
    # its length of lowercase hex.
    algorithm, _, encoded = digest.partition(":")
    expected = DIGEST_HEX_LENGTHS.get(algorithm)
    if expected is None:
        raise InvalidReference(ref, "unsupported digest algorithm")
    if len(encoded) != expected or not _LOWER_HEX_RE.fullmatch(encoded):
        raise InvalidReference(ref, "invalid digest")


def _diagnose(candidate: str) -> str:
    """Which part of a reference that failed the grammar is wrong."""
    if _REFERENCE_RE.fullmatch(candidate.lower()):
        return "repository name must be lowercase"
    rest, at, digest = candidate.partition("@")
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        name, tag = rest[:colon], rest[colon + 1 :]
    else:
        name, tag = rest, None
    if not _NAME_RE.fullmatch(name):
        return "invalid reference format"
    if tag is not None and not _TAG_RE.fullmatch(tag):
        return "invalid tag"
    if at and not _DIGEST_RE.fullmatch(digest):
        return "invalid digest"
    return "invalid reference format"


# --- allow / deny patterns -------------------------------------------------------------


HTTPS_PORT = 443


@dataclass(frozen=True)
class _Pattern:
    text: str
    host: str  # see _canonical_host
    port: int | None  # None: any port
    segments: tuple[str, ...]  # path prefix; "*" stands for exactly one segment

    def matches(self, ref: Reference) -> bool:
        host, port = _split_host_port(ref.domain)
        if _canonical_host(host) != self.host:
            return False
        # a registry named without a port is pulled from over HTTPS on 443: `reg.io/x` and
        # `reg.io:443/x` are one server, and a deny on `reg.io:443` must stop both
        if self.port is not None and (HTTPS_PORT if port is None else port) != self.port:
            return False
        path = ref.path.split("/")
        if len(self.segments) > len(path):
            return False
        return all(want in ("*", got) for want, got in zip(self.segments, path))


class ImageFilter:
    """Allow and deny patterns on registries and repository paths.

    A pattern is a registry, optionally followed by a repository path prefix, and always
    matches whole `/`-separated segments of the normalized name, so `myregistry.io`
    matches `myregistry.io/a/b:1` but neither `myregistry.io.evil.com/x` nor
    `myregistry.iox/x`, and `docker.io/library` does not match `docker.io/library2/x`.
    A pattern naming a full repository matches it with any tag or digest (and the
    repositories nested under it).

    - `*` is a whole segment and matches exactly one: `ghcr.io/acme/*/tools` matches
      `ghcr.io/acme/team/tools/x`, not `ghcr.io/acme/tools/x`.
    - The registry is compared case-insensitively. With a port (`reg.io:5000`) only that
      port matches; without one (`reg.io`) the host matches on any port, because
      `reg.io:443/x` is pulled from the same server and must not slip past a deny. For
      the same reason `reg.io:443` also matches `reg.io/x`, named without a port.
    - The first segment is a registry when it contains `.` or `:`, is `localhost`, or is
      not lowercase, as for images; `index.docker.io` means `docker.io`, in images too,
      whatever its case or port (`INDEX.DOCKER.IO:443/x` is not normalized to
      `docker.io`, as the runtime would not, yet names the same registry). An explicit
      registry's path is taken literally: `docker.io/library` is the official images'
      namespace, `docker.io/bitnami` the bitnami namespace.
    - A pattern that does not start with a registry is normalized like an image name:
      `library/nginx` and `nginx` both mean `docker.io/library/nginx`, `bitnami/redis`
      means `docker.io/bitnami/redis`, and `*` alone means every official image.
    - Tags and digests are not allowed in patterns.

    Deny wins over allow; an empty allow list allows everything. An invalid pattern
    raises `ValueError` naming it when the filter is built.
    """

    def __init__(self, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> None:
        for name, value in (("allow", allow), ("deny", deny)):
            # A bare string is a sequence too; taking each character as a pattern would
            # silently build a very different filter.
            if isinstance(value, str):
                raise TypeError(f"{name} must be a sequence of patterns, not a string")
        self.allow: tuple[str, ...] = tuple(allow)
        self.deny: tuple[str, ...] = tuple(deny)
        self._allow = tuple(_compile_pattern(text) for text in self.allow)
        self._deny = tuple(_compile_pattern(text) for text in self.deny)

    def check(self, ref: Reference) -> str | None:
        """None if the image may be learned, otherwise the reason it may not."""
        for pattern in self._deny:
            if pattern.matches(ref):
                return f"denied by pattern '{pattern.text}'"
        if self._allow and not any(pattern.matches(ref) for pattern in self._allow):
            return "not in allow list"
        return None

    def __bool__(self) -> bool:
        """False for a filter that lets everything through (callers skip it)."""
        return bool(self._allow or self._deny)

    def __repr__(self) -> str:
        return f"ImageFilter(allow={list(self.allow)!r}, deny={list(self.deny)!r})"


def _compile_pattern(text: str) -> _Pattern:
    def invalid(why: str) -> ValueError:
        return ValueError(f"invalid image pattern {text!r}: {why}")

    if not isinstance(text, str) or not text:
        raise invalid("empty pattern")
    if text != text.strip():
        raise invalid("leading or trailing whitespace")

    first, slash, rest = text.partition("/")
    if (
        first == LOCALHOST
        or "." in first
        or ":" in first
        or first.lower() != first
    ):
        domain = DEFAULT_DOMAIN if first == LEGACY_DEFAULT_DOMAIN else first
        segments = rest.split("/") if slash else []
    else:
        domain = DEFAULT_DOMAIN
        segments = text.split("/")
        if len(segments) == 1:
            segments.insert(0, OFFICIAL_REPO_PREFIX.rstrip("/"))

    if not _DOMAIN_AND_PORT_RE.fullmatch(domain):
        raise invalid(f"{domain!r} is not a registry host[:port]")
    for segment in segments:
        if segment != "*" and not _PATH_COMPONENT_RE.fullmatch(segment):
            raise invalid(
                f"{segment!r} is not a repository path segment "
                "(lowercase letters, digits and separators, or * alone)"
            )
    host, port = _split_host_port(domain)
    return _Pattern(text=text, host=_canonical_host(host), port=port, segments=tuple(segments))


def _canonical_host(host: str) -> str:
    """The host as patterns compare it: host names are case-insensitive, Docker Hub's
    legacy name is Docker Hub, and an IPv6 address is one address however it is written
    (`[0:0::1]`, `[::0001]` and `[::1]` are one registry; `[::ffff:a00:1]` is 10.0.0.1),
    in any spelling the grammar leaves as it is."""
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:  # the grammar's IPv6 is looser than an address: compared as text
            return host
        # an IPv4-mapped address is reached over IPv4: the IPv4 address it maps
        return str(address.ipv4_mapped) if address.ipv4_mapped else f"[{address.compressed}]"
    return DEFAULT_DOMAIN if host == LEGACY_DEFAULT_DOMAIN else host


def _split_host_port(domain: str) -> tuple[str, int | None]:
    # Ports compare as numbers so `reg.io:05000` cannot dodge a deny on `reg.io:5000`.
    if domain.startswith("["):
        end = domain.index("]") + 1
        host, port = domain[:end], domain[end + 1 :]
    else:
        host, _, port = domain.partition(":")
    return host, int(port) if port else None
