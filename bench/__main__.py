"""`make bench`: figures, each with a baseline measured in the same run.

observer    /observe vs a bare allow-all WSGI handler served by the same gunicorn
            settings (gthread, TLS, keep-alive): reviews/s, p50/p99, server CPU time per
            review and the ratios under 8 connections at full speed (load from hey, the
            two servers back to back in each round; a second pair against the same
            handler with the observer's JSON codec, orjson; and each handler's cost
            called in one process, without a server); p50/p99 at 200 reviews/s arriving
            at random (bench/paced.py), next to the machine's floor (bench/floor.py: a
            thread per connection, standard library only) and the CPU time the VM's host
            took away meanwhile (steal); API writes per 10,000 admissions of already-known
            images.
reconciler  one pass over 5,000 learned images and 20,000 pods: time and peak memory,
            against listing the same pods through the client's model objects.
prepuller   50 fake nodes running 5 shards of 500 images (250 prepuller pods, each with
            an init container per image): peak memory and time of reading them as a
            pass does (summaries, and from the watched cache) against keeping them whole.

    python -m bench [observer|reconciler|prepuller ...] [--seconds N] [--rounds N]
                    [--pods N] [--images N] [--nodes N] [--prepuller-images N]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import paced  # noqa: E402
from certs import tls  # noqa: E402
from hack import controlplane  # noqa: E402
from hack.controlplane import free_port, wait_for  # noqa: E402

KNOWN_IMAGES = [f"registry.example.com/team-{i % 5}/service-{i}:v{i % 3}" for i in range(50)]


def review_body(index: int) -> bytes:
    image = KNOWN_IMAGES[index % len(KNOWN_IMAGES)]
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": f"bench-{index}", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": f"team-{index % 5}", "operation": "CREATE",
                    "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                    "object": {"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"generateName": "svc-", "namespace": f"team-{index % 5}",
                                            "labels": {"app": "svc"}},
                               "spec": {"containers": [
                                   {"name": "app", "image": image,
                                    "resources": {"requests": {"cpu": "100m"}}},
                                   {"name": "proxy", "image": "docker.io/envoyproxy/envoy:v1.31.0"}],
                                   "initContainers": [{"name": "init", "image": "busybox:1.36"}]}},
                    "dryRun": False}}).encode()


# -- servers -------------------------------------------------------------------------

def _allow_all(loads, dumps):
    def app(environ, start_response):
        if environ["PATH_INFO"] == "/observe":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            uid = loads(environ["wsgi.input"].read(length))["request"]["uid"]
            document = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                        "response": {"uid": uid, "allowed": True}}
        else:
            document = {"status": "ok"}
        body = dumps(document)
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return app


def baseline_app(_settings):
    """What the observer is compared with: an allow-all handler that parses the review
    and echoes the uid, and nothing else, with the standard library's json. Plain WSGI,
    as the observer's admission endpoints are (webhook/app.py says why)."""
    return _allow_all(json.loads, lambda doc: json.dumps(doc, separators=(",", ":")).encode())


def baseline_orjson_app(_settings):
    """The same allow-all handler with the observer's JSON codec (orjson): printed next
    to the baseline, so that the part of the ratio that is the codec shows."""
    import orjson

    return _allow_all(orjson.loads, orjson.dumps)


SERVER_SCRIPT = """
import sys
from webhook import settings as s
from webhook.logs import setup
from webhook.server import serve
config = s.load()
setup(config.log_format, "WARNING")
factory = None
if sys.argv[1] == "baseline":
    from bench.__main__ import baseline_app as factory
if sys.argv[1] == "baseline-orjson":
    from bench.__main__ import baseline_orjson_app as factory
serve(config, app_factory=factory)
"""


