"""Identity metadata: a small JSON object of finite values, checked before anything is stored.

Metadata is the only free-form input the gallery keeps, and it is read back by every
listing, so one bad value must not be able to poison it: nesting deep enough to overflow
a JSON encoder or decoder, NaN/Infinity (not JSON; stored as null by lax encoders) or a
megabyte blob would break each later read for every user. :func:`parse_metadata` refuses
all three before a write; :func:`load_stored_metadata` keeps a gallery written by an older
version readable even if such a value got in.
"""

from __future__ import annotations

import json
import math
from typing import Any

from facegate.core.errors import FacegateError

DEFAULT_MAX_BYTES = 16_384
DEFAULT_MAX_DEPTH = 8
# What the store itself accepts and reads back, whatever a server allows: far below the
# nesting at which JSON encoders and pydantic overflow (~250 levels).
STORE_MAX_BYTES = 1_048_576
STORE_MAX_DEPTH = 64
UNREADABLE_KEY = "_unreadable_metadata"


class MetadataError(FacegateError):
    """Metadata that is not a small, shallow JSON object of finite values."""

    code = "validation_error"  # the code bad metadata always had: clients rely on it
    status = 422


def _reject_constant(name: str) -> Any:
    raise MetadataError(f"metadata may not contain {name} (not JSON; use a string or null)")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of ``value`` (a scalar is 0), iteratively: no recursion to overflow."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth) for child in children)
        elif isinstance(node, float) and not math.isfinite(node):
            raise MetadataError("metadata numbers must be finite")
    return deepest


def check_metadata(
    value: Any, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH
) -> str:
    """The canonical JSON text of ``value``, or MetadataError saying what is wrong."""
    if not isinstance(value, dict):
        raise MetadataError("metadata must be a JSON object")
    depth = _depth(value, max_depth)
    if depth > max_depth:
        raise MetadataError(f"metadata is nested deeper than {max_depth} levels")
    text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    size = len(text.encode())
    if size > max_bytes:
        raise MetadataError(f"metadata is {size} bytes as JSON; the limit is {max_bytes}")
    return text


def parse_metadata(
    text: str | None, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH
) -> dict[str, Any]:
    """A request's metadata text -> dict; MetadataError for anything :func:`check_metadata` refuses."""
    if not text:
        return {}
    if len(text.encode()) > max_bytes * 4:  # before parsing: whitespace cannot make it fit
        raise MetadataError(f"metadata text is over {max_bytes * 4} bytes; the limit is {max_bytes}")
    # Brackets bound the depth of any parse: refuse deeper text before the decoder recurses.
    if _bracket_depth(text) > max_depth:
        raise MetadataError(f"metadata is nested deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"metadata is not valid JSON: {exc.msg}") from None
    check_metadata(value, max_bytes=max_bytes, max_depth=max_depth)
    return value


def _bracket_depth(text: str) -> int:
    """Deepest bracket nesting outside JSON strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "}]":
            depth -= 1
    return deepest


def load_stored_metadata(text: str, *, max_depth: int = STORE_MAX_DEPTH) -> dict[str, Any]:
    """Stored metadata for a reader. A value no current version would store (too deep to
    encode, undecodable) is shown as ``{UNREADABLE_KEY: reason}`` instead of failing every
    listing; the row itself is left untouched."""
    if _bracket_depth(text) > max_depth:
        return {UNREADABLE_KEY: f"nested deeper than {max_depth} levels"}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return {UNREADABLE_KEY: f"not valid JSON ({type(exc).__name__})"}
    return value if isinstance(value, dict) else {UNREADABLE_KEY: "not a JSON object"}
