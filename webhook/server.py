"""gunicorn serving the observer over TLS.

gthread workers keep connections alive: the API server reuses its TLS connections to a
webhook, and a server that closes each one forces a handshake per review (measured on
this design's 2-core reference machine: sync workers ~120 reviews/s, gthread ~1,700).

Certificates: gunicorn's gthread worker asks the `ssl_context` hook for a context on
every new connection. We hand out one cached context and rebuild it when the files'
*contents* change, checked at most once a second. Contents, not mtimes: a mounted Secret
is updated by swapping a symlink, which does not touch the files' metadata the way a
plain write does. A half-rotated pair (new cert, old key) fails to load; we keep serving
the previous context until both files agree, so no handshake fails during a rotation.

One write per response: gunicorn writes a response's headers and its body with two
calls, so each review went out as two TLS records, two TCP segments and two wake-ups
of the API server's reading goroutine. ObserverWorker (gthread's ThreadWorker) gathers
a response's writes and sends them at once. Measured here (8 connections, runs in ABBA
order): the stdlib floor server of `make bench` answers 4,726 reviews/s with one write
and 3,882 with the write split in two; the bare flask handler under gunicorn, 1,049
with this worker against 1,004 with plain gthread (its own overhead dominates there).

A thread stays with a busy connection: gthread hands every request from its event loop
to a pool thread, so each review waits for two wake-ups, and a third brings the
connection back to the loop. After answering on a kept-alive connection, an
ObserverWorker thread waits up to LINGER seconds for that connection's next request and
serves it itself: one wake-up, straight from the kernel. The API server reuses its most
recently used connection first, so at a steady rate nearly every review finds its thread
waiting. At most threads - 1 threads wait at a time, one waiting is woken up as soon as
a request on another connection would have to queue for a thread, and all of them on
shutdown: waiting never delays anyone else's review. Measured here (16 paired rounds of
10 s at 200 reviews/s, Poisson arrivals, order alternating): median p50 2.42 -> 1.90 ms,
median of the rounds' p99 15.8 -> 9.9 ms, p99 lower in 11 of the 16 rounds.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import select
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from gunicorn.app.base import BaseApplication
from gunicorn.workers import gthread
from gunicorn.workers.gthread import ThreadWorker

from webhook import listen
from webhook.settings import Settings

logger = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0
SWITCH_INTERVAL = 0.0005


class CertificateError(RuntimeError):
    pass


class CertReloader:
    """An SSLContext for a cert/key pair, rebuilt when the files change."""

    def __init__(self, cert_file: str, key_file: str,
                 build: Callable[[str, str], ssl.SSLContext] | None = None):
        self.cert_file, self.key_file = cert_file, key_file
        self._build = build or self.default_context
        self._lock = threading.Lock()
        self._digest = b""
        self._context: ssl.SSLContext | None = None
        self._checked = 0.0
        self.reloads = 0
        # notAfter (Unix seconds) of the certificate new handshakes get; None if the
        # loaded file's first certificate could not be read (the context still serves)
        self.not_after: float | None = None
        self.context()  # fail at start-up, with a clear message, if the pair is unusable

    @staticmethod
    def default_context(cert_file: str, key_file: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        return context

    def after_fork(self) -> None:
        """In a new worker: a lock of its own (one held in the master at the fork would
        never be released), and the files checked at its first handshake."""
        self._lock = threading.Lock()
        self._checked = 0.0

    def _read(self) -> tuple[bytes, bytes]:
        """The certificate file's contents, and the digest of both files'."""
        digest = hashlib.sha256()
        contents = []
        for path in (self.cert_file, self.key_file):
            with open(path, "rb") as handle:
                contents.append(handle.read())
            digest.update(contents[-1])
        return contents[0], digest.digest()

    def expiry(self) -> float | None:
        """notAfter of the certificate served to new connections, after a look at the
        files (at most once a second, as for a handshake): for the metric a scrape reads,
        so that it follows a rotation even when no new connection has come in."""
        self.context()
        return self.not_after

    def context(self) -> ssl.SSLContext:
        now = time.monotonic()
        if self._context is not None and now - self._checked < CHECK_INTERVAL:
            return self._context
        with self._lock:
            if self._context is not None and now - self._checked < CHECK_INTERVAL:
                return self._context
            self._checked = now
            try:
                cert_pem, digest = self._read()
                if digest != self._digest:
                    context = self._build(self.cert_file, self.key_file)
                    if self._context is not None:
                        self.reloads += 1
                        logger.info("serving certificate reloaded from %s", self.cert_file)
                    self._context, self._digest = context, digest
                    self.not_after = _not_after(cert_pem, self.cert_file)
            except (OSError, ssl.SSLError, ValueError) as error:
                if self._context is None:
                    raise CertificateError(
                        f"cannot load TLS pair {self.cert_file} / {self.key_file}: "
                        f"{error}") from error
                # mid-rotation (cert and key from different generations) or a transient
                # read error: keep serving with the previous pair and look again soon
                logger.warning("keeping previous certificate: %s", error)
            return self._context


def _not_after(cert_pem: bytes, path: str) -> float | None:
    """notAfter, in Unix seconds, of the first certificate in `cert_pem` (the leaf: a
    chain follows it); None, logged, if it cannot be read (ssl took the file anyway)."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(cert_pem)[0].not_valid_after_utc.timestamp()
    except ValueError as error:
        logger.warning("cannot read the expiry of %s: %s", path, error)
        return None


