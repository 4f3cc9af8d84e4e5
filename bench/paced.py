"""An open-loop load generator: reviews arriving at random at a given mean rate.

Why not `hey -q`: hey paces each of its workers with its own ticker, all started at the
same instant, so `-c 4 -q 50` sends four requests at once every 20 ms. That measures a
burst of four, not a rate of 200/s. The API server calls a webhook when objects are
created, by independent clients; the textbook model of such arrivals is a Poisson
process. Here arrivals are exponentially spaced, each is sent on an idle keep-alive
connection (`connections` of them, opened before the clock starts as the API server's
are in steady state; one that breaks or is closed is replaced), and its latency is
counted from the moment the generator got to it: a request that waits for a connection
because the server is slow is counted as slow (no coordinated omission).

The client is Python (asyncio, one thread, its own process), so its own parsing is
included in every figure: the server's share is somewhat smaller than reported.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from typing import Sequence


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """Sends a request, reads the answer; returns its status and whether the
        connection can carry another request."""
        self.writer.write(request)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("connection closed before an answer")
        length, keep = 0, True
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep = False
        if length:
            await self.reader.readexactly(length)
        parts = status_line.split()
        return (int(parts[1]) if len(parts) > 1 else 0), keep

    @classmethod
    async def open(cls, host: str, port: int, context: ssl.SSLContext) -> "_Connection":
        reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                       server_hostname=host)
        return cls(reader, writer)


async def _run(host: str, port: int, path: str, bodies: Sequence[bytes],
               context: ssl.SSLContext, *, rate: float, seconds: float, connections: int,
               seed: int) -> dict:
    requests = [(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                 f"\r\n").encode() + body for body in bodies]
    idle: list[_Connection] = []
    opened = 0
    free = asyncio.Condition()
    latencies: list[float] = []
    errors = 0

    async def one(due: float, request: bytes) -> None:
        nonlocal opened, errors
        # counted from when the generator got to it: its own timer lateness (asyncio
        # sleeps in whole milliseconds) is not the server's, a wait for a connection is
        begin = max(due, time.perf_counter())
        async with free:
            while not idle and opened >= connections:
                await free.wait()
            conn = idle.pop() if idle else None
            if conn is None:
                opened += 1
        try:
            if conn is None:
                conn = await _Connection.open(host, port, context)
            status, keep = await conn.exchange(request)
            latencies.append(time.perf_counter() - begin)
            if status != 200:
                errors += 1
            if not keep:
                conn.writer.close()
                conn = None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            conn = None
        async with free:
            if conn is None:
                opened -= 1
            else:
                idle.append(conn)
            free.notify()

    # the API server's connections are open before a burst of pods, each having carried
    # a review already (Go's client writes its request as soon as it has dialled; a
    # connection idle after its handshake is one the server may close, see
    # ObserverWorker.READ_TIMEOUT): so are ours (a server that refuses them shows as
    # errors below, one per arrival)
    for _ in range(connections):
        try:
            conn = await _Connection.open(host, port, context)
            _status, keep = await conn.exchange(requests[0])
        except (OSError, asyncio.IncompleteReadError, ValueError):
            break
        if not keep:  # a server that closes each connection: opened on demand, then
            conn.writer.close()
            continue
        idle.append(conn)
        opened += 1
    rng = random.Random(seed)
    tasks = []
    start = time.perf_counter()
    due = start
    end = start + seconds
    while True:
        due += rng.expovariate(rate)
        if due >= end:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due, requests[len(tasks) % len(requests)])))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.writer.close()
    return {"count": len(latencies), "errors": errors, "rps": len(tasks) / seconds,
            **percentiles(latencies)}


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds of latencies in seconds (0.0 when there are none)."""
    ordered = sorted(latencies)
    if not ordered:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    return {"p50_ms": 1000 * ordered[len(ordered) // 2],
            "p99_ms": 1000 * ordered[int(len(ordered) * 0.99)]}


def run(host: str, port: int, path: str, body: bytes | Sequence[bytes],
        context: ssl.SSLContext, *, rate: float, seconds: float, connections: int = 8,
        seed: int = 1) -> dict:
    """Poisson arrivals at `rate`/s for `seconds`, each with `body` (or the next of a list
    of bodies, in turn); returns count, errors, rps, p50/p99 (ms)."""
    bodies = [body] if isinstance(body, bytes) else list(body)
    return asyncio.run(_run(host, port, path, bodies, context, rate=rate, seconds=seconds,
                            connections=connections, seed=seed))
