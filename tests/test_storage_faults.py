"""A real full disk under a real `facegate serve`: the SQLite gallery, or a real
PostgreSQL server's data directory, on a tmpfs of fixed size, filled to the last byte. Writes answer 507 storage_full, verify and search keep
answering 200, nothing acknowledged is lost (across a restart), and the server recovers
when space comes back. Needs root to mount the tmpfs; skips saying so otherwise."""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import httpx
import pytest
from facegate.server.faults import storage_fault
from server_support import default_bundle, free_port, people, start_server


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 3 MB tmpfs (needs root): {mounted.stderr.strip()}")
    (disk / "server.log").symlink_to(tmp_path / "server.log")  # the log stays off the full disk
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def enrol(base: str, identity_id: str, photos: list[Path]) -> httpx.Response:
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    return httpx.post(f"{base}/v1/identities", files=files, timeout=60,
                      data={"identity_id": identity_id, "name": f"Person {identity_id}"})


def test_a_full_disk_refuses_writes_with_507_and_keeps_answering(small_disk, celeba_index):
    group = list(people(celeba_index).values())
    gallery = small_disk / "gallery.sqlite"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"FACEGATE_KEEP_CROPS": "true"}
    proc = start_server(default_bundle(), gallery, port, env=env)
    acknowledged: set[str] = set()
    try:
        assert enrol(base, "first", group[0][:2]).status_code == 201
        acknowledged.add("first")
        filler = fill(small_disk)
        codes = []
        for photos in group[1:6]:
            identity_id = uuid.uuid4().hex[:8]
            response = enrol(base, identity_id, photos[:3])
            codes.append(response.status_code)
            if response.status_code == 201:
                acknowledged.add(identity_id)
            else:
                assert response.json()["error"]["code"] == "storage_full", response.text
        assert 507 in codes and set(codes) <= {201, 507}, codes

        probe = group[0][2]
        files = {"image1": ("a.jpg", group[0][0].read_bytes()), "image2": ("b.jpg", probe.read_bytes())}
        assert httpx.post(f"{base}/v1/verify", files=files, timeout=60).status_code == 200
        found = httpx.post(f"{base}/v1/search", files={"image": ("p.jpg", probe.read_bytes())},
                           timeout=60)
        assert found.status_code == 200 and found.json()["match"]["identity_id"] == "first"
        checked = httpx.post(f"{base}/v1/verify/identity", files={"image": ("p.jpg", probe.read_bytes())},
                             data={"identity_id": "first"}, timeout=60)
        assert checked.status_code == 200 and checked.json()["match"]
        metrics = httpx.get(f"{base}/metrics").text
        assert 'facegate_storage_faults_total{code="storage_full"}' in metrics
        assert "facegate_decision_records_unwritten 1.0" in metrics  # counted, not fatal
        assert httpx.delete(f"{base}/v1/identities/nobody-{uuid.uuid4().hex}").status_code == 404
        for identity_id in acknowledged:
            assert httpx.get(f"{base}/v1/identities/{identity_id}").status_code == 200

        filler.unlink()  # space comes back: so does enrolment
        assert enrol(base, "after", group[6][:1]).status_code == 201
        acknowledged.add("after")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc = start_server(default_bundle(), gallery, port, env=env)
    try:
        listed = httpx.get(f"{base}/v1/identities", params={"limit": 100}).json()
        assert {i["identity_id"] for i in listed["identities"]} == acknowledged
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = (small_disk.parent / "server.log").read_text()
    assert log.count("storage_full:") <= 2  # at most once a minute, not a traceback per request


