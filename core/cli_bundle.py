"""``facegate bundle seal|sign|verify|keygen``: a bundle's seal and Ed25519 signature.

Every bundle writer already seals (``core.bundle``); ``seal`` is the deliberate way to
turn an edited or pre-seal bundle into a (new) model, ``sign`` vouches for a seal with a
private key, ``verify`` checks files, seal and (given trusted keys) the signature as the
server does at start-up. Each prints JSON; exit status 1 on a refused bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from facegate.core.errors import FacegateError
from facegate.core.seal import BundleSealError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    seal = sub.add_parser("seal", help="seal a bundle's current decision settings (new model_id)")
    seal.add_argument("bundle", type=Path)
    sign = sub.add_parser("sign", help="sign a sealed bundle's digest with an Ed25519 key")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="private key PEM (bundle keygen)")
    verify = sub.add_parser("verify", help="check files, seal and signature as the server does")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--trusted-key", type=Path, action="append", default=[],
                        help="public key PEM; repeat for several (as FACEGATE_TRUSTED_KEYS)")
    keygen = sub.add_parser("keygen", help="write a new Ed25519 key pair (PEM)")
    keygen.add_argument("private_key", type=Path, help="private key file to create (mode 0600)")
    keygen.add_argument("public_key", type=Path, help="public key file to create")


def _summary(bundle: Any) -> dict[str, Any]:
    signature = bundle.signature
    return {
        "bundle": str(bundle.path),
        "model_id": bundle.model_id,
        "digest": bundle.digest,
        "sealed": bundle.sealed,
        "signed_by": signature.get("key_id") if isinstance(signature, dict) else None,
    }


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from facegate.core import bundle as bundles
    from facegate.core import signing

    if args.bundle_command == "keygen":
        return {"key_id": signing.generate_keypair(args.private_key, args.public_key),
                "private_key": str(args.private_key), "public_key": str(args.public_key)}
    if args.bundle_command == "seal":
        sealed, changed = bundles.seal_bundle(args.bundle)
        return {**_summary(sealed), "changed": changed}
    if args.bundle_command == "sign":
        return _summary(bundles.sign_bundle(args.bundle, args.key))
    loaded = bundles.load_bundle(args.bundle)
    if not loaded.sealed:
        raise BundleSealError(f"{loaded.path}: not sealed (the server refuses it unless "
                              "FACEGATE_ALLOW_UNSEALED=true); `facegate bundle seal` seals it")
    summary = _summary(loaded)
    if args.trusted_key:
        summary["verified_by"] = signing.verify_signature(
            loaded.signature, loaded.digest, signing.load_public_keys(args.trusted_key),
            str(loaded.path))
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        summary = _run(args)
    except FacegateError as err:
        print(f"facegate bundle {args.bundle_command}: {err.code}: {err.message}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0