def freeze_startup_heap() -> int:
    """Moves everything alive after start-up (flask, the kubernetes client's modules and
    models: ~55,000 objects) out of the garbage collector's reach, and returns how many.

    A full collection scans every tracked object while holding the GIL: measured here,
    ~30 ms for an observer worker's heap, a pause every review in flight waits through.
    Those objects live as long as the process anyway; after the freeze a full collection
    scans only what was allocated since (`make bench` prints both figures). Garbage is
    collected first, so none of it is kept."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class _GatheredWrites:
    """A connection's socket as a response sees it: `sendall` gathers, `flush` sends
    what was gathered in one call. Everything else (`send` for `100 Continue`, reads,
    `fileno`) is the socket's own. A response past FLUSH_AT bytes is sent as it goes."""

    FLUSH_AT = 64 * 1024

    def __init__(self, sock):
        self._sock = sock
        self._parts: list[bytes] = []
        self._size = 0

    def sendall(self, data) -> None:
        self._parts.append(bytes(data))
        self._size += len(data)
        if self._size >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            self._parts, self._size = [], 0
            self._sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class ObserverWorker(ThreadWorker):
    """gthread, with each response sent in one write, and a thread that waits a moment
    for its connection's next request (see the module's docstring).

    Stalled clients: gthread reads a request (and does the TLS handshake) on a pool
    thread from a socket without a timeout, so a client that stops halfway (a few bytes
    of handshake, unfinished headers, a short body; or a connection a partition left
    half-open) held a thread for ever, and `threads` of them stopped the worker. Here a
    thread reading from a connection for longer than READ_TIMEOUT has the connection
    shut under it (from the event loop's thread), which ends its read. A connection that
    sends nothing waits FIRST_BYTES_WAIT on a thread (not gthread's 5 s), then in the
    event loop for at most PENDING_TIMEOUT (not the whole keep-alive), and not at all
    once the worker stops, so that it cannot eat the shutdown's grace period."""

    LINGER = 1.0  # seconds; well under the keep-alive, far over 200/s's gaps
    # The API server gives a webhook timeoutSeconds (at most 30, the chart's 2) for the
    # whole call: a request that took longer to arrive is not awaited by anyone.
    READ_TIMEOUT = 5.0
    FIRST_BYTES_WAIT = 1.0
    PENDING_TIMEOUT = 10.0

    def init_process(self):
        # before super(): it ends by running the worker's loop
        self._linger_lock = threading.Lock()
        self._tasks = 0  # connections handed to the pool and not given back, queued or not
        self._lingering = 0  # pool threads waiting for their connection's next request
        self._reading: dict[int, tuple[float, Any]] = {}  # id(conn) -> (deadline, conn)
        self._nudge_r, self._nudge_w = os.pipe()  # one byte releases one waiting thread
        os.set_blocking(self._nudge_r, False)
        os.set_blocking(self._nudge_w, False)
        super().init_process()

    def _nudge(self, count: int) -> None:
        try:
            os.write(self._nudge_w, b"\0" * count)
        except OSError:
            pass  # pipe full: bytes enough are waiting already

    def enqueue_req(self, conn):
        with self._linger_lock:
            self._tasks += 1
            # more connections than threads: this one would queue behind waiting threads
            release = self._tasks > self.cfg.threads and self._lingering > 0
        if release:
            self._nudge(1)
        super().enqueue_req(conn)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        self._nudge(self.cfg.threads)

    def handle(self, conn):
        try:
            if not conn.initialized and not conn.data_ready and \
                    not conn.wait_for_data(self.FIRST_BYTES_WAIT):
                return gthread._DEFER  # to the event loop, as gthread does after 5 s
            keep = self._handle_in_time(conn)
            while keep is True and self._next_request_came(conn):
                keep = self._handle_in_time(conn)
            return keep
        finally:
            with self._linger_lock:
                self._tasks -= 1

    def _handle_in_time(self, conn):
        """One request on `conn`, read within READ_TIMEOUT (see _cut_stalled)."""
        with self._linger_lock:
            self._reading[id(conn)] = (time.monotonic() + self.READ_TIMEOUT, conn)
        try:
            return super().handle(conn)
        finally:
            with self._linger_lock:
                self._reading.pop(id(conn), None)

    def finish_request(self, conn, fs):
        # gthread closes the socket itself on a TLS end-of-file (a connection cut above,
        # a client that hangs up mid-handshake), returns False, and finish_request then
        # fails to close it again and counts the connection as gone twice: nr_conns
        # drifts below the truth, and a stopping worker, which waits while it is above
        # 0, stops waiting for connections still open.
        if (not fs.cancelled() and fs.exception() is None and fs.result() is False
                and conn.sock.fileno() == -1):
            self.nr_conns -= 1
            return
        super().finish_request(conn, fs)

    def murder_keepalived(self, force=False):
        # runs on every turn of the event loop (about once a second), and while stopping
        super().murder_keepalived(force)
        self._cut_stalled()

    def murder_pending(self):
        limit = time.monotonic() + (self.PENDING_TIMEOUT if self.alive else 0.0)
        for conn in self.pending_conns:  # the same cap for all keeps the deque in order
            conn.timeout = min(conn.timeout, limit)
        super().murder_pending()

    def _cut_stalled(self) -> None:
        now = time.monotonic()
        with self._linger_lock:
            stalled = [conn for deadline, conn in self._reading.values() if deadline <= now]
            for conn in stalled:
                self._reading.pop(id(conn), None)
        for conn in stalled:
            sock = conn.sock
            if isinstance(sock, _GatheredWrites):  # stalled in the app, reading the body
                sock = sock._sock
            try:
                # the plain socket's shutdown, also under TLS: SSLSocket.shutdown would
                # drop its SSL object under the thread still reading from it
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except (OSError, TypeError):
                pass  # closed meanwhile; the event loop must go on whatever happens
        if stalled:
            logger.info("closed %d connections that sent no complete request in %.0fs "
                        "(first: %s)", len(stalled), self.READ_TIMEOUT, stalled[0].client)

    def _next_request_came(self, conn) -> bool:
        """Waits up to LINGER for `conn` to be readable, if a thread may wait now: True
        if it is (this thread serves it), False to give the connection back to the
        event loop."""
        pending = getattr(conn.sock, "pending", None)  # decrypted, not yet read
        if conn.parser.unreader.buf.getvalue() or (pending is not None and pending()):
            return True
        with self._linger_lock:
            if (not self.alive or self._lingering >= self.cfg.threads - 1
                    or self._tasks > self.cfg.threads):
                return False
            self._lingering += 1
        try:
            poller = select.poll()
            poller.register(conn.sock.fileno(), select.POLLIN)
            poller.register(self._nudge_r, select.POLLIN)
            deadline = time.monotonic() + self.LINGER
            while self.alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                ready = {fd for fd, _ in poller.poll(left * 1000)}
                if conn.sock.fileno() in ready:
                    return True
                if self._nudge_r in ready:
                    try:
                        if os.read(self._nudge_r, 1):
                            return False  # a connection needs this thread
                    except BlockingIOError:
                        pass  # another waiting thread took that byte
            return False
        except (OSError, ValueError):  # the socket is gone: the event loop sees to it
            return False
        finally:
            with self._linger_lock:
                self._lingering -= 1

    def handle_request(self, req, conn):
        sock = conn.sock
        gathered = conn.sock = _GatheredWrites(sock)
        failed = True
        try:
            result = super().handle_request(req, conn)
            failed = False
            return result
        finally:
            conn.sock = sock
            try:
                gathered.flush()
            except OSError:
                if not failed:
                    raise
                # the request already failed (gunicorn handles that next): its error,
                # not the flush's, is the one to report


