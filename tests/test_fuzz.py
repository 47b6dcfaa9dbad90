"""Fuzz the real app from its own OpenAPI schema (hypothesis): every documented operation
gets generated path parameters, query parameters, form fields, files and JSON bodies.

Properties, for every request: no 5xx; every error body is the JSON envelope; the gallery
changes only when a write answers 2xx. New routes are fuzzed as soon as they are in the
schema. ``FACEGATE_FUZZ_EXAMPLES`` (default 300) and ``FACEGATE_FUZZ_SEED`` run it longer
or with another seed; CI runs the fixed default so a failure reproduces.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from facegate.server.app import create_app
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from server_support import blank_png, default_bundle, gif_bytes, huge_declared_png, people

EXAMPLES = int(os.environ.get("FACEGATE_FUZZ_EXAMPLES", "300"))
SEED = int(os.environ.get("FACEGATE_FUZZ_SEED", "20261123"))
ADMIN = {"X-API-Key": "k", "X-Admin-Key": "a"}
WRITES = {"POST /v1/identities", "POST /v1/identities/{identity_id}/templates"}


@pytest.fixture(scope="module")
def photo(celeba_index) -> bytes:
    return next(iter(people(celeba_index).values()))[0].read_bytes()


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, photo):
    settings = Settings(
        bundle=default_bundle(),
        gallery=tmp_path_factory.mktemp("fuzz") / "gallery.sqlite",
        api_key="k",
        admin_key="a",
        cpu_workers=2,
        allow_threshold_override=True,
        max_images_per_request=3,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for identity_id in ("alice", "bob"):  # something to find, change and delete
            response = client.post(
                "/v1/identities",
                data={"name": identity_id, "identity_id": identity_id},
                files=[("images", ("p.jpg", photo, "image/jpeg"))],
                headers=ADMIN,
            )
            assert response.status_code == 201, response.text
        yield client


def operations(client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    schema = client.app.openapi()
    out = []
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            out.append((method.upper(), path, operation))
    return sorted(out, key=lambda op: (op[1], op[0]))


def gallery_state(client: TestClient) -> tuple:
    body = client.get("/v1/identities", params={"limit": 1000}, headers=ADMIN).json()
    return body["total"], sorted(
        (i["identity_id"], tuple(t["template_id"] for t in i["templates"])) for i in body["identities"]
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
texts = (
    st.sampled_from(["alice", "bob"])  # enrolled: reach the code behind the 404
    | st.sampled_from([".", "..", "", "0", "-1", "1e309", "a" * 300])
    | st.text(max_size=40)
)
numbers_as_text = st.sampled_from(["nan", "inf", "-inf", "1e6", "-1e6", "0.5", "", "x", "99999999999999999999"])


def image_bytes(photo: bytes) -> st.SearchStrategy[bytes]:
    return (
        st.just(photo)  # a face: reach detection, embedding and the gallery
        | st.sampled_from(
            [photo[: len(photo) // 2], blank_png(64), gif_bytes(), huge_declared_png(), b""]
        )
        | st.binary(max_size=64)
    )


def is_file(prop: dict[str, Any]) -> bool:
    """A file field, as OpenAPI 3.0 (format binary) or 3.1 (contentMediaType) says it."""
    item = prop.get("items", prop)
    return item.get("format") == "binary" or "contentMediaType" in item


def field_value(prop: dict[str, Any], photo: bytes) -> st.SearchStrategy[Any]:
    if is_file(prop):
        return image_bytes(photo)
    if prop.get("type") in ("integer", "number"):
        return st.integers(-10, 10**20).map(str) | numbers_as_text
    return texts | json_values.map(json.dumps) | numbers_as_text


def valid_value(name: str, prop: dict[str, Any], photo: bytes, required: set[str]) -> Any:
    """A value the route accepts: a face for files, a small k, an enrolled id where one is
    required; None (leave it out) for optional fields."""
    if is_file(prop):
        return photo
    if name not in required:
        return None
    return "3" if prop.get("type") in ("integer", "number") else "alice"


def valid_request(op: tuple[str, str, dict[str, Any]], photo: bytes) -> dict[str, Any] | None:
    """A request the route accepts (multipart routes without path parameters), or None."""
    method, path, operation = op
    content = operation.get("requestBody", {}).get("content", {})
    schema = resolve(content.get("multipart/form-data", {}).get("schema", {}))
    if not schema or "{" in path:
        return None
    required = set(schema.get("required", []))
    data, files = {}, []
    for name, prop in schema.get("properties", {}).items():
        value = valid_value(name, prop, photo, required)
        if isinstance(value, bytes):
            files.append((name, ("face.jpg", value, "image/jpeg")))
        elif value is not None:
            data[name] = value
    return {"method": method, "url": path, "op": f"{method} {path}", "data": data, "files": files}


def request_for(op: tuple[str, str, dict[str, Any]], photo: bytes) -> st.SearchStrategy[dict]:
    method, path, operation = op
    params = operation.get("parameters", [])
    path_names = [p["name"] for p in params if p["in"] == "path"]
    query_names = [p["name"] for p in params if p["in"] == "query"]
    content = operation.get("requestBody", {}).get("content", {})

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        url = path
        for name in path_names:
            url = url.replace("{" + name + "}", quote(draw(texts), safe="") or "x")
        query = {n: draw(st.integers(-5, 10**20).map(str) | texts) for n in query_names
                 if draw(st.booleans())}
        kwargs: dict[str, Any] = {"params": query}
        kinds = sorted(content)
        if kinds:
            kind = draw(st.sampled_from(kinds))
            if kind.startswith("multipart"):
                kwargs.update(draw(multipart(content[kind].get("schema", {}))))
            elif kind == "application/json":
                kwargs["content"] = draw(json_body(content[kind].get("schema", {})))
                kwargs["headers"] = {"content-type": "application/json"}
        return {"method": method, "url": url, "op": f"{method} {path}", **kwargs}

    def multipart(schema: dict[str, Any]) -> st.SearchStrategy[dict]:
        schema = resolve(schema)
        props = schema.get("properties", {})

        required = set(schema.get("required", []))

        @st.composite
        def fields(draw: st.DrawFn) -> dict[str, Any]:
            # Half the bodies are valid but for (at most) one field, so that the draw
            # reaches detection, embedding and gallery writes, not only validation.
            mutated = draw(st.sampled_from([*props, None])) if draw(st.booleans()) else "all"
            data, files = {}, []
            for name, prop in props.items():
                if mutated in ("all", name):
                    if draw(st.integers(0, 9)) == 0:  # now and then leave a field out
                        continue
                    value = draw(field_value(prop, photo))
                else:
                    value = valid_value(name, prop, photo, required)
                    if value is None:
                        continue
                if isinstance(value, bytes):
                    count = draw(st.integers(1, 4)) if prop.get("type") == "array" else 1
                    files += [(name, (f"f{i}.jpg", value, "image/jpeg")) for i in range(count)]
                else:
                    data[name] = value
            return {"data": data, "files": files or None}

        return fields()

    def json_body(schema: dict[str, Any]) -> st.SearchStrategy[bytes]:
        schema = resolve(schema)
        props = schema.get("properties", {})
        good_b64 = base64.b64encode(photo).decode()
        value = st.one_of(json_values, st.just(good_b64), st.sampled_from([float("nan"), 1e6, -1.0]))
        obj = st.fixed_dictionaries({}, optional={name: value for name in props})
        # A valid body (photos for every *_b64 side, required ids) with one field redrawn.
        valid = {n: good_b64 for n in props if n.endswith("_b64")}
        valid |= {n: "alice" for n in schema.get("required", []) if n not in valid}
        one_off = st.sampled_from(sorted(props) or ["_"]).flatmap(
            lambda name: value.map(lambda v: {**valid, name: v})
        )
        raw = st.binary(max_size=40)
        return (obj | one_off).map(lambda o: json.dumps(o, allow_nan=True).encode()) | raw

    return build()


_SCHEMAS: dict[str, Any] = {}


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return _SCHEMAS.get(ref.rsplit("/", 1)[-1], {}) if ref else schema


def test_no_input_gives_a_5xx_a_bare_error_or_a_silent_gallery_change(app_client, photo):
    ops = [op for op in operations(app_client) if op[1] not in ("/docs", "/redoc")]
    _SCHEMAS.update(app_client.app.openapi().get("components", {}).get("schemas", {}))
    assert {f"{m} {p}" for m, p, _ in ops} >= WRITES | {"POST /v1/verify", "GET /v1/identities"}
    requests = st.one_of(*(request_for(op, photo) for op in ops))
    seen: dict[str, set[int]] = {}

    def probe(request: dict[str, Any], keyed: bool) -> None:
        request = dict(request)
        op = request.pop("op")
        headers = {**(ADMIN if keyed else {}), **request.pop("headers", {})}
        before = gallery_state(app_client)
        try:
            response = app_client.request(headers=headers, **request)
        except httpx.InvalidURL:
            return  # the client refuses to send it; nothing reached the server
        seen.setdefault(op, set()).add(response.status_code)
        assert response.status_code < 500, f"{op}: {response.status_code} {response.text[:300]}"
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
            assert len(response.content) < 2000
        after = gallery_state(app_client)
        wrote = op in WRITES or op.startswith("DELETE ")
        if not (wrote and 200 <= response.status_code < 300):
            assert after == before, f"{op} answered {response.status_code} yet changed the gallery"

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=requests, keyed=st.integers(0, 4).map(bool))  # keys sent 4 times in 5
    def check(request: dict[str, Any], keyed: bool) -> None:
        probe(request, keyed)

    # One fully valid request per multipart route first, whatever the draw: the property
    # must also hold where a write succeeds (a route added later shifts the random draw).
    for op in ops:
        valid = valid_request(op, photo)
        if valid is not None:
            probe(valid, keyed=True)
    check()
    print({op: sorted(codes) for op, codes in sorted(seen.items())})
    assert len(seen) >= len(ops) - 2  # the draw reached (almost) every operation
    successes = {op for op, codes in seen.items() if any(200 <= c < 300 for c in codes)}
    assert {"POST /v1/verify", "POST /v1/identities"} <= successes  # and got past validation
