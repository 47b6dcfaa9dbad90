"""A real `facegate serve` process refuses tampered, unsealed and untrusted bundles (exit 3),
and a re-sealed bundle is a model change for the gallery (the 409 and `gallery reembed`).

Copies of the committed default bundle (real ONNX, real manifest), real key files, real
SQLite galleries, real photos.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from facegate.core.bundle import load_bundle, seal_bundle
from facegate.server.app import create_app
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from server_support import REPO, default_bundle, free_port, people, start_server
from test_bundle_seal import copy_default, edit_manifest

from facegate.cli import main

pytestmark = pytest.mark.usefixtures("single_threaded_faiss")

EDITS = {
    "threshold": lambda m: m.update(threshold=0.1),
    "threshold_source": lambda m: m.update(threshold_source="operator"),
    "geometry": lambda m: m["geometry"].update(padding=0.3),
    "input": lambda m: m["input"].update(std=128.0),
    "quality_model": lambda m: m["quality_model"].update(
        neutral_instability=m["quality_model"]["neutral_instability"] + 0.1),
    "error_model": lambda m: m["error_model"].update(rho=0.5),
}


def serve(bundle: Path, tmp_path: Path, env: dict[str, str] | None = None):
    """`python -m facegate serve` that is expected to exit on its own (60 s at most)."""
    return subprocess.run(
        [sys.executable, "-m", "facegate", "serve", "--bundle", str(bundle),
         "--gallery", str(tmp_path / "g.sqlite"), "--port", str(free_port())],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60,
    )


def test_untouched_default_bundle_starts(tmp_path):
    proc = start_server(default_bundle(), tmp_path / "g.sqlite", port := free_port())
    try:
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
        assert ready["model_id"] == load_bundle(default_bundle()).model_id
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("field", sorted(EDITS))
def test_serve_refuses_an_edited_decision_setting_with_exit_3(tmp_path, field):
    bundle = copy_default(tmp_path)
    edit_manifest(bundle, EDITS[field])
    out = serve(bundle, tmp_path)
    assert out.returncode == 3, out.stderr
    assert "refusing to start" in out.stderr and f"'{field}'" in out.stderr
    assert "facegate calibrate" in out.stderr and "FACEGATE_THRESHOLD" in out.stderr
    assert not (tmp_path / "g.sqlite").exists()  # refused before anything was opened


def test_serve_refuses_an_unsealed_bundle_unless_allowed(tmp_path):
    bundle = copy_default(tmp_path)
    edit_manifest(bundle, lambda m: m.pop("seal"))
    out = serve(bundle, tmp_path)
    assert out.returncode == 3 and "FACEGATE_ALLOW_UNSEALED=true" in out.stderr


def test_trusted_keys_refuse_unsigned_and_wrongly_signed_and_serve_signed(tmp_path):
    for name in ("trusted", "stranger"):
        assert main(["bundle", "keygen", str(tmp_path / f"{name}.pem"),
                     str(tmp_path / f"{name}.pub.pem")]) == 0
    env = {"FACEGATE_TRUSTED_KEYS": str(tmp_path / "trusted.pub.pem")}
    bundle = copy_default(tmp_path)
    out = serve(bundle, tmp_path, env)
    assert out.returncode == 3 and "unsigned" in out.stderr, out.stderr
    assert main(["bundle", "sign", str(bundle), "--key", str(tmp_path / "stranger.pem")]) == 0
    out = serve(bundle, tmp_path, env)
    assert out.returncode == 3 and "not among the trusted keys" in out.stderr, out.stderr

    assert main(["bundle", "sign", str(bundle), "--key", str(tmp_path / "trusted.pem")]) == 0
    proc = start_server(bundle, tmp_path / "g.sqlite", port := free_port(), env)
    try:
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
        assert ready["model_id"] == load_bundle(default_bundle()).model_id
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # Signed, then edited: the seal refuses it before the signature is even looked at.
    edit_manifest(bundle, EDITS["threshold"])
    out = serve(bundle, tmp_path, env)
    assert out.returncode == 3 and "'threshold'" in out.stderr


def test_a_resealed_threshold_is_a_model_change_for_the_gallery(tmp_path, celeba_index):
    who, photos = next(iter(people(celeba_index).items()))
    gallery = tmp_path / "g.sqlite"
    settings = Settings(bundle=default_bundle(), gallery=gallery, keep_crops=True, cpu_workers=2)
    with TestClient(create_app(settings)) as c:
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:2]]
        assert c.post("/v1/identities", data={"identity_id": who, "name": who}, files=files).status_code == 201

    resealed = copy_default(tmp_path)
    edit_manifest(resealed, lambda m: m.update(threshold=0.95))
    bundle, changed = seal_bundle(resealed)
    assert changed == ["threshold"] and bundle.model_id != load_bundle(default_bundle()).model_id
    probe = {"image": photos[2].read_bytes()}
    with TestClient(create_app(settings.model_copy(update={"bundle": resealed}))) as c:
        response = c.post("/v1/search", files=probe)
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "model_mismatch"
        assert "facegate gallery reembed" in response.json()["error"]["message"]
    assert main(["gallery", "reembed", "--bundle", str(resealed), "--gallery", str(gallery)]) == 0
    with TestClient(create_app(settings.model_copy(update={"bundle": resealed}))) as c:
        assert c.get("/readyz").json()["model_id"] == bundle.model_id
        body = c.post("/v1/search", files=probe).json()
        assert body["candidates"][0]["identity_id"] == who
