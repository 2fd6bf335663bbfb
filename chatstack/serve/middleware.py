"""What every request passes through: the gate (Host header check 400, body-size limit 413, API keys 401,
per-endpoint request counts) and the error handlers that turn every failure into OpenAI's error envelope, never a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatstack.serve import protocol as P

log = logging.getLogger("chatstack.serve")
API_PREFIXES = ("/v1/", "/rank/api/")
# request body models by path: an empty body's error names their required fields
BODY_MODELS = {
    "/v1/chat/completions": P.ChatCompletionRequest,
    "/v1/completions": P.CompletionRequest,
    "/rank/api/sample": P.RankSampleRequest,
    "/rank/api/submit": P.RankSubmitRequest,
}


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as {\"error\": {message, type, param, code}}."""

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, exc: P.APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = str(e.get("msg", "invalid request")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif e.get("type") == "lone_surrogate":
            param = e.get("ctx", {}).get("param")  # where in the body (the message says it too)
        elif e.get("type") == "missing" and param is None:  # no body at all
            model = BODY_MODELS.get(request.url.path)
            need = [n for n, f in model.model_fields.items() if f.is_required()] if model else []
            msg = "the request body is empty: send a JSON object" + (
                f" with {', '.join(repr(n) for n in need)}" if need else ""
            )
            param = need[0] if need else None
        elif e.get("type") == "missing":
            msg = f"missing required field '{param}'"
        else:
            msg = f"{param}: {msg}" if param else msg
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return JSONResponse(P.error_body(msg, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
        }.get(exc.status_code, "invalid_request_error")
        code = {413: "request_too_large"}.get(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse(
            P.error_body(detail, kind, None, code), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(P.error_body("internal server error", "server_error"), status_code=500)


KNOWN_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/rank/api/sample",
    "/rank/api/submit",
    "/rank/api/prompt",
    "/rank/api/config",
)


class Gate:
    """Pure ASGI middleware (a BaseHTTPMiddleware would copy every streamed chunk through an extra task):
    body-size limit (413), API keys on /v1 and /rank/api (401), and per-endpoint request counts."""

    def __init__(self, app, state):
        self.app, self.st = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg, path = self.st.cfg, scope["path"]
        is_api = path.startswith(API_PREFIXES)
        label = path if path in KNOWN_PATHS else ("/v1/models/*" if path.startswith("/v1/models/") else "other")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        def count(status: int):
            if is_api:
                self.st.metrics.requests.inc(1, label, str(status))

        async def reject(status: int, body: dict):
            count(status)
            await JSONResponse(body, status_code=status)(scope, receive, send)

        if cfg.allowed_hosts and allowed_hosts(
            cfg.allowed_hosts
        ):  # DNS rebinding: a web page whose own name resolves to this host
            host = headers.get("host", "")
            if host_name(host) not in allowed_hosts(cfg.allowed_hosts):
                return await reject(
                    400,
                    P.error_body(
                        f"Host header {host!r} is not one this server answers to (--allowed-hosts {cfg.allowed_hosts})",
                        "invalid_request_error",
                        None,
                        "host_not_allowed",
                    ),
                )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            cl = headers.get("content-length")
            if cl is not None and (not cl.isdigit() or int(cl) > cfg.max_body_bytes):
                return await reject(
                    413,
                    P.error_body(
                        f"request body of {cl} bytes exceeds the limit of {cfg.max_body_bytes} bytes",
                        "invalid_request_error",
                        None,
                        "request_too_large",
                    ),
                )
            if cl is None:  # chunked upload: count bytes as they arrive
                receive = _limited_receive(receive, cfg.max_body_bytes)
        if is_api and cfg.api_keys:
            auth = headers.get("authorization", "")
            key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if key not in cfg.api_keys:
                why = "missing API key (send 'Authorization: Bearer KEY')" if not key else "incorrect API key provided"
                return await reject(401, P.error_body(why, "invalid_request_error", None, "invalid_api_key"))
        if not is_api:
            return await self.app(scope, receive, send)

        async def counting_send(msg):
            if msg["type"] == "http.response.start":
                count(msg["status"])
            await send(msg)

        await self.app(scope, receive, counting_send)


def allowed_hosts(spec: str) -> set[str]:
    """The host names in a comma-separated --allowed-hosts value, lower case; '*' (or nothing) = any."""
    names = {h.strip().lower() for h in spec.split(",") if h.strip()}
    return set() if "*" in names else names


def host_name(host: str) -> str:
    """The name in a Host header, without the port: "localhost:8000" -> "localhost", "[::1]:80" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def _limited_receive(receive, limit: int):
    seen = 0

    async def wrapped():
        nonlocal seen
        msg = await receive()
        if msg.get("type") == "http.request":
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge(limit)  # FastAPI re-raises HTTPExceptions from body reading
        return msg

    return wrapped
