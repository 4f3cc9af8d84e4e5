"""The static no-op helper (hack/noop/noop.c) that every pre-pull initContainer runs.

It runs inside arbitrary images (scratch, distroless) with no shell, no libc and no
dynamic loader, so it must be a static executable that ignores its arguments and exits 0.
"""

from __future__ import annotations

import random
import shutil
import string
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "hack" / "noop" / "noop.c"
PT_INTERP = 3


def program_header_types(path: Path) -> list[int]:
    """p_type of every ELF program header (ELF32/ELF64, either byte order)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", "not an ELF file"
    is_64 = {1: False, 2: True}[data[4]]
    order = {1: "<", 2: ">"}[data[5]]
    if is_64:
        phoff, = struct.unpack_from(order + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
    else:
        phoff, = struct.unpack_from(order + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x2A)
    assert phnum > 0, "no program headers: not an executable"
    return [struct.unpack_from(order + "I", data, phoff + n * phentsize)[0]
            for n in range(phnum)]


@pytest.fixture(scope="module")
def noop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build hack/noop/noop.c (the Dockerfile's noop stage uses it)"
    out = tmp_path_factory.mktemp("noop") / "prewarm-noop"
    subprocess.run([gcc, "-static", "-Os", "-s", "-o", str(out), str(SOURCE)],
                   check=True, capture_output=True, text=True)
    return out


def test_is_static_no_dynamic_loader(noop: Path) -> None:
    # No PT_INTERP segment: the kernel runs it without /lib/ld-linux*, which scratch
    # and distroless-static images do not have.
    assert PT_INTERP not in program_header_types(noop)


@pytest.mark.parametrize("args", [
    [],
    ["--help"],
    ["pull", "docker.io/library/nginx:latest"],
    ["".join(random.Random(index).choices(string.printable.strip(), k=40))
     for index in range(8)],
])
def test_exits_zero_whatever_the_arguments(noop: Path, args: list[str]) -> None:
    result = subprocess.run([str(noop), *args], capture_output=True, timeout=10)
    assert result.returncode == 0
    assert result.stdout == b"" and result.stderr == b""


def test_runs_with_an_empty_environment(noop: Path) -> None:
    # A pull container's environment is whatever the image declares; often nothing.
    result = subprocess.run([str(noop)], env={}, cwd="/", capture_output=True, timeout=10)
    assert result.returncode == 0


def test_is_small(noop: Path) -> None:
    # Copied into an emptyDir of every pre-pull pod on every node.
    assert noop.stat().st_size < 1024 * 1024
