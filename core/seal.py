"""The seal of a bundle: one digest over every manifest field that changes a decision.

Files are pinned by sha256, but a manifest is plain JSON: an edited ``threshold`` would
otherwise be served as the calibrated one under the same model id. Every bundle writer
(``core.bundle``) stores ``seal`` = a sha256 per field of ``SEALED_FIELDS`` (null: the
field was absent) and the digest over them; ``Bundle.model_id`` derives from that digest,
so a bundle whose decision settings changed is another model, and a manifest edited by
hand no longer matches its seal and is refused, naming the field. Pure functions.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from facegate.core.errors import BundleError

__all__ = [
    "RESEAL_HINT",
    "SEAL_KEY",
    "SEALED_FIELDS",
    "SIGNATURE_KEY",
    "BundleSealError",
    "canonical_json",
    "check_seal",
    "make_seal",
    "seal_digest",
]

SEAL_KEY = "seal"
SIGNATURE_KEY = "signature"
SEAL_VERSION = 1
# Every manifest field a decision depends on, absent ones included (hashed as absent):
# what is compared, how crops are made and fed, which files embed, how errors are modelled.
SEALED_FIELDS = (
    "schema",
    "embedding_size",
    "input",
    "geometry",
    "output",
    "threshold",
    "threshold_source",
    "threshold_provenance",
    "files",
    "error_model",
    "quality_model",
)
RESEAL_HINT = (
    "Decision settings change only through a writer that seals them: `facegate calibrate` "
    "(from the original bundle, --out NEW), `facegate export onnx`, or deliberately "
    "`facegate bundle seal BUNDLE` (a new model_id: galleries re-embed). To serve another "
    "threshold, leave the bundle as written and set FACEGATE_THRESHOLD (reported as "
    "threshold_source 'operator')."
)


class BundleSealError(BundleError):
    """A bundle's decision settings differ from its seal, or its seal is unusable."""

    code = "bundle_seal_mismatch"


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same value always gives the same bytes."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _field_digests(manifest: dict[str, Any]) -> dict[str, str | None]:
    digests: dict[str, str | None] = {}
    for name in SEALED_FIELDS:
        try:
            digests[name] = _sha256(canonical_json(manifest[name])) if name in manifest else None
        except ValueError as exc:  # NaN or infinity: JSON reads them, no canonical form has them
            raise BundleSealError(f"manifest: '{name}' holds a non-finite number ({exc})") from exc
    return digests


def _digest_of(version: int, fields: dict[str, str | None]) -> str:
    return _sha256(canonical_json({"version": version, "fields": fields}))


def seal_digest(manifest: dict[str, Any]) -> str:
    """The digest of the manifest's decision settings as they are now (seal or not)."""
    return _digest_of(SEAL_VERSION, _field_digests(manifest))


def make_seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``seal`` section for ``manifest`` (its own seal and signature are not covered)."""
    fields = _field_digests(manifest)
    return {
        "version": SEAL_VERSION,
        "algorithm": "sha256 of canonical JSON (sorted keys, no whitespace)",
        "fields": fields,
        "digest": _digest_of(SEAL_VERSION, fields),
    }


def _describe(name: str, sealed: Any, now: str | None, value: Any) -> str:
    if sealed is None:
        return f"'{name}' (absent when sealed, present now)"
    if now is None:
        return f"'{name}' (present when sealed, absent now)"
    shown = f" = {value!r}" if isinstance(value, int | float | str) and len(repr(value)) < 40 else ""
    return f"'{name}'{shown} (sealed sha256 {str(sealed)[:12]}..., now {now[:12]}...)"


def check_seal(manifest: dict[str, Any], where: str = "manifest") -> bool:
    """True when sealed and matching, False when there is no seal; else ``BundleSealError``
    naming each changed field and how to re-seal or override honestly."""
    seal = manifest.get(SEAL_KEY)
    if seal is None:
        return False
    if not (isinstance(seal, dict) and isinstance(seal.get("fields"), dict)
            and isinstance(seal.get("digest"), str)):
        raise BundleSealError(f"{where}: 'seal' must be an object with 'fields' and 'digest'")
    if seal.get("version") != SEAL_VERSION:
        raise BundleSealError(
            f"{where}: seal version {seal.get('version')!r} is not {SEAL_VERSION} (sealed by "
            "another facegate?)"
        )
    now = _field_digests(manifest)
    sealed = seal["fields"]
    changed = [
        _describe(name, sealed.get(name), now[name], manifest.get(name))
        for name in SEALED_FIELDS
        if sealed.get(name) != now[name]
    ]
    if changed:
        raise BundleSealError(
            f"{where}: decision settings changed since the bundle was sealed: "
            f"{', '.join(changed)}. {RESEAL_HINT}"
        )
    if seal["digest"] != _digest_of(SEAL_VERSION, sealed):
        raise BundleSealError(
            f"{where}: the seal's digest does not match its own fields (the seal was edited). "
            f"{RESEAL_HINT}"
        )
    return True
