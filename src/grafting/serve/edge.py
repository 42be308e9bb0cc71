"""The HTTP server's edge checks: OpenAI error objects (:class:`APIError`), the API key, and request paths
that must stay inside the adapter root."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi.responses import JSONResponse

from .protocol import error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


BAD_KEY = "invalid or missing API key (send 'Authorization: Bearer <key>')"


def key_matches(headers, api_key: str) -> bool:
    """Whether the request's ``Authorization: Bearer`` token is ``api_key`` (compared in constant time)."""
    header = headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    return secrets.compare_digest(token.encode(), api_key.encode())


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = _KINDS.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, kind, status, param), status_code=status)


def inside_root(root: Path, path: str) -> Path:
    """``path`` under ``root`` (relative to it unless absolute); APIError 400 if it climbs with ``..``. Whether
    it resolves inside ``root``, symlinks followed, the pool checks when it loads it and at every later read
    (:func:`grafting.serve.host_tier.contained`), so one rule answers both the request and the reads."""
    p = Path(path)
    if ".." in p.parts:
        raise APIError(400, "lora_path may not contain '..'", param="lora_path")
    return p if p.is_absolute() else root / p


def field_of(message: str) -> str | None:
    """The field an engine error message names first ("max_tokens: expected ..."), for the error's param."""
    head = message.split(":", 1)[0]
    return head if message != head and head.isidentifier() else None
