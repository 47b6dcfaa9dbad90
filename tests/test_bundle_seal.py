"""The seal over a bundle's decision settings and the Ed25519 signature over the seal.

Real bundles (a real tiny ONNX graph, and copies of the committed default), real key
files, the real ``facegate bundle`` command in process; refusals by a real server process
are in tests/test_bundle_trust_server.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from facegate.core.bundle import add_file, load_bundle, sign_bundle
from facegate.core.seal import (
    SEALED_FIELDS,
    BundleSealError,
    canonical_json,
    check_seal,
    seal_digest,
)
from facegate.core.signing import (
    BundleSignatureError,
    generate_keypair,
    load_public_keys,
    verify_signature,
)
from facegate.server.services import load_served_bundle
from facegate.server.settings import Settings
from facegate.train.calibrate import write_calibrated_bundle
from server_support import default_bundle
from test_bundle import make_bundle

from facegate.cli import main

# A valid quality model (the default bundle's): an invalid one is refused by validation
# before the seal is looked at.
QUALITY_MODEL = json.loads((default_bundle() / "manifest.json").read_text())["quality_model"]
# A valid edit of each kind of decision setting (field named in the refusal, manifest edit).
DECISION_EDITS = [
    ("threshold", lambda m: m.update(threshold=0.1)),
    ("threshold_source", lambda m: m.update(threshold_source="uss-calibrated")),
    ("threshold_provenance", lambda m: m.update(threshold_provenance="learned, honestly")),
    ("input", lambda m: m["input"].update(mean=100.0)),
    ("output", lambda m: m["output"].update(name="features")),
    ("geometry", lambda m: m.pop("geometry")),
    ("files", lambda m: m["files"]["embedder.onnx"].update(precision="fp16")),
    ("quality_model", lambda m: m.update(quality_model=QUALITY_MODEL)),
]


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def copy_default(tmp_path: Path) -> Path:
    root = tmp_path / "default-copy"
    root.mkdir()
    for name in ("manifest.json", "embedder.onnx"):
        shutil.copy(default_bundle() / name, root / name)
    return root


def test_the_committed_default_bundle_is_sealed():
    bundle = load_bundle(default_bundle())
    assert bundle.sealed
    assert bundle.model_id == f"facegate-default@{bundle.version}#{bundle.digest[:12]}"
    assert bundle.manifest["seal"]["digest"] == bundle.digest == seal_digest(bundle.manifest)
    assert set(bundle.manifest["seal"]["fields"]) == set(SEALED_FIELDS)


@pytest.mark.parametrize(("field", "change"), DECISION_EDITS, ids=[f for f, _ in DECISION_EDITS])
def test_an_edited_decision_setting_is_refused_naming_the_field(tmp_path, field, change):
    make_bundle(tmp_path)
    edit_manifest(tmp_path / "bundle", change)
    with pytest.raises(BundleSealError, match=f"changed since the bundle was sealed: '{field}'") as err:
        load_bundle(tmp_path / "bundle")
    assert "facegate calibrate" in err.value.message and "FACEGATE_THRESHOLD" in err.value.message
    assert err.value.code == "bundle_seal_mismatch"


def test_absent_and_present_are_told_apart(tmp_path):
    make_bundle(tmp_path)
    edit_manifest(tmp_path / "bundle", lambda m: m.update(quality_model=QUALITY_MODEL))
    with pytest.raises(BundleSealError, match=r"'quality_model' \(absent when sealed, present now\)"):
        load_bundle(tmp_path / "bundle")
    # The error model is covered the same way (checked on the seal alone: core.manifest
    # validates an error_model's content before any seal is looked at).
    sealed = load_bundle(make_bundle(tmp_path).path).manifest  # rewritten: sealed again
    assert sealed["seal"]["fields"]["error_model"] is None  # absent, hashed as absent
    with pytest.raises(BundleSealError, match=r"'error_model' \(absent when sealed"):
        check_seal({**sealed, "error_model": {"form": "anything"}})
    with pytest.raises(BundleSealError, match=r"'threshold' = 0.5"):
        check_seal({**sealed, "threshold": 0.5})
    assert check_seal(sealed) and not check_seal({k: v for k, v in sealed.items() if k != "seal"})


def test_other_fields_and_formatting_keep_the_seal_and_the_model_id(tmp_path):
    written = make_bundle(tmp_path)
    path = tmp_path / "bundle" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["evaluation"] = {"note": "a record, not a decision setting"}
    # Reversed key order everywhere and no whitespace: canonical JSON is the same.
    path.write_text(json.dumps(dict(reversed(list(manifest.items()))), separators=(",", ":")))
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded.model_id == written.model_id and loaded.manifest["evaluation"]["note"]
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()


def test_a_non_finite_decision_setting_is_refused(tmp_path):
    make_bundle(tmp_path)
    (tmp_path / "bundle" / "e.plan").write_bytes(b"engine bytes")
    edit_manifest(tmp_path / "bundle", lambda m: m.pop("seal"))  # unsealed: the writer seals
    edit_manifest(tmp_path / "bundle", lambda m: m["files"]["embedder.onnx"].update(scale=float("nan")))
    with pytest.raises(BundleSealError, match="'files' holds a non-finite number"):
        add_file(tmp_path / "bundle", "e.plan")


def test_an_edited_seal_is_refused(tmp_path):
    make_bundle(tmp_path)
    edit_manifest(tmp_path / "bundle", lambda m: m["seal"].update(digest="0" * 64))
    with pytest.raises(BundleSealError, match="the seal was edited"):
        load_bundle(tmp_path / "bundle")


def test_every_writer_reseals_and_the_model_id_follows(tmp_path):
    first = make_bundle(tmp_path)
    (tmp_path / "bundle" / "e.plan").write_bytes(b"engine bytes")
    with_engine = add_file(tmp_path / "bundle", "e.plan")
    assert with_engine.sealed and with_engine.model_id != first.model_id
    assert load_bundle(tmp_path / "bundle").model_id == with_engine.model_id
    # calibrate's writer (write_bundle + add_file) seals the new threshold: another model.
    calibrated = write_calibrated_bundle(with_engine, tmp_path / "calibrated", threshold=0.3,
                                         provenance="a test calibration")
    assert calibrated.sealed and calibrated.threshold == 0.3
    assert calibrated.model_id not in (first.model_id, with_engine.model_id)
    # add_file does not seal an edit in passing.
    edit_manifest(tmp_path / "bundle", lambda m: m.update(threshold=0.1))
    with pytest.raises(BundleSealError, match="'threshold'"):
        add_file(tmp_path / "bundle", "e.plan")


def test_bundle_seal_accepts_an_edit_as_a_new_model(tmp_path, capsys):
    bundle = copy_default(tmp_path)
    before = load_bundle(bundle)
    edit_manifest(bundle, lambda m: m.update(threshold=0.5))
    assert main(["bundle", "seal", str(bundle)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["changed"] == ["threshold"]
    after = load_bundle(bundle)
    assert after.threshold == 0.5 and printed["model_id"] == after.model_id != before.model_id
    assert after.onnx_sha256 == before.onnx_sha256  # the embedder itself is untouched


def test_unsealed_bundles_are_served_only_when_allowed(tmp_path, caplog):
    bundle = copy_default(tmp_path)
    edit_manifest(bundle, lambda m: m.pop("seal"))
    assert not load_bundle(bundle).sealed  # tools still read (and re-seal) old bundles
    with pytest.raises(BundleSealError, match="no seal.*FACEGATE_ALLOW_UNSEALED=true"):
        load_served_bundle(Settings(bundle=bundle))
    caplog.set_level(logging.WARNING, logger="facegate.server.services")
    assert load_served_bundle(Settings(bundle=bundle, allow_unsealed=True)).path == bundle
    assert any("UNSEALED" in r.getMessage() for r in caplog.records)
    assert main(["bundle", "verify", str(bundle)]) == 1


def test_sign_and_verify_with_trusted_keys(tmp_path, capsys):
    assert main(["bundle", "keygen", str(tmp_path / "k.pem"), str(tmp_path / "k.pub.pem")]) == 0
    key_id = json.loads(capsys.readouterr().out)["key_id"]
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    with pytest.raises(Exception, match="exists"):
        generate_keypair(tmp_path / "k.pem", tmp_path / "new.pub.pem")
    bundle = copy_default(tmp_path)
    trusted = load_public_keys([tmp_path / "k.pub.pem"])
    with pytest.raises(BundleSignatureError, match="unsigned"):
        verify_signature(load_bundle(bundle).signature, load_bundle(bundle).digest, trusted)

    assert main(["bundle", "sign", str(bundle), "--key", str(tmp_path / "k.pem")]) == 0
    assert json.loads(capsys.readouterr().out)["signed_by"] == key_id
    assert main(["bundle", "verify", str(bundle), "--trusted-key", str(tmp_path / "k.pub.pem")]) == 0
    assert json.loads(capsys.readouterr().out)["verified_by"] == key_id
    assert main(["bundle", "verify", str(bundle), "--trusted-key", str(tmp_path / "other.pub.pem")]) == 1
    assert "not among the trusted keys" in capsys.readouterr().err
    signed = load_bundle(bundle)
    assert signed.model_id == load_bundle(default_bundle()).model_id  # signing seals nothing new
    assert load_served_bundle(Settings(bundle=bundle, trusted_keys=[tmp_path / "k.pub.pem"]))

    # A forged signature value, and a signature carried over to another seal.
    edit_manifest(bundle, lambda m: m["signature"].update(value=m["signature"]["value"][::-1]))
    with pytest.raises(BundleSignatureError, match="does not verify"):
        verify_signature(load_bundle(bundle).signature, signed.digest, trusted)
    with pytest.raises(BundleSignatureError, match="re-sealed after signing"):
        verify_signature(signed.signature, "f" * 64, trusted)


def test_a_rewrite_drops_the_signature_of_the_old_seal(tmp_path):
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    make_bundle(tmp_path)
    signed = sign_bundle(tmp_path / "bundle", tmp_path / "k.pem")
    assert signed.signature is not None
    (tmp_path / "bundle" / "e.plan").write_bytes(b"engine bytes")
    assert add_file(tmp_path / "bundle", "e.plan").signature is None
    assert load_bundle(tmp_path / "bundle").signature is None