class Server:
    def __init__(self, kind: str, workdir: Path, env: dict[str, str]):
        self.port = free_port()
        self.ca = workdir / "ca.crt"
        self.log = open(workdir / f"{kind}.log", "wb")
        full_env = {**os.environ, **env, "PYTHONPATH": str(REPO),
                    "PREWARM_PORT": str(self.port), "PREWARM_BIND_ADDRESS": "127.0.0.1",
                    "PREWARM_TLS_CERT_FILE": str(workdir / "tls.crt"),
                    "PREWARM_TLS_KEY_FILE": str(workdir / "tls.key")}
        if kind == "floor":
            argv = [sys.executable, "-m", "bench.floor", "--port", str(self.port),
                    "--cert", str(workdir / "tls.crt"), "--key", str(workdir / "tls.key")]
        else:
            argv = [sys.executable, "-c", SERVER_SCRIPT, kind]
        self.process = subprocess.Popen(argv, env=full_env,
                                        stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                        start_new_session=True)
        wait_for(f"{kind} server", lambda: self.get("/healthz") == 200, timeout=30)

    def context(self):
        return ssl.create_default_context(cafile=str(self.ca))

    def get(self, path: str) -> int:
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context(),
                                               timeout=5)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            return status
        except OSError:
            return 0

    def metric(self, name: str) -> float:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context(), timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def cpu_seconds(self) -> float:
        """CPU time used so far by the arbiter and its workers (its process group)."""
        return group_cpu_seconds(self.process.pid)  # start_new_session: pgid == pid

    def stop(self):
        import signal

        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(30)
        self.log.close()


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of the live processes in process group `pgid`."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- load ----------------------------------------------------------------------------

def load(server: Server, *, seconds: float, connections: int) -> dict:
    """Drives /observe with hey (Go; keep-alive connections like the API server's) as fast
    as `connections` workers go, for `seconds`. Returns reviews/s, p50/p99 latency (ms),
    the number of non-200 answers (not counted in reviews/s) and the server's CPU time
    per review (us)."""
    from hack.controlplane import find_binary

    body = server.ca.parent / "review.json"
    body.write_bytes(review_body(7))
    argv = [str(find_binary("hey")), "-z", f"{seconds}s", "-c", str(connections), "-m", "POST",
            "-T", "application/json", "-D", str(body), "-o", "csv"]
    cpu_before = server.cpu_seconds()
    out = subprocess.run(argv + [f"https://127.0.0.1:{server.port}/observe"],
                         capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    cpu = server.cpu_seconds() - cpu_before
    rows = [line.split(",") for line in out.splitlines()[1:] if line]
    errors = sum(1 for row in rows if row[6] != "200")
    # answered reviews only: a server failing fast must not read as a fast server
    return {"count": len(rows), "errors": errors, "rps": (len(rows) - errors) / seconds,
            "cpu_us": 1e6 * cpu / max(len(rows), 1),
            **paced.percentiles([float(row[0]) for row in rows])}


PACED_SCRIPT = """
import json, ssl, sys
from bench import paced
from bench.__main__ import review_body
port, cafile, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
bodies, rate = int(sys.argv[5]), float(sys.argv[6])
context = ssl.create_default_context(cafile=cafile)
print(json.dumps(paced.run("127.0.0.1", port, "/observe",
                           [review_body(7)] if bodies == 1 else [review_body(i) for i in range(bodies)],
                           context, rate=rate, seconds=seconds, connections=8,
                           seed=int(sys.argv[4]))))
"""


GC_SCRIPT = """
import gc, json, time
from webhook import settings
from webhook.app import create_app
from webhook.server import freeze_startup_heap
app = create_app(settings.load())  # what each gunicorn worker builds
def full_collection_ms():
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        gc.collect()
        runs.append(1000 * (time.perf_counter() - started))
    return sorted(runs)[2]
before = full_collection_ms()
frozen = freeze_startup_heap()
print(json.dumps({"before_ms": before, "after_ms": full_collection_ms(), "frozen": frozen}))
"""


def observer_child(script: str, env: dict[str, str], *, timeout: float) -> dict:
    """Runs `script`, which builds the observer's app as a worker does, in a process of
    its own with a metrics directory of its own (removed after); returns the JSON it
    prints."""
    with tempfile.TemporaryDirectory(prefix="prewarm-bench-metrics-") as metrics_dir:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True, cwd=REPO, timeout=timeout,
                             env={**os.environ, **env, "PYTHONPATH": str(REPO),
                                  "PROMETHEUS_MULTIPROC_DIR": metrics_dir})
    return json.loads(out.stdout)


def gc_pause(env: dict[str, str]) -> dict:
    """A full garbage collection in an observer worker, before and after the start-up
    heap is frozen (webhook/server.py, freeze_startup_heap): median of 5."""
    return observer_child(GC_SCRIPT, env, timeout=120)


