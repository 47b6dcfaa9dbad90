"""``facegate keys``: create, list and revoke the server's named API keys.

The key file (``--keys-file``, default ``FACEGATE_KEYS_FILE`` or ``var/keys.json``) holds
only hashes; ``create`` prints the secret once. A running server picks changes up at its
next request, so a revoked key stops working without a restart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from facegate.server.keys import SCOPES

DEFAULT_FILE = Path("var/keys.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys-file", type=Path, default=None,
                        help="key file (default FACEGATE_KEYS_FILE or var/keys.json)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a key and print its secret (shown once)")
    create.add_argument("name")
    create.add_argument("--scope", action="append", choices=SCOPES, required=True,
                        help="repeat for several; admin grants every scope")
    create.add_argument("--rate", type=float, default=None, help="requests per second allowed")
    revoke = actions.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")
    actions.add_parser("list", help="list keys (names, scopes, never secrets)")


def run(args: argparse.Namespace) -> int:
    from facegate.server.keys import KeyFile
    from facegate.server.settings import Settings

    keys = KeyFile(args.keys_file or Settings().keys_file or DEFAULT_FILE)
    try:
        if args.action == "create":
            print(keys.create(args.name, args.scope, args.rate))
        elif args.action == "revoke":
            keys.revoke(args.name)
            print(f"revoked {args.name}")
        else:
            for r in keys.records():
                state = "revoked " + time.strftime("%Y-%m-%d", time.gmtime(r.revoked_at)) if r.revoked_at else "live"
                rate = f" {r.rate_per_s:g}/s" if r.rate_per_s else ""
                print(f"{r.name}\t{','.join(r.scopes)}{rate}\t{state}")
    except (ValueError, OSError) as e:
        print(f"facegate keys: {e}", file=sys.stderr)
        return 1
    return 0