def test_fault_kinds_are_told_apart():
    import sqlite3

    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert storage_fault(full).status == 507
    try:
        raise RuntimeError("wrapped") from OSError(28, os.strerror(28))
    except RuntimeError as e:
        assert storage_fault(e).code == "storage_full"
    assert storage_fault(OSError(24, "Too many open files")).status == 503
    import psycopg
    from facegate.gallery.pg_follow import unavailable

    disk_full = psycopg.errors.DiskFull("could not extend file")
    try:  # PostgreSQL's disk_full, as the store raises it (GalleryUnavailable from it)
        raise unavailable(disk_full) from disk_full
    except Exception as e:
        assert storage_fault(e).code == "storage_full"
    assert storage_fault(unavailable(OSError("connection refused"))) is None
    assert storage_fault(sqlite3.OperationalError("no such table")) is None


@pytest.fixture
def postgres_on_small_disk():
    """A PostgreSQL server whose data directory is on a 160 MB tmpfs."""
    import shutil

    from postgres_support import cluster

    cluster()  # skips (with the install hint) without a server binary
    disk = Path(tempfile.mkdtemp(prefix="facegate-pgdisk-"))  # the postgres user reaches /tmp
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    from bench.pg_cluster import Cluster

    c = None
    try:
        if os.geteuid() == 0:
            shutil.chown(disk, "postgres", "postgres")
        c = Cluster(root=disk)
        yield c, disk
    finally:
        if c is not None:
            c.stop("immediate")
        subprocess.run(["umount", "-l", str(disk)], check=False)
        disk.rmdir()


def test_postgres_on_a_full_disk_refuses_writes_with_507_and_keeps_answering(
        postgres_on_small_disk, tmp_path, celeba_index):
    import sys
    import time

    from server_support import REPO

    c, disk = postgres_on_small_disk
    url = c.create_database()
    group = list(people(celeba_index).values())
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def serve() -> subprocess.Popen:
        with open(tmp_path / "server.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "facegate", "serve", "--bundle", str(default_bundle()),
                 "--gallery", url, "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                env={**os.environ, "FACEGATE_CPU_WORKERS": "2", "FACEGATE_KEEP_CROPS": "true"},
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        proc.kill()
        raise RuntimeError("server not ready in 90 s")

    proc = serve()
    acknowledged: set[str] = set()
    try:
        assert enrol(base, "first", group[0][:2]).status_code == 201
        acknowledged.add("first")
        filler = fill(disk)
        codes = []
        for photos in group[1:9]:
            identity_id = uuid.uuid4().hex[:8]
            response = enrol(base, identity_id, photos[:3])
            codes.append(response.status_code)
            if response.status_code == 201:
                acknowledged.add(identity_id)
            else:
                assert response.json()["error"]["code"] == "storage_full", response.text
        assert 507 in codes and set(codes) <= {201, 507}, codes
        probe = group[0][2]
        files = {"image1": ("a.jpg", group[0][0].read_bytes()), "image2": ("b.jpg", probe.read_bytes())}
        assert httpx.post(f"{base}/v1/verify", files=files, timeout=60).status_code == 200
        found = httpx.post(f"{base}/v1/search", files={"image": ("p.jpg", probe.read_bytes())},
                           timeout=60)
        assert found.status_code == 200 and found.json()["match"]["identity_id"] == "first"
        checked = httpx.post(f"{base}/v1/verify/identity", timeout=60, data={"identity_id": "first"},
                             files={"image": ("p.jpg", probe.read_bytes())})
        assert checked.status_code == 200 and checked.json()["match"]
        assert 'facegate_storage_faults_total{code="storage_full"}' in httpx.get(f"{base}/metrics").text
        for identity_id in acknowledged:
            assert httpx.get(f"{base}/v1/identities/{identity_id}").status_code == 200
        filler.unlink()  # space comes back: so does enrolment
        assert enrol(base, "after", group[9][:1]).status_code == 201
        acknowledged.add("after")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc = serve()
    try:
        listed = httpx.get(f"{base}/v1/identities", params={"limit": 100}).json()
        assert {i["identity_id"] for i in listed["identities"]} == acknowledged
    finally:
        proc.terminate()
        proc.wait(timeout=30)