class ObserverServer(BaseApplication):
    """gunicorn configured from Settings; the flask app is built in each worker."""

    def __init__(self, settings: Settings, *, app_factory: Callable[[Settings], Any] | None = None,
                 extra: dict[str, Any] | None = None, reloader: CertReloader | None = None):
        self.settings = settings
        self.app_factory = app_factory
        self.extra = extra or {}
        # Built here, in the master, and inherited by every worker through the fork: a
        # worker started while the files hold a bad pair (a restart mid-rotation, a key
        # gone wrong) serves with the pair loaded at start-up (the master serves nothing
        # and never reloads) instead of refusing every handshake. Each worker then
        # reloads on its own as the files change.
        self.reloader = reloader or CertReloader(settings.tls_cert_file, settings.tls_key_file)
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        reloader = self.reloader

        def ssl_context(conf, _default_factory):
            return reloader.context()

        def post_fork(_server, _worker) -> None:
            reloader.after_fork()
            # Files the kubernetes client cached before the fork (a kubeconfig's embedded
            # certificates) are deleted by whichever process exits first: each worker
            # makes its own (see kube.check_config).
            from kubernetes.config import kube_config

            kube_config._temp_files = {}

        def post_worker_init(worker) -> None:
            # gthread hands each request from the accepting loop to a pool thread; with
            # CPython's default 5 ms GIL switch interval that handoff alone can add
            # milliseconds to a review. The observer's work per review is tens of
            # microseconds, so a shorter interval costs little and cuts the tail.
            sys.setswitchinterval(SWITCH_INTERVAL)
            # imported here, in the worker: in the master, the metrics module's
            # counters would open multiprocess files for a process that never counts
            from webhook import metrics

            metrics.report_certificate_expiry(reloader.expiry)
            freeze_startup_heap()
            state = worker.wsgi.extensions.get("prewarm") if hasattr(worker.wsgi, "extensions") else None
            if state is not None:
                state.flusher.start()

        def worker_exit(_server, worker) -> None:
            # a rolling restart must not lose what this worker buffered
            app = getattr(worker, "wsgi", None)
            state = app.extensions.get("prewarm") if hasattr(app, "extensions") else None
            if state is not None:
                state.flusher.stop()

        def child_exit(_server, worker) -> None:
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(worker.pid)

        options = {
            "bind": [listen.bind_string(s.bind_address, s.port)],
            "workers": s.workers,
            "worker_class": ObserverWorker,
            "sendfile": False,  # never used over TLS; and it would bypass the gathered writes
            "threads": s.threads,
            "keepalive": s.keepalive,
            "certfile": s.tls_cert_file,
            "keyfile": s.tls_key_file,
            "ssl_context": ssl_context,
            "post_fork": post_fork,
            "post_worker_init": post_worker_init,
            "worker_exit": worker_exit,
            "child_exit": child_exit,
            "timeout": 30,
            "graceful_timeout": 20,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": s.log_level.lower(),
            "worker_tmp_dir": tempfile.gettempdir(),
            "proc_name": "prewarm-observer",
            # gunicorn's control socket lives at a fixed path under $HOME: two observers on
            # one machine would share it, and a read-only root filesystem refuses it.
            "control_socket_disable": True,
        }
        options.update(self.extra)
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        if self.app_factory is not None:
            return self.app_factory(self.settings)
        from webhook.app import create_app

        return create_app(self.settings)


