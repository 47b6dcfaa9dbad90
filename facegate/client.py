"""A typed Python client for the facegate HTTP API (httpx).

    with FacegateClient("http://127.0.0.1:8000", api_key="...") as fg:
        result = fg.verify("a.jpg", "b.jpg")
        print(result.match, result.similarity)
        stored = fg.embed("a.jpg").embedding()  # keep this instead of the photo
        print(fg.verify(stored, "b.jpg").match)

Every method returns the server's pydantic response model; an error response raises
:class:`FacegateAPIError` with the HTTP status and the envelope's code and message.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from facegate.server.schemas import (
    ConsistencyResponse,
    Deleted,
    Embedding,
    EmbedResponse,
    EnrolResponse,
    IdentityInfo,
    IdentityList,
    Ready,
    SearchResponse,
    VerifyIdentityResponse,
    VerifyResponse,
)

ImageInput = bytes | str | os.PathLike[str]
Probe = ImageInput | Embedding  # a photo, or an embedding from FacegateClient.embed
M = TypeVar("M", bound=BaseModel)


class FacegateAPIError(Exception):
    """An error answer from the server: ``status``, ``code`` and ``message`` of its envelope."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


def _image(value: ImageInput, default_name: str) -> tuple[str, bytes]:
    if isinstance(value, bytes):
        return default_name, value
    path = Path(value)
    return path.name, path.read_bytes()


def _json_probe(value: Probe, image_key: str, embedding_key: str) -> dict[str, Any]:
    if isinstance(value, Embedding):
        return {embedding_key: value.model_dump()}
    return {image_key: base64.b64encode(_image(value, image_key)[1]).decode()}


class FacegateClient:
    """Synchronous client; ``admin_key`` is needed for enrol, add_templates and deletes."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._admin = {"X-Admin-Key": admin_key} if admin_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> FacegateClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, url: str, model: type[M] | None, **kwargs: Any) -> Any:
        response = self._http.request(method, url, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                code, message = error["code"], error["message"]
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", response.text[:500]
            raise FacegateAPIError(
                response.status_code, code, message, response.headers.get("x-request-id")
            )
        return model.model_validate(response.json()) if model else response.json()

    # -- verification -----------------------------------------------------------------

    def embed(self, image: ImageInput, *, all_faces: bool = False) -> EmbedResponse:
        """The embedding of the photo's face (with ``all_faces``, of each face, largest
        first); ``.embedding()`` is what verify and search take."""
        files = {"image": _image(image, "image")}
        data = {"all_faces": "true"} if all_faces else None
        return self._call("POST", "/v1/embed", EmbedResponse, files=files, data=data)

    def verify(
        self, probe1: Probe, probe2: Probe, *, threshold: float | None = None
    ) -> VerifyResponse:
        """Photos go as multipart; a request with an embedding goes as JSON."""
        if isinstance(probe1, Embedding) or isinstance(probe2, Embedding):
            body = {
                **_json_probe(probe1, "image1_b64", "embedding1"),
                **_json_probe(probe2, "image2_b64", "embedding2"),
                "threshold": threshold,
            }
            return self._call("POST", "/v1/verify", VerifyResponse, json=body)
        files = {"image1": _image(probe1, "image1"), "image2": _image(probe2, "image2")}
        data = {"threshold": str(threshold)} if threshold is not None else None
        return self._call("POST", "/v1/verify", VerifyResponse, files=files, data=data)

    def search(self, probe: Probe, *, k: int = 5, decide: bool = True) -> SearchResponse:
        """``decide=False``: investigation mode (candidates with estimated FPIR, no match)."""
        if isinstance(probe, Embedding):
            body = {**_json_probe(probe, "image_b64", "embedding"), "k": k, "decide": decide}
            return self._call("POST", "/v1/search", SearchResponse, json=body)
        files = {"image": _image(probe, "image")}
        data = {"k": str(k), "decide": "true" if decide else "false"}
        return self._call("POST", "/v1/search", SearchResponse, files=files, data=data)

    def verify_identity(self, probe: Probe, identity_id: str) -> VerifyIdentityResponse:
        if isinstance(probe, Embedding):
            body = {**_json_probe(probe, "image_b64", "embedding"), "identity_id": identity_id}
            return self._call("POST", "/v1/verify/identity", VerifyIdentityResponse, json=body)
        return self._call(
            "POST",
            "/v1/verify/identity",
            VerifyIdentityResponse,
            files={"image": _image(probe, "image")},
            data={"identity_id": identity_id},
        )

    # -- gallery ----------------------------------------------------------------------

    def enrol(
        self,
        name: str,
        images: Sequence[ImageInput],
        *,
        identity_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> EnrolResponse:
        data = {"name": name}
        if identity_id is not None:
            data["identity_id"] = identity_id
        if metadata is not None:
            data["metadata"] = json.dumps(metadata)
        files = [("images", _image(img, f"image{i}")) for i, img in enumerate(images)]
        return self._call(
            "POST", "/v1/identities", EnrolResponse, data=data, files=files, headers=self._admin
        )

    def add_templates(self, identity_id: str, images: Sequence[ImageInput]) -> EnrolResponse:
        files = [("images", _image(img, f"image{i}")) for i, img in enumerate(images)]
        return self._call(
            "POST",
            f"/v1/identities/{identity_id}/templates",
            EnrolResponse,
            files=files,
            headers=self._admin,
        )

    def list_identities(self, *, offset: int = 0, limit: int = 50) -> IdentityList:
        params = {"offset": offset, "limit": limit}
        return self._call("GET", "/v1/identities", IdentityList, params=params)

    def get_identity(self, identity_id: str) -> IdentityInfo:
        return self._call("GET", f"/v1/identities/{identity_id}", IdentityInfo)

    def delete_identity(self, identity_id: str) -> Deleted:
        return self._call("DELETE", f"/v1/identities/{identity_id}", Deleted, headers=self._admin)

    def delete_template(self, identity_id: str, template_id: str) -> Deleted:
        return self._call(
            "DELETE",
            f"/v1/identities/{identity_id}/templates/{template_id}",
            Deleted,
            headers=self._admin,
        )

    # -- monitoring -------------------------------------------------------------------

    def consistency(self) -> ConsistencyResponse:
        return self._call("GET", "/v1/consistency", ConsistencyResponse)

    def ready(self) -> Ready:
        """Readiness; raises FacegateAPIError only for errors other than 'not ready'."""
        response = self._http.get("/readyz")
        if response.status_code in (200, 503):
            return Ready.model_validate(response.json())
        raise FacegateAPIError(response.status_code, "http_error", response.text[:500])
