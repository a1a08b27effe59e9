"""The ASGI middleware in front of every API: API keys, and validation errors as 422 naming the field.

- Health (``/healthz``, ``/livez``), readiness (``/readyz``) and Prometheus metrics (``/metrics``) are open;
  the OpenAPI page and schema are open only with ``settings.serving.open_docs``; everything else needs a key,
  sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. No key: 401 (with
  ``WWW-Authenticate: Bearer``); a key that is not one of ours: 403. Keys are compared by their SHA-256
  digests with ``hmac.compare_digest`` against every configured key, so the time taken says nothing about
  how much of a key matched, or which one.
- BentoML answers a body that fails the request schema with 400 and pydantic's details; the guard turns
  that into 422 with ``fields`` (dotted paths such as ``member_ids.3``) and a one-line ``error`` that names
  them. The details never echo the input (BentoML drops it), so no member data reaches a log or a proxy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any

OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
DOC_PATHS = frozenset({"/", "/docs.json"})
DOC_PREFIX = "/static_content/"


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def key_matches(given: bytes, digests: Iterable[bytes]) -> bool:
    """True when ``given`` is one of the keys behind ``digests``; compares against all of them."""
    probe = _digest(given)
    ok = False
    for d in digests:
        ok |= hmac.compare_digest(probe, d)
    return ok


def _json_response(status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": data})


def field_name(loc: Iterable[Any]) -> str:
    """A pydantic error location as a dotted field path; the whole body when it is empty."""
    parts = [str(p) for p in loc]
    return ".".join(parts) if parts else "body"


def unprocessable(payload: Any) -> dict[str, Any]:
    """The 422 body for BentoML's 400 validation payload (or any other 400 body)."""
    detail = payload.get("detail") if isinstance(payload, dict) else None
    if not isinstance(detail, list):
        text = payload.get("error") if isinstance(payload, dict) else None
        if text is None and isinstance(payload, list) and payload and isinstance(payload[0], dict):
            text = payload[0].get("error")  # BentoML wraps its own 4xx messages in a one-item list
        return {"error": f"invalid request: {text or 'the body could not be read'}", "fields": ["body"],
                "detail": []}
    errors = [{"field": field_name(d.get("loc", ())), "message": d.get("msg", ""), "type": d.get("type", "")}
              for d in detail if isinstance(d, dict)]
    fields = list(dict.fromkeys(e["field"] for e in errors)) or ["body"]
    first = errors[0] if errors else {"field": "body", "message": "invalid"}
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return {"error": f"invalid request: {first['field']}: {first['message']}{more}", "fields": fields,
            "detail": errors}


class Guard:
    """ASGI middleware: ``Guard(app, keys=(...), open_docs=False)`` (BentoML passes ``app``)."""

    def __init__(self, app: Any, keys: Iterable[str] = (), open_docs: bool = False) -> None:
        self.app = app
        self.digests = tuple(_digest(k) for k in keys)
        self.open_docs = open_docs

    def _is_open(self, path: str) -> bool:
        if path in OPEN_PATHS:
            return True
        return self.open_docs and (path in DOC_PATHS or path.startswith(DOC_PREFIX))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._is_open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        key = None
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key":
                key = value.strip()
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                key = value[7:].strip()
        if not key:
            start, body = _json_response(401, {"error": "missing API key: send 'Authorization: Bearer <key>' "
                                                        "or 'X-API-Key: <key>'"},
                                         [(b"www-authenticate", b'Bearer realm="repurchase"')])
        elif not key_matches(key, self.digests):
            start, body = _json_response(403, {"error": "the API key is not accepted"})
        else:
            await self.app(scope, receive, self._rewrite_400(send))
            return
        await send(start)
        await send(body)

    @staticmethod
    def _rewrite_400(send: Any) -> Any:
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] == 400:
                held["start"] = message
                return
            if "start" not in held or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            try:
                payload = json.loads(b"".join(chunks) or b"null")
            except ValueError:
                payload = None
            keep = [(k, v) for k, v in held["start"].get("headers", ())
                    if k.lower() not in (b"content-length", b"content-type")]
            start, body = _json_response(422, unprocessable(payload), keep)
            await send(start)
            await send(body)

        return wrapped
