"""Ed25519 signatures over a bundle's seal digest (pyca/cryptography).

The seal makes an edit visible; anyone can still re-seal. A signature says who sealed:
a server given trusted public keys (``FACEGATE_TRUSTED_KEYS``) serves only bundles whose
seal digest one of them signed. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo
public); a key is named by the first 16 hex of the sha256 of its raw public bytes.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from facegate.core.errors import BundleError

__all__ = [
    "BundleSignatureError",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_keys",
    "sign_digest",
    "verify_signature",
]

ALGORITHM = "ed25519"
# Domain separation: a signature over a bundle seal can never pass for anything else.
_CONTEXT = b"facegate bundle seal v1\n"


class BundleSignatureError(BundleError):
    """A bundle is unsigned, signed by an untrusted key, or its signature does not verify."""

    code = "bundle_signature_invalid"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (the private file 0600, never overwritten); return its key id."""
    for path in (private_path, public_path):
        if path.exists():
            raise BundleError(f"{path}: exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not a readable unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 private key")
    return key


def load_public_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """key id -> key of each PEM public key file."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: not a readable PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise BundleError(f"{path}: not an Ed25519 public key")
        keys[key_id(key)] = key
    return keys


def sign_digest(private_key: Ed25519PrivateKey, digest: str) -> dict[str, Any]:
    """The manifest's ``signature`` section for a seal digest."""
    value = private_key.sign(_CONTEXT + digest.encode("ascii"))
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "digest": digest,
        "value": base64.b64encode(value).decode("ascii"),
    }


def verify_signature(
    signature: Any, digest: str, trusted: dict[str, Ed25519PublicKey], where: str = "bundle"
) -> str:
    """The id of the trusted key that signed ``digest``; else ``BundleSignatureError``."""
    if signature is None:
        raise BundleSignatureError(
            f"{where}: unsigned, and this server only serves bundles signed by one of its "
            f"trusted keys ({', '.join(sorted(trusted))}); sign it with `facegate bundle sign`"
        )
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        raise BundleSignatureError(f"{where}: 'signature' must be an {ALGORITHM} signature object")
    key = trusted.get(str(signature.get("key_id")))
    if key is None:
        raise BundleSignatureError(
            f"{where}: signed by key {signature.get('key_id')!r}, which is not among the "
            f"trusted keys ({', '.join(sorted(trusted))})"
        )
    if signature.get("digest") != digest:
        raise BundleSignatureError(
            f"{where}: the signature is over digest {str(signature.get('digest'))[:12]}..., the "
            f"bundle's seal is {digest[:12]}... (re-sealed after signing: sign it again)"
        )
    try:
        key.verify(base64.b64decode(str(signature.get("value")), validate=True),
                   _CONTEXT + digest.encode("ascii"))
    except (InvalidSignature, ValueError) as exc:
        raise BundleSignatureError(
            f"{where}: the signature does not verify under key {signature['key_id']}"
        ) from exc
    return signature["key_id"]
