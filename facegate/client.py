"""A typed Python client for the facegate HTTP API (httpx).

    with FacegateClient("http://127.0.0.1:8000", api_key="...") as fg:
        result = fg.verify("a.jpg", "b.jpg")
        print(result.match, result.similarity)

Every method returns the server's pydantic response model; an error response raises
:class:`FacegateAPIError` with the HTTP status and the envelope's code and message.
"""

from __future__ import annotations

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
    EnrolResponse,
    IdentityInfo,
    IdentityList,
    Ready,
    SearchResponse,
    VerifyIdentityResponse,
    VerifyResponse,
)

ImageInput = bytes | str | os.PathLike[str]
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

    def verify(
        self, image1: ImageInput, image2: ImageInput, *, threshold: float | None = None
    ) -> VerifyResponse:
        files = {"image1": _image(image1, "image1"), "image2": _image(image2, "image2")}
        data = {"threshold": str(threshold)} if threshold is not None else None
        return self._call("POST", "/v1/verify", VerifyResponse, files=files, data=data)

    def search(self, image: ImageInput, *, k: int = 5) -> SearchResponse:
        files = {"image": _image(image, "image")}
        return self._call("POST", "/v1/search", SearchResponse, files=files, data={"k": str(k)})

    def verify_identity(self, image: ImageInput, identity_id: str) -> VerifyIdentityResponse:
        return self._call(
            "POST",
            "/v1/verify/identity",
            VerifyIdentityResponse,
            files={"image": _image(image, "image")},
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