IN_PROCESS_SCRIPT = """
import io, json, statistics, timeit
from webhook import settings
from webhook.app import create_app
from bench.__main__ import baseline_app, baseline_orjson_app, review_body
body = review_body(7)
def environ():
    return {"PATH_INFO": "/observe", "REQUEST_METHOD": "POST", "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": "application/json", "wsgi.input": io.BytesIO(body),
            "wsgi.input_terminated": True}
apps = {"baseline": baseline_app(None), "baseline-orjson": baseline_orjson_app(None),
        "observer": create_app(settings.load()).wsgi_app}
runs = {kind: [] for kind in apps}
for _ in range(9):  # interleaved, as the servers' rounds are
    for kind, app in apps.items():
        runs[kind].append(1e6 * min(timeit.repeat(lambda: app(environ(), lambda *a: None),
                                                  number=5000, repeat=3)) / 5000)
print(json.dumps({kind: statistics.median(times) for kind, times in runs.items()}))
"""


def in_process(env: dict[str, str]) -> dict[str, float]:
    """Microseconds for one /observe review through each WSGI app, called directly: the
    handlers' own cost, without the server, TLS and scheduling that the runs above add."""
    return observer_child(IN_PROCESS_SCRIPT, env, timeout=300)


def cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of the machine: steal is time the host ran something else
    while this VM had work to do."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def rotated(items: list, by: int) -> list:
    by %= len(items)
    return items[by:] + items[:by]


def medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs)
            for key, value in runs[0].items() if isinstance(value, float)}


def paced_load(server: Server, *, seconds: float, seed: int, bodies: int = 1,
               rate: float = 200) -> dict:
    """`rate` reviews/s arriving at random (a Poisson process) on up to 8 keep-alive
    connections, from a separate process (bench/paced.py says why not hey -q); with
    `bodies` > 1, the first that many review bodies in turn (KNOWN_IMAGES over 5
    namespaces), else one."""
    steal_before, total_before = cpu_times()
    out = subprocess.run([sys.executable, "-c", PACED_SCRIPT, str(server.port), str(server.ca),
                          str(seconds), str(seed), str(bodies), str(rate)],
                         capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         timeout=seconds + 60).stdout
    steal_after, total_after = cpu_times()
    result = json.loads(out)
    result["steal_pct"] = 100 * (steal_after - steal_before) / max(total_after - total_before, 1)
    return result


