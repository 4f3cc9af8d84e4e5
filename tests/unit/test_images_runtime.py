"""webhook/images.py against the runtime's own parser.

hack/refcheck is github.com/distribution/reference (`ParseNormalizedNamed`, then
`TagNameOnly`), at the version k8s.io/kubernetes requires: the parser the kubelet,
containerd and CRI-O resolve image names with. Every reference here, from the tables of
test_images.py and from a seeded generator of near-misses, must be accepted by both with
the same normalized string, or rejected by both; except the differences webhook/images.py
documents as deliberate (`deliberately_rejected`).
"""

from __future__ import annotations

import json
import random
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from hack.controlplane import find_binary
from tests.unit.test_images import INVALID, VALID
from webhook import images

HEX = "0123456789abcdef"


@pytest.fixture(scope="module")
def refcheck() -> Path:
    return find_binary("refcheck")


def resolve_upstream(binary: Path, references: list[str]) -> list[str | None]:
    """The runtime's normalized form of each reference, or None where it refuses it."""
    lines = "".join(json.dumps(ref) + "\n" for ref in references)
    out = subprocess.run([str(binary)], input=lines, capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    assert len(out) == len(references), "refcheck answered a different number of lines"
    return [json.loads(line).get("normalized") for line in out]


def resolve_ours(reference: str) -> str | None:
    try:
        return images.normalize(reference)
    except images.InvalidReference:
        return None


def deliberately_rejected(reference: str) -> bool:
    """References upstream accepts and we reject on purpose (webhook/images.py's
    docstring): an image ID, which `sha256:<hex>` reads as a `library/sha256` tag, and
    a reference too long for anything pullable."""
    return images._is_digest(reference) or len(reference) > images.MAX_REFERENCE_LENGTH


def hex_string(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(HEX, k=length))


# (pieces the grammar takes, pieces it refuses or treats apart): a composed reference
# takes each piece from the second list now and then, so both answers are common
DOMAINS = (["", "", "localhost", "localhost:5000", "docker.io", "index.docker.io",
            "example.com", "Example.COM", "reg.example.com:443", "reg-1.example.com",
            "1.2.3.4", "1.2.3.4:5000", "[::1]", "[::1]:5000", "[2001:db8::1]:443",
            "xn--bcher-kva.example", "a", "sha256", "library", "Docker.IO", "UPPER"],
           ["-reg.com", "reg-.com", "reg..com", "[fe80::1%eth0]:5000", "[::1", "foo_bar.com",
            "foo:bar", "foo:", ":5000", "registry:5000abc", "reg.io:0", "LOCALHOST"])
COMPONENTS = (["nginx", "library", "a", "a.b", "a_b", "a__b", "a-b", "a--b", "a---b", "1",
               "a1b2", "sha256", "x" * 250],
              ["a..b", "a___b", "a-", "-a", ".a", "a.", "_a", "A", "Nginx", "\u00fcml", "a b",
               "", "a.-b", "a_.b"])
TAGS = ([None, None, "latest", "1.25", "v1.0.0-rc.1", "_x", "X", "t" * 128, "1"],
        [".x", "-x", "t" * 129, "", "a:b", "a b", "\u00e9"])


# digests as (algorithm, hex length, upper case), or a literal; hex drawn when picked
DIGESTS = ([None, None, None, ("sha256", 64, False), ("sha512", 128, False),
            ("sha384", 96, False)],
           [("sha256", 64, True), ("sha256", 63, False), ("sha256", 65, False),
            ("md5", 32, False), ("sha256+b64u", 64, False), ("SHA256", 64, False),
            "sha256:" + "g" * 64, "", "sha256:", ("sha512", 64, False)])


def digest(rng: random.Random) -> str | None:
    chosen = pick(rng, DIGESTS)
    if chosen is None or isinstance(chosen, str):
        return chosen
    algorithm, length, upper = chosen
    encoded = hex_string(rng, length)
    return f"{algorithm}:{encoded.upper() if upper else encoded}"


def pick(rng: random.Random, pieces: tuple[list, list]):
    good, bad = pieces
    return rng.choice(bad if rng.random() < 0.1 else good)


def compose(rng: random.Random) -> str:
    domain = pick(rng, DOMAINS)
    path = "/".join(pick(rng, COMPONENTS) for _ in range(rng.choice((1, 1, 2, 2, 3))))
    reference = f"{domain}/{path}" if domain else path
    tag = pick(rng, TAGS)
    if tag is not None:
        reference += f":{tag}"
    digested = digest(rng)
    if digested is not None:
        reference += f"@{digested}"
    return reference


MUTATION_ALPHABET = "aA0.-_:/@[]%+ \t"


def mutate(rng: random.Random, reference: str) -> str:
    """One to three random edits: insert, delete or replace a character."""
    chars = list(reference)
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(0, len(chars))
        edit = rng.choice(("insert", "delete", "replace"))
        if edit == "insert" or not chars:
            chars.insert(at, rng.choice(MUTATION_ALPHABET))
        elif at < len(chars):
            if edit == "delete":
                del chars[at]
            else:
                chars[at] = rng.choice(MUTATION_ALPHABET)
    return "".join(chars)


@lru_cache(maxsize=1)
def generated(count: int = 20000, seed: int = 20261122) -> tuple[str, ...]:
    rng = random.Random(seed)
    references: dict[str, None] = {}
    while len(references) < count:
        reference = compose(rng)
        references[reference] = None
        references[mutate(rng, reference)] = None
    return tuple(references)


def disagreements(binary: Path, references: list[str]) -> list[tuple[str, str | None, str | None]]:
    upstream = resolve_upstream(binary, references)
    found = []
    for reference, theirs in zip(references, upstream):
        ours = resolve_ours(reference)
        if ours == theirs or (ours is None and deliberately_rejected(reference)):
            continue
        found.append((reference, theirs, ours))
    return found


def test_the_tables_agree_with_the_runtime(refcheck: Path) -> None:
    table = [param.values[0] for param in VALID + INVALID]
    assert len(table) > 100
    assert disagreements(refcheck, table) == []


def test_generated_references_agree_with_the_runtime(refcheck: Path) -> None:
    references = list(generated())
    upstream = resolve_upstream(refcheck, references)
    accepted = sum(theirs is not None for theirs in upstream)
    # the generator must reach both sides of the grammar, or the comparison says little
    assert accepted > len(references) // 10
    assert len(references) - accepted > len(references) // 10
    assert disagreements(refcheck, references)[:20] == []


def test_the_oracle_is_the_runtime_parser(refcheck: Path) -> None:
    # refcheck itself: upstream's Docker Hub defaults and its refusal of upper case,
    # so an agreement above cannot come from an oracle that accepts everything
    assert resolve_upstream(refcheck, ["nginx", "Nginx", f"x@sha256:{'a' * 64}"]) == [
        "docker.io/library/nginx:latest", None, f"docker.io/library/x@sha256:{'a' * 64}"]


def test_deliberate_differences_are_the_documented_ones(refcheck: Path) -> None:
    # upstream reads an image ID as a tag of `library/sha256`; we refuse to record it
    image_id = f"sha256:{'a' * 64}"
    assert resolve_upstream(refcheck, [image_id]) == [f"docker.io/library/sha256:{'a' * 64}"]
    assert resolve_ours(image_id) is None


def test_a_fresh_cache_builds_the_oracle_alone(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # `make test-unit` on a fresh machine: refcheck is built, and not the control plane
    monkeypatch.setenv("PREWARM_CACHE_DIR", str(tmp_path))
    built = find_binary("refcheck")
    assert built.is_relative_to(tmp_path)
    assert resolve_upstream(built, ["nginx"]) == ["docker.io/library/nginx:latest"]
    tools = sorted(entry.name for entry in tmp_path.iterdir() if entry.name not in ("src", "logs"))
    assert tools == [built.parents[1].name]
    assert tools[0].startswith("refcheck-")