def prepare_metrics_dir() -> tuple[str, bool]:
    """A clean multiprocess directory for prometheus_client, shared by the workers;
    returns it and whether we created it (and so remove it on exit)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):  # stale values of a previous run would add up
                os.unlink(os.path.join(path, name))
        return path, False
    path = tempfile.mkdtemp(prefix="prewarm-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path, True


def serve(settings: Settings, *, app_factory=None, extra: dict[str, Any] | None = None) -> None:
    if not settings.tls_cert_file or not settings.tls_key_file:
        raise CertificateError("serve needs --tls-cert-file and --tls-key-file (or "
                               "PREWARM_TLS_CERT_FILE / PREWARM_TLS_KEY_FILE): the API server "
                               "only calls webhooks over HTTPS")
    reloader = CertReloader(settings.tls_cert_file, settings.tls_key_file)  # fails clearly
    metrics_dir, created = prepare_metrics_dir()
    master = os.getpid()
    logger.info("observer listening on https://%s (%d workers x %d threads)",
                listen.bind_string(settings.bind_address, settings.port), settings.workers,
                settings.threads)
    try:
        ObserverServer(settings, app_factory=app_factory, extra=extra,
                       reloader=reloader).run()
    finally:
        # Workers are forked inside run() and leave it by SystemExit, through this
        # block: only the master, which made the directory, may remove it (a worker
        # that did would take the live workers' files and fail its replacement's boot).
        if created and os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)