def loopback_pki(workdir: Path) -> Path:
    """Writes ca.crt, and tls.crt/tls.key for localhost and 127.0.0.1, into workdir."""
    ca, ca_key = tls.generate_ca()
    cert, key = tls.generate_serving(ca, ca_key, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    for name, data in (("ca.crt", ca), ("tls.crt", cert), ("tls.key", key)):
        (workdir / name).write_bytes(data)
    return workdir


def bench_observer(args) -> None:
    print("== observer: /observe vs a bare allow-all handler (same gunicorn settings) ==")
    plane = controlplane.start(timeout=60)
    workdir = loopback_pki(Path(tempfile.mkdtemp(prefix="prewarm-bench-")))
    env = {"KUBECONFIG": str(plane.kubeconfig), "PREWARM_NAMESPACE": "prewarm",
           "PREWARM_LOG_LEVEL": "WARNING"}
    from kubernetes import client

    client.CoreV1Api(plane.api_client()).create_namespace({"metadata": {"name": "prewarm"}})
    servers: dict[str, Server] = {}
    try:
        for kind in ("floor", "baseline", "baseline-orjson", "observer"):
            servers[kind] = Server(kind, workdir, env)
            # warm-up: connections, caches, and the first flush (which writes the new
            # images once) before anything is measured
            load(servers[kind], seconds=3, connections=4)
        # interleaved rounds: the servers share the machine's noise (a control plane
        # settling, the host's other guests) instead of one of them getting it all; in a
        # round every server gets the same random arrivals (same seed)
        full: dict[str, list[dict]] = {"baseline": [], "observer": []}
        # the same, a second pair per round: the handler with the observer's JSON codec
        codec: dict[str, list[dict]] = {"baseline-orjson": [], "observer": []}
        rate: dict[str, list[dict]] = {"floor": [], "baseline": [], "observer": []}
        for round_ in range(args.rounds):
            # the order turns every round: on this VM a run right after another
            # saturating one measures differently (the host's CPU quota), by up to 15%
            for pair in (full, codec):
                for kind in rotated(list(pair), round_):
                    pair[kind].append(load(servers[kind], seconds=args.seconds, connections=8))
            for kind in rotated(list(rate), round_):
                rate[kind].append(paced_load(servers[kind], seconds=2 * args.seconds, seed=round_))
        # writes for known images: every KNOWN_IMAGES body (50 images over 5 namespaces)
        # is sent once and learned, then all of them again and again, in turn, so every
        # worker sees every known image
        observer = servers["observer"]
        everything = len(KNOWN_IMAGES)
        paced_load(observer, seconds=1, seed=99, bodies=everything, rate=400)
        wait_for(f"{everything} images learned", lambda: observer.metric(
            "prewarm_images_learned_total") >= everything, timeout=30)
        writes_before = observer.metric("prewarm_api_writes_total")
        reviews_before = observer.metric("prewarm_reviews_total")
        paced_load(observer, seconds=2 * args.seconds, seed=100, bodies=everything, rate=1000)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # three flush intervals: any write would show
            time.sleep(0.25)
        writes = observer.metric("prewarm_api_writes_total") - writes_before
        reviews = observer.metric("prewarm_reviews_total") - reviews_before

        # medians of the rounds: a best-of-N ratio swings with whichever side got one
        # lucky quiet round; each round's own ratio is printed too
        full_median = {kind: medians(runs) for kind, runs in full.items()}
        full_median["baseline-orjson"] = medians(codec["baseline-orjson"])
        median = {kind: medians(runs) for kind, runs in rate.items()}
        base, obs = full_median["baseline"], full_median["observer"]
        columns = {"floor": "floor", "baseline": "baseline", "baseline-orjson": "+orjson",
                   "observer": "observer"}

        def row(label: str, figures: dict[str, float], form: str) -> None:
            print(f"{label:30}" + "".join(
                f"{format(figures[kind], form) if kind in figures else '':>10}"
                for kind in columns))

        print(f"{'':30}" + "".join(f"{title:>10}" for title in columns.values()))
        for key, label, form in (("rps", "reviews/s (8 connections)", ".0f"),
                                 ("p50_ms", "p50 ms (8 connections)", ".2f"),
                                 ("p99_ms", "p99 ms (8 connections)", ".2f"),
                                 ("cpu_us", "server CPU us per review", ".0f")):
            row(label, {kind: m[key] for kind, m in full_median.items()}, form)
        for key, label in (("p50_ms", "p50 ms at 200 reviews/s"), ("p99_ms", "p99 ms at 200 reviews/s")):
            row(label, {kind: m[key] for kind, m in median.items()}, ".2f")
        row("  host steal % meanwhile", {kind: m["steal_pct"] for kind, m in median.items()}, ".1f")
        errors = {kind: sum(r["errors"] for r in full.get(kind, []) + codec.get(kind, [])
                            + rate.get(kind, [])) for kind in columns}
        row("errors", errors, "d")
        print("  (+orjson: the allow-all handler with orjson, from each round's second pair; "
              "the observer column is the first pair's observer)")
        # the host's steal during each run next to its p99: on a shared VM the two move
        # together, whichever server is measured
        for kind, runs in rate.items():
            print(f"p99 ms at 200 reviews/s (steal %), each round, {kind + ':':9} "
                  + " ".join(f"{r['p99_ms']:.1f} ({r['steal_pct']:.0f})" for r in runs))
        # each round's pair ran back to back, so its ratio is taken under the same host
        # conditions; the median of those ratios is the figure (the ratio of the two
        # medians mixes rounds minutes apart, and steal here swings within minutes)
        pairs = [o["rps"] / b["rps"] for o, b in zip(full["observer"], full["baseline"])]
        print(f"throughput ratio observer/baseline: {statistics.median(pairs):.2f} (target >= 0.9; "
              f"median of {args.rounds} rounds, each a back-to-back pair of {args.seconds:.0f}s "
              "runs at full speed, load from hey: " + " ".join(f"{r:.2f}" for r in pairs)
              + f"; ratio of the medians {obs['rps'] / base['rps']:.2f})")
        same_codec = [o["rps"] / b["rps"] for o, b in zip(codec["observer"], codec["baseline-orjson"])]
        print(f"  against the allow-all handler with orjson, the observer's JSON codec: "
              f"{statistics.median(same_codec):.2f} (a second back-to-back pair in each round: "
              + " ".join(f"{r:.2f}" for r in same_codec) + ")")
        cpu_pairs = [b["cpu_us"] / o["cpu_us"] for o, b in zip(full["observer"], full["baseline"])]
        print(f"reviews per server CPU-second, observer/baseline: {statistics.median(cpu_pairs):.2f} "
              "(the same runs; the kernel charges the host's steal to no process, so this "
              "moves less with it than reviews/s: "
              + " ".join(f"{r:.2f}" for r in cpu_pairs) + ")")
        print(f"p99 at 200 reviews/s: {median['observer']['p99_ms']:.2f} ms (target < 5 ms; median "
              f"of {args.rounds} rounds of {2 * args.seconds:.0f}s; baseline "
              f"{median['baseline']['p99_ms']:.2f} ms, floor {median['floor']['p99_ms']:.2f} ms)")
        print(f"API writes per 10,000 admissions of known images: {10000 * writes / max(reviews, 1):.1f} "
              f"(over {reviews:.0f} reviews of {len(KNOWN_IMAGES)} images in 5 namespaces, "
              f"in turn; target 0)")
        alone = in_process(env)
        print("one review in one process, no server (median of 9): baseline "
              f"{alone['baseline']:.1f} us, with orjson {alone['baseline-orjson']:.1f} us, "
              f"observer {alone['observer']:.1f} us")
        pause = gc_pause(env)
        print(f"full garbage collection in an observer worker: {pause['before_ms']:.1f} ms; after "
              f"the start-up heap ({pause['frozen']} objects) is frozen: {pause['after_ms']:.2f} ms")
    finally:
        for server in servers.values():
            server.stop()
        plane.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # its private key too


# -- reconciler ----------------------------------------------------------------------

# The reconciler benches' measurements run in child scripts, a process each, so that each
# peak memory is its own: CHILD_TIMED records named timings, CHILD_PEAK prints them with
# the peak as the last line of JSON, which run_child returns.
CHILD_TIMED = r"""
figures = {}
def timed(name, fn):
    start = time.perf_counter()
    detail = fn()
    figures[name] = {"seconds": time.perf_counter() - start, "detail": detail}
"""
CHILD_PEAK = r"""
# VmHWM: this process's own peak; ru_maxrss would start from the bench's size at the
# fork, as Linux keeps it across execve
figures["peak_mib"] = int(next(line.split()[1] for line in open("/proc/self/status")
                               if line.startswith("VmHWM:"))) / 1024
print(json.dumps(figures))
"""


def run_child(script: str, mode: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", script, str(REPO), mode], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


PASS_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from kubernetes import client
from webhook.reconciler import Reconciler
from webhook.settings import Settings
from webhook import kube
mode = sys.argv[2]
settings = Settings(namespace="prewarm", helper_image="ghcr.io/prewarm/prewarm:bench",
                    max_images=10000, max_bytes=4 * 1024 * 1024)
api = kube.api_client()
reconciler = Reconciler(settings, api)
core = client.CoreV1Api(api)
namespaces = [ns.metadata.name for ns in core.list_namespace(label_selector="prewarm.io/learn=enabled").items]
""" + CHILD_TIMED + r"""
if mode == "baselines":
    def raw():  # the floor: the same pods as JSON bytes, not decoded
        size = 0
        for ns in namespaces:
            token = None
            while True:
                r = core.list_namespaced_pod(ns, limit=500, _continue=token, _preload_content=False)
                size += len(r.data)
                token = json.loads(r.data)["metadata"].get("continue")
                if not token: break
        return f"{size / 2**20:.0f} MiB of JSON"
    def models():  # what a straightforward client does: the pods as model objects
        count = 0
        for ns in namespaces:
            token = None
            while True:
                page = core.list_namespaced_pod(ns, limit=500, _continue=token)
                count += len(page.items)
                token = page.metadata._continue
                if not token: break
        return f"{count} pods"
    timed("list pods, raw JSON (floor)", raw)
    timed("list pods as client models", models)
else:
    def one(backfill):
        def run():
            r = reconciler.reconcile_once(backfill=backfill)
            return f"{r.outcome}, {len(r.daemonsets)} DaemonSets"
        return run
    timed("first pass (creates DaemonSets)", one(True))
    timed("steady pass (watch-triggered)", one(False))
    timed("resync pass, backfill by listing", one(True))
    import threading
    from webhook.podcache import PodImages
    reconciler.pod_images = PodImages(core, reconciler.filter)
    stop = threading.Event()
    threading.Thread(target=reconciler.pod_images.run, args=(stop,), daemon=True).start()
    reconciler.pod_images.synced.wait(120)  # the continuous reconciler lists once at start
    timed("resync pass, backfill from pod watch", one(True))
    stop.set()
""" + CHILD_PEAK


def bench_reconciler(args) -> None:
    print(f"== reconciler: one pass over {args.images} learned images and {args.pods} pods ==")
    from kubernetes import client

    from webhook.settings import Settings
    from webhook.store import LearnedImagesStore, Observation, merge

    plane = controlplane.start(timeout=60, extra_apiserver_args=["--max-requests-inflight=1000",
                                                                 "--max-mutating-requests-inflight=500"])
    try:
        core = client.CoreV1Api(plane.api_client())
        core.create_namespace({"metadata": {"name": "prewarm"}})
        namespaces = [f"team-{i}" for i in range(20)]
        for name in namespaces:
            core.create_namespace({"metadata": {"name": name, "labels": {"prewarm.io/learn": "enabled"}}})
        images = [f"registry.example.com/{namespaces[i % 20]}/app-{i}:v1" for i in range(args.images)]
        now = time.time()
        settings = Settings(max_images=10000, max_images_per_namespace=10000, max_bytes=4 * 1024 * 1024)
        store = LearnedImagesStore(core, namespace="prewarm", name="learned-images")
        store.update(lambda learned: merge(learned, {i: Observation({"team-0"}, now, now) for i in images},
                                           source="admission", settings=settings).changed)
        started = time.monotonic()

        def create(index: int) -> None:
            api = clients[index % len(clients)]
            api.create_namespaced_pod(namespaces[index % 20], {
                "metadata": {"name": f"pod-{index}"},
                "spec": {"containers": [{"name": "app", "image": images[index % len(images)]},
                                        {"name": "side", "image": "docker.io/library/busybox:1.36"}]}})

        clients = [client.CoreV1Api(plane.api_client()) for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(args.pods)))
        print(f"(setup: {args.pods} pods created in {time.monotonic() - started:.0f}s)")
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig), "PYTHONPATH": str(REPO)}
        runs = {mode: run_child(PASS_SCRIPT, mode, env) for mode in ("baselines", "reconcile")}
        print(f"{'':36}{'seconds':>9}  detail")
        for mode in ("baselines", "reconcile"):
            for name, figure in runs[mode].items():
                if name != "peak_mib":
                    print(f"{name:36}{figure['seconds']:>9.2f}  {figure['detail']}")
        floor = runs["baselines"]["list pods, raw JSON (floor)"]["seconds"]
        listing = runs["reconcile"]["resync pass, backfill by listing"]["seconds"]
        watched = runs["reconcile"]["resync pass, backfill from pod watch"]["seconds"]
        steady = runs["reconcile"]["steady pass (watch-triggered)"]["seconds"]
        models = runs["baselines"]["list pods as client models"]["seconds"]
        print(f"resync pass by listing / raw list of the pods: {listing / floor:.2f}; / listing "
              f"them as client models: {listing / models:.2f}; with the pod watch: "
              f"{watched:.2f} s; steady pass: {steady:.2f} s (target < 2 s)")
        print(f"peak memory: reconciler {runs['reconcile']['peak_mib']:.0f} MiB, listing as "
              f"models {runs['baselines']['peak_mib']:.0f} MiB (target < 150 MiB)")
    finally:
        plane.stop()


PREPULLER_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from kubernetes import client
from webhook import kube
from webhook.reconciler import Reconciler
from webhook.settings import Settings
mode = sys.argv[2]
settings = Settings(namespace="prewarm", helper_image="ghcr.io/prewarm/prewarm:bench",
                    backfill=False)
api = kube.api_client()
reconciler = Reconciler(settings, api)
core = client.CoreV1Api(api)
""" + CHILD_TIMED + r"""
if mode == "create":
    timed("first pass", lambda: reconciler.reconcile_once().outcome)
elif mode == "whole":
    def whole():  # what a pass read before: every prepuller pod, kept whole
        pods = list(kube.list_items(core.list_namespaced_pod, "prewarm",
                                    label_selector=Reconciler.PREPULLER_SELECTOR))
        return f"{len(pods)} pods kept whole (pages of 500)"
    timed("prepuller pods, kept whole (baseline)", whole)
else:
    timed("prepuller pods, as summaries", lambda: f"{len(reconciler.prepuller_pods())} "
          "summaries (pages of 20)")
    timed("pass, listing the prepuller pods", lambda: reconciler.reconcile_once().outcome)
    import threading
    stop = threading.Event()
    cache = reconciler.watch_prepuller_pods()
    threading.Thread(target=cache.run, args=(stop,), daemon=True).start()
    cache.synced.wait(120)
    timed("pass, from the watched prepuller pods", lambda: reconciler.reconcile_once().outcome)
    stop.set()
""" + CHILD_PEAK


def bench_prepuller(args) -> None:
    shards = -(-args.prepuller_images // 100)
    print(f"== prepuller pods: {args.nodes} nodes x {shards} shards of {args.prepuller_images} "
          "images, what a pass reads of them ==")
    from kubernetes import client

    from webhook.store import Record, key_for, rfc3339

    plane = controlplane.start(nodes=args.nodes, timeout=240)
    try:
        core = client.CoreV1Api(plane.api_client())
        core.create_namespace({"metadata": {"name": "prewarm"}})
        now = time.time()
        records = [Record(image=f"registry.example.com/team/img-{i:04d}:1.0", namespaces=["team-a"],
                          first_seen=rfc3339(now - 1000 + i), last_seen=rfc3339(now),
                          source="admission") for i in range(args.prepuller_images)]
        core.create_namespaced_config_map("prewarm", {
            "metadata": {"name": "learned-images"},
            "data": {key_for(r.image): r.to_json() for r in records}})
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig), "PYTHONPATH": str(REPO)}

        def run(mode: str) -> dict:
            return run_child(PREPULLER_SCRIPT, mode, env)

        run("create")
        wanted = args.nodes * shards
        started = time.monotonic()
        apps = client.AppsV1Api(plane.api_client())
        # counted from the DaemonSets' status: listing the pods themselves here would cost
        # this process the memory the figures below are about
        wait_for(f"{wanted} prepuller pods ready", lambda: sum(
            ds.status.number_ready or 0 for ds in apps.list_namespaced_daemon_set("prewarm").items)
            >= wanted, timeout=600)
        print(f"(setup: {wanted} prepuller pods ready in {time.monotonic() - started:.0f}s)")
        whole, ours = run("whole"), run("summaries")
        print(f"{'':40}{'seconds':>9}  detail")
        for figures in (whole, ours):
            for name, figure in figures.items():
                if name != "peak_mib":
                    print(f"{name:40}{figure['seconds']:>9.2f}  {figure['detail']}")
        print(f"peak memory: summaries {ours['peak_mib']:.0f} MiB (their passes included), "
              f"kept whole {whole['peak_mib']:.0f} MiB: ratio "
              f"{ours['peak_mib'] / whole['peak_mib']:.2f}")
    finally:
        plane.stop()


BENCHES = ("observer", "reconciler", "prepuller")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # no `choices=`: on Python 3.11 argparse checks a nargs="*" default against them as
    # one value, so a plain `python -m bench` (make bench) was refused
    parser.add_argument("which", nargs="*", metavar="{observer,reconciler,prepuller}",
                        help="which benchmarks (default: all)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    parser.add_argument("--rounds", type=int, default=6,
                        help="interleaved observer rounds (the order turns each round)")
    parser.add_argument("--pods", type=int, default=20000,
                        help="reconciler bench: pods created in opted-in namespaces")
    parser.add_argument("--images", type=int, default=5000,
                        help="reconciler bench: images in learned-images")
    parser.add_argument("--nodes", type=int, default=50,
                        help="prepuller bench: fake (kwok) nodes")
    parser.add_argument("--prepuller-images", type=int, default=500,
                        help="prepuller bench: images in learned-images (100 per shard)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.which if name not in BENCHES]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)} (choose from {', '.join(BENCHES)})")
    args.which = args.which or list(BENCHES)
    return args


def main() -> None:
    args = parse_args()
    for which in args.which:
        {"observer": bench_observer, "reconciler": bench_reconciler,
         "prepuller": bench_prepuller}[which](args)
        print()


if __name__ == "__main__":
    main()
