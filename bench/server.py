"""Part 2, server: a real uvicorn on 127.0.0.1 under a bounded loopback load.

Three ``python -m facegate serve`` processes run side by side, each with a fresh gallery
of a few real people enrolled through the API: the default (micro-batching on), the
peer ``FACEGATE_BATCHING=false``, and ``FACEGATE_DETECT_PROCESSES=true`` (detection in
worker processes). A thread pool of httpx clients sends real photos to /v1/verify and
/v1/search at concurrency 1, 4 and 16; each cell is split into rounds that alternate
between the servers (in reverse order every other round), so a slow spell of the shared
machine hits all of them alike.
Every cell also records the CPU time the server (with its worker processes) and the
load generator spent, from /proc: that is the profile that says whether 2 cores are
the limit. A long soak (10,000 requests at concurrency 4: searches, verifies,
embeddings, listings, enrol + delete, and the bad inputs of docs/server.md's
reliability section) checks every answer's status and records the server's RSS before,
at its peak and after.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from tqdm import tqdm

from bench.assets import REPO, bundle_info, photo_pairs, resolve_bundle
from bench.measure import cpu_seconds, rss_bytes, summarise
from bench.report import fmt, ratio, table

SIZES = {
    "full": {"people": 16, "concurrency": [1, 4, 16], "requests": {1: 64, 4: 128, 16: 256},
             "rounds": 4, "budget_s": 60.0, "long_requests": 10_000, "long_budget_s": 1800.0,
             "long_concurrency": 4},
    "smoke": {"people": 2, "concurrency": [1, 2], "requests": {1: 2, 2: 2}, "rounds": 1,
              "budget_s": 5.0, "long_requests": 4, "long_budget_s": 5.0, "long_concurrency": 2},
}
DEFAULT, PEER, PROCESSES = "micro-batching on", "micro-batching off", "detect processes"
MODES = {DEFAULT: {"FACEGATE_BATCHING": "true"},
         PEER: {"FACEGATE_BATCHING": "false"},
         PROCESSES: {"FACEGATE_BATCHING": "true", "FACEGATE_DETECT_PROCESSES": "true"}}
ENDPOINTS = ("verify", "search")


def loopback_client(url: str, timeout: float = 120) -> httpx.Client:
    """An httpx client for plain HTTP on 127.0.0.1, without a TLS context: httpx builds its
    default one from the CA bundle at ~0.1 s of CPU per client, which a load generator
    making clients per cell would take from the server it measures."""
    return httpx.Client(base_url=url, timeout=timeout, verify=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m facegate serve`` on a loopback port, ready when /readyz answers 200.

    ``gallery`` is a SQLite file (started fresh) or a PostgreSQL URL (shared, as is);
    ``start_s`` is how long the server took to become ready.
    """

    def __init__(self, bundle: Path, gallery: Path | str, env: dict[str, str], *,
                 log: Path | None = None, ready_s: float = 120.0) -> None:
        if isinstance(gallery, Path):
            for suffix in ("", "-wal", "-shm"):
                Path(str(gallery) + suffix).unlink(missing_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log or Path(gallery).with_suffix(".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "facegate", "serve", "--bundle", str(bundle),
             "--gallery", str(gallery), "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning"],
            cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=self._log)
        start = time.monotonic()
        while time.monotonic() - start < ready_s:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2, verify=False).status_code == 200:
                    self.start_s = time.monotonic() - start
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready in {ready_s:.0f} s")

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def peak_rss(self) -> int:
        return rss_bytes(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def enrol(url: str, people: list[tuple[bytes, bytes]]) -> int:
    """Enrol one person per pair from its first photo; returns how many were accepted."""
    done = 0
    with loopback_client(url, 60) as client:
        for i, (photo, _) in enumerate(people):
            r = client.post("/v1/identities", data={"name": f"person-{i}"},
                            files=[("images", ("a.jpg", photo, "image/jpeg"))])
            done += r.status_code == 201
    return done


def request_fn(endpoint: str, pairs: list[tuple[bytes, bytes]]):
    """A function (client, i) -> status code sending the i-th request of `endpoint`."""
    def send(client: httpx.Client, i: int) -> int:
        a, b = pairs[i % len(pairs)]
        if endpoint == "verify":
            files = {"image1": ("a.jpg", a, "image/jpeg"), "image2": ("b.jpg", b, "image/jpeg")}
            return client.post("/v1/verify", files=files).status_code
        return client.post("/v1/search", files={"image": ("b.jpg", b, "image/jpeg")},
                           data={"k": "5"}).status_code
    return send


# The soak's request kinds, in a cycle of 10, and the one status each must get.
SOAK_KINDS = (
    ("search", 200), ("search", 200), ("search", 200), ("verify", 200), ("verify", 200),
    ("embed", 200), ("list", 200), ("truncated_image", 400), ("deep_metadata", 422),
    ("enrol_delete", 201),
)


def soak_fn(pairs: list[tuple[bytes, bytes]]):
    """(client, i) -> 200 when the i-th soak request got the status its kind must get,
    else the status it got (counted as an error)."""
    search, verify = request_fn("search", pairs), request_fn("verify", pairs)

    def send(client: httpx.Client, i: int) -> int:
        kind, expected = SOAK_KINDS[i % len(SOAK_KINDS)]
        a, b = pairs[i % len(pairs)]
        if kind == "search":
            status = search(client, i)
        elif kind == "verify":
            status = verify(client, i)
        elif kind == "embed":
            status = client.post("/v1/embed", files={"image": ("a.jpg", a, "image/jpeg")}).status_code
        elif kind == "list":
            status = client.get("/v1/identities", params={"limit": 100}).status_code
        elif kind == "truncated_image":
            files = {"image1": ("a.jpg", a[: len(a) // 3], "image/jpeg"),
                     "image2": ("b.jpg", b, "image/jpeg")}
            status = client.post("/v1/verify", files=files).status_code
        elif kind == "deep_metadata":
            status = client.post("/v1/identities", data={"name": "deep", "metadata": "[" * 900},
                                 files=[("images", ("a.jpg", a, "image/jpeg"))]).status_code
        else:
            r = client.post("/v1/identities", data={"name": f"soak-{i}"},
                            files=[("images", ("a.jpg", a, "image/jpeg"))])
            status = r.status_code
            if status == 201:
                client.delete(f"/v1/identities/{r.json()['identity']['identity_id']}")
        # A photo without a face (422) recurs once per cycle of the pairs: not a failure.
        return 200 if status in (expected, 422 if expected in (200, 201) else expected) else status
    return send


def load(server: Server, send, *, concurrency: int, requests: int, budget_s: float,
         desc: str) -> dict:
    """Send up to `requests` requests from `concurrency` threads (stop issuing after budget_s).

    Returns the raw latencies of the 200s, the other statuses, the wall time, and the CPU
    seconds the server (with its workers) and this load generator spent meanwhile.
    """
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.perf_counter() + budget_s
    bar = tqdm(total=requests, desc=desc, leave=False)

    def worker() -> None:
        with loopback_client(server.url) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                status = send(client, i)
                elapsed = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        latencies.append(elapsed)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                    bar.update()

    server_cpu, client_cpu = cpu_seconds(server.proc.pid), time.process_time()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    server_cpu = cpu_seconds(server.proc.pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    bar.close()
    return {"latencies": latencies, "errors": errors, "wall_s": wall,
            "server_cpu_s": server_cpu, "client_cpu_s": client_cpu}


def cell(concurrency: int, rounds: list[dict]) -> dict:
    """One table cell from its rounds: totals, req/s, latency percentiles and the CPU profile."""
    latencies = [t for r in rounds for t in r["latencies"]]
    errors = dict(sum((Counter(r["errors"]) for r in rounds), Counter()))
    wall = sum(r["wall_s"] for r in rounds)
    server_cpu = sum(r["server_cpu_s"] for r in rounds)
    client_cpu = sum(r["client_cpu_s"] for r in rounds)
    answered = len(latencies) + sum(errors.values())
    return {"concurrency": concurrency, "ok": len(latencies), "errors": errors, "wall_s": wall,
            "rps": len(latencies) / wall if wall else float("nan"),
            "latency": summarise(latencies),
            "server_cores": server_cpu / wall if wall else float("nan"),
            "client_cores": client_cpu / wall if wall else float("nan"),
            "server_cpu_ms": 1000 * server_cpu / answered if answered else float("nan"),
            "client_cpu_ms": 1000 * client_cpu / answered if answered else float("nan")}


def run(sizes: dict, workdir: Path) -> dict:
    bundle_path, stand_in = resolve_bundle(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pairs = [(a.read_bytes(), b.read_bytes()) for a, b in photo_pairs(sizes["people"])]
    rounds = sizes.get("rounds", 1)
    servers: dict[str, Server] = {}
    try:
        for i, (mode, env) in enumerate(MODES.items()):
            servers[mode] = Server(bundle_path, workdir / f"bench-server-{i}.sqlite", env)
        modes = {mode: {"enrolled": enrol(server.url, pairs), "rows": []}
                 for mode, server in servers.items()}
        for endpoint in ENDPOINTS:
            send = request_fn(endpoint, pairs)
            for server in servers.values():
                with loopback_client(server.url) as client:
                    send(client, 0)  # warm-up
            for c in sizes["concurrency"]:
                per_round = -(-sizes["requests"][c] // rounds)
                done: dict[str, list[dict]] = {mode: [] for mode in servers}
                for r in range(rounds):
                    order = list(servers.items())  # reversed every other round, so no
                    for mode, server in order[::-1] if r % 2 else order:  # mode always leads
                        done[mode].append(load(
                            server, send, concurrency=c, requests=per_round,
                            budget_s=sizes["budget_s"] / rounds,
                            desc=f"{mode} {endpoint} c={c} round {r + 1}/{rounds}"))
                for mode in servers:
                    modes[mode]["rows"].append({"endpoint": endpoint, **cell(c, done[mode])})
        for mode in [m for m in servers if m != DEFAULT]:  # the soak needs only the default
            servers.pop(mode).stop()
        server = servers[DEFAULT]
        rss_start = server.rss()
        soak = load(server, soak_fn(pairs), concurrency=sizes["long_concurrency"],
                    requests=sizes["long_requests"], budget_s=sizes["long_budget_s"],
                    desc=f"soak ({DEFAULT})")
        long_run = {"mode": DEFAULT, "endpoint": "mixed", "target_requests": sizes["long_requests"],
                    "budget_s": sizes["long_budget_s"],
                    **cell(sizes["long_concurrency"], [soak]),
                    "kinds": [k for k, _ in SOAK_KINDS],
                    "rss_start_mb": rss_start / 1e6, "rss_end_mb": server.rss() / 1e6,
                    "rss_peak_mb": server.peak_rss() / 1e6}
    finally:
        for server in servers.values():
            server.stop()
    return {"model": bundle_info(bundle_path, stand_in), "people": len(pairs),
            "requests": sizes["requests"], "rounds": rounds, "budget_s": sizes["budget_s"],
            "cores": os.cpu_count(), "modes": modes, "long_run": long_run}


def ceiling(row: dict, cores: int) -> float:
    """Requests per second the machine's cores allow at this cell's CPU cost per request
    (server + load generator, which share the cores here)."""
    return 1000 * cores / (row["server_cpu_ms"] + row["client_cpu_ms"])


def markdown(result: dict) -> str:
    model = result["model"]
    cores = result.get("cores") or os.cpu_count() or 1
    rows = {mode: result["modes"][mode]["rows"] for mode in MODES}
    text = (
        f"`python -m facegate serve` (uvicorn, 1 process) on 127.0.0.1 with "
        f"`{model['model_id']}`"
        + (" (untrained stand-in MobileFaceNet)" if model["stand_in"] else "")
        + f", a fresh gallery of {result['people']} real people enrolled through the API, "
        "and a load generator of httpx clients in threads on the same cores (so the load "
        "generator competes with the server). Three servers run side by side: the default "
        f"({DEFAULT}), the peer `FACEGATE_BATCHING=false` ({PEER}) and "
        f"`FACEGATE_DETECT_PROCESSES=true` ({PROCESSES}); each cell is sent in "
        f"{result.get('rounds', 1)} rounds that alternate between them, up to "
        f"({', '.join(f'c={c}: {n}' for c, n in result['requests'].items())}) requests or "
        f"{result['budget_s']:.0f} s. verify = two photos, two detections; search = one "
        "photo, k=5.\n\n"
    )
    table_rows = []
    for a, b, p in zip(rows[DEFAULT], rows[PEER], rows[PROCESSES], strict=True):
        la, lb, lp = a["latency"], b["latency"], p["latency"]
        table_rows.append([
            a["endpoint"], a["concurrency"], a["rps"],
            f"{fmt(la['p50_ms'])} / {fmt(la['p99_ms'])}", b["rps"],
            f"{fmt(lb['p50_ms'])} / {fmt(lb['p99_ms'])}", ratio(a["rps"], b["rps"]), p["rps"],
            f"{fmt(lp['p50_ms'])} / {fmt(lp['p99_ms'])}"])
    text += table(["endpoint", "concurrency", f"req/s ({DEFAULT})", "p50 / p99 ms",
                   f"req/s ({PEER}, peer)", "p50 / p99 ms", "batching / peer req/s",
                   f"req/s ({PROCESSES})", "p50 / p99 ms"], table_rows)
    errors = {f"{m} {r['endpoint']} c={r['concurrency']}": r["errors"]
              for m in MODES for r in rows[m] if r["errors"]}
    if errors:
        text += (f"\nNon-200 answers: {errors}. The requests cycle through the same photos, so "
                 "a 422 (no face found) recurs once per cycle; it is not a load failure.\n")
    for a, b in zip(rows[DEFAULT], rows[PEER], strict=True):
        q = ratio(a["rps"], b["rps"])
        if q < 1:
            text += (f"\n{a['endpoint']} at concurrency {a['concurrency']}: the batching server "
                     f"served fewer requests per second than without batching ({fmt(q)}x).\n")
    text += (
        f"\nWhere the CPU goes (from /proc, per cell): cores kept busy by the server (with its "
        f"worker processes) and by the load generator, out of {cores}; CPU ms each spent per "
        "request; and the ceiling those costs allow, cores / (server + load-generator CPU per "
        "request).\n\n")
    profile = []
    for mode in MODES:
        first = {r["endpoint"]: r["rps"] for r in rows[mode] if r["concurrency"] == rows[mode][0]["concurrency"]}
        for r in rows[mode]:
            profile.append([r["endpoint"], r["concurrency"], mode, r["rps"],
                            ratio(r["rps"], first[r["endpoint"]]), r["server_cores"],
                            r["client_cores"], r["server_cpu_ms"], r["client_cpu_ms"],
                            ceiling(r, cores), ratio(r["rps"], ceiling(r, cores))])
    text += table(["endpoint", "concurrency", "server", "req/s", "x concurrency 1",
                   "server cores busy", "load-generator cores busy", "server CPU ms / request",
                   "load-generator CPU ms / request", "CPU ceiling req/s",
                   "req/s / ceiling"], profile)
    text += scaling_text(rows, cores)
    lr = result["long_run"]
    kinds = lr.get("kinds", [lr["endpoint"]])
    text += (
        f"\nSoak ({lr['mode']}, concurrency {lr['concurrency']}, a cycle of "
        f"{', '.join(kinds)}): {lr['ok']:,} requests answered with the status their kind "
        f"must get, of a {lr['target_requests']:,} target; unexpected statuses: "
        f"{lr['errors'] or 'none'}"
        + (f", cut by the {lr['budget_s']:.0f} s budget this part has on 2 shared cores"
           if lr["ok"] < lr["target_requests"] else "")
        + f"; {lr['rps']:.1f} req/s, "
        f"p99 {fmt(lr['latency']['p99_ms'])} ms. Server RSS {lr['rss_start_mb']:.0f} MB before, "
        f"{lr['rss_end_mb']:.0f} MB after ({lr['rss_end_mb'] - lr['rss_start_mb']:+.0f} MB)"
        + (f", peak {lr['rss_peak_mb']:.0f} MB" if "rss_peak_mb" in lr else "") + ".\n")
    return text


def scaling_text(rows: dict, cores: int) -> str:
    """What the profile says about the highest concurrency vs 1, written from the figures."""
    text = ""
    for endpoint in ENDPOINTS:
        mine = [r for r in rows[DEFAULT] if r["endpoint"] == endpoint]
        low, high = mine[0], mine[-1]
        best = max((r for m in MODES for r in rows[m]
                    if r["endpoint"] == endpoint and r["concurrency"] == high["concurrency"]),
                   key=lambda r: r["rps"])
        best_mode = next(m for m in MODES if best in rows[m])
        gain = ratio(high["rps"], low["rps"])
        busy_low = low["server_cores"] + low["client_cores"]
        text += (
            f"\n{endpoint}: concurrency {high['concurrency']} served {fmt(gain)}x the req/s of "
            f"concurrency {low['concurrency']}"
            + (" (the target is 1.5x)" if gain < 1.5 else " (at or above the 1.5x target)")
            + f"; the best server at {high['concurrency']} was {best_mode} "
            f"({fmt(ratio(best['rps'], low['rps']))}x). At concurrency {low['concurrency']} "
            f"the server already keeps {fmt(low['server_cores'])} of {cores} cores busy "
            "(ONNX Runtime's threads"
            + (", and the two photos of a verify prepared at once" if endpoint == "verify" else "")
            + f"), so more concurrency can find at most {fmt(cores / busy_low)}x in idle cores; "
            "what it gains beyond that comes from cheaper requests under load: "
            f"{fmt(low['server_cpu_ms'])} -> {fmt(high['server_cpu_ms'])} server CPU ms a "
            f"request. At concurrency {high['concurrency']} the server and the load generator "
            f"keep {fmt(high['server_cores'] + high['client_cores'])} of {cores} cores busy, "
            f"{fmt(ratio(high['rps'], ceiling(high, cores)))} of the CPU ceiling "
            f"({fmt(ceiling(high, cores))} req/s): the cores, not the server's concurrency, "
            "are the limit here.\n")
    return text
