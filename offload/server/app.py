"""The OpenAI-compatible routes, on Starlette: /v1/chat/completions, /v1/completions, /v1/models,
/health and /metrics. Requests are checked here (size, JSON, fields, model, context) and every refusal
is an OpenAI error object; generation itself happens on the worker thread (worker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import OffloadError
from ..sampling import SamplingParams
from . import protocol
from .errors import ApiError, invalid
from .metrics import CONTENT_TYPE, Metrics
from .worker import Finish, Job, Worker

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DISCONNECT_POLL_SECONDS = 0.5  # how often a waiting non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "demo"
    api_key: str | None = None  # None: no authentication
    max_body_bytes: int = 1 << 20
    max_queue: int = 256  # requests waiting for the worker before new ones get a 503

    def __post_init__(self):
        if not self.model_name:
            raise OffloadError("the served model name must not be empty")
        if self.api_key is not None and not self.api_key:
            raise OffloadError("--api-key must not be empty; leave it out to serve without authentication")
        if self.max_body_bytes < 1024:
            raise OffloadError(f"max_body_bytes={self.max_body_bytes} is too small for any request; give at least 1KiB")
        if self.max_queue < 1:
            raise OffloadError(f"max_queue={self.max_queue} must be at least 1")


def create_app(llm, config: ServerConfig) -> Starlette:
    """The ASGI app serving `llm` (an offload.Runtime, which the app's worker thread alone calls)."""
    if llm.tokenizer is None:
        raise OffloadError(f"{llm.path} has no tokenizer.json; the server needs one to read and write text")
    return _Server(llm, config).app


class _Server:
    def __init__(self, llm, config: ServerConfig):
        self.llm, self.config = llm, config
        self.context = llm.config.max_position_embeddings
        self.vocab = llm.config.vocab_size
        self.created = protocol.now()
        self.metrics = Metrics()
        self.worker = Worker(llm, self.metrics, config.max_queue)
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
        app = Starlette(routes=routes, exception_handlers=handlers, lifespan=self.lifespan)
        app.add_middleware(_CountRequests, metrics=self.metrics, routes={r.path for r in routes if "{" not in r.path})
        self.app = app

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(self.worker.stop)

    # ---- routes -----------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.config.model_name})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(self.llm.stats), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [protocol.model_card(self.config.model_name, self.created)]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        self._check_model(request.path_params["model_id"])
        return JSONResponse(protocol.model_card(self.config.model_name, self.created))

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        req = protocol.parse_chat(await self._json(request))
        self._check_model(req.model)
        try:
            ids = await run_in_threadpool(self.llm.tokenizer.encode_chat, list(req.messages))
        except OffloadError as exc:  # e.g. a role the chat template refuses
            raise invalid(str(exc), param="messages") from None
        job = self._submit(ids, req.sampling, default_max=None)
        rid, created, name = protocol.new_id("chatcmpl"), protocol.now(), self.config.model_name
        if req.stream:
            def chunk(text, finish=None, used=None):
                delta = None if text is None else ({"content": text} if finish is None else {})
                return protocol.chat_chunk(rid, created, name, delta, finish, used, req.include_usage)

            first = protocol.chat_chunk(rid, created, name, {"role": "assistant", "content": ""}, None, None,
                                        req.include_usage)
            return _EventStream(job, _events(job, chunk, first, req.include_usage))
        text, finish = await _collect(job, request)
        return JSONResponse(protocol.chat_response(rid, created, name, text, protocol.FINISH_REASONS[finish.reason],
                                                   _usage(finish)))

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        req = protocol.parse_completion(await self._json(request))
        self._check_model(req.model)
        if isinstance(req.prompt, str):
            ids = await run_in_threadpool(self.llm.tokenizer.encode, req.prompt)
        else:
            ids = list(req.prompt)
            if min(ids) < 0 or max(ids) >= self.vocab:
                raise invalid(f"prompt has token ids outside the vocabulary (0..{self.vocab - 1})", param="prompt",
                              code="invalid_value")
        job = self._submit(ids, req.sampling, default_max=DEFAULT_COMPLETION_TOKENS)
        rid, created, name = protocol.new_id("cmpl"), protocol.now(), self.config.model_name
        if req.stream:
            def chunk(text, finish=None, used=None):
                return protocol.completion_chunk(rid, created, name, text, finish, used, req.include_usage)

            return _EventStream(job, _events(job, chunk, None, req.include_usage))
        text, finish = await _collect(job, request)
        return JSONResponse(protocol.completion_response(rid, created, name, text,
                                                         protocol.FINISH_REASONS[finish.reason], _usage(finish)))

    # ---- checks -----------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    async def _json(self, request: Request):
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        body, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            body.append(chunk)
        try:
            return json.loads(b"".join(body), parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    def _submit(self, ids: list[int], sampling: protocol.Sampling, default_max: int | None) -> Job:
        """Check the prompt and the token budget against the context, then queue the generation."""
        room = self.context - len(ids)
        if not ids:
            raise invalid("the prompt is empty; give at least one token", param="prompt")
        if room < 1:
            raise invalid(f"the prompt is {len(ids)} tokens but the model's context is {self.context}; shorten it",
                          code="context_length_exceeded")
        wanted = sampling.max_tokens
        if wanted is not None and wanted > room:
            raise invalid(f"the model's context is {self.context} tokens; the prompt takes {len(ids)}, so at most "
                          f"{room} can be generated, not max_tokens={wanted}", param="max_tokens",
                          code="context_length_exceeded")
        limit = wanted if wanted is not None else min(default_max or room, room)
        try:
            params = SamplingParams.build(limit, sampling.temperature, sampling.top_k, sampling.top_p,
                                          sampling.seed, sampling.stop)
        except OffloadError as exc:
            raise invalid(str(exc)) from None
        job = Job(ids, params, self.context)
        self.worker.submit(job)
        return job


# ---- responses ---------------------------------------------------------------

def _usage(finish: Finish) -> dict:
    return protocol.usage(finish.prompt_tokens, finish.completion_tokens)


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(job: Job, chunk, first, include_usage: bool):
    """The SSE body: the first chunk, a chunk per text piece, the finish chunk, usage if asked, [DONE]."""
    if first is not None:
        yield _sse(first)
    while True:
        kind, value = await job.events.get()
        if kind == "text":
            yield _sse(chunk(value))
        elif kind == "error":
            yield _sse(value.body())
            break
        else:
            yield _sse(chunk("", protocol.FINISH_REASONS[value.reason]))
            if include_usage:
                yield _sse(chunk(None, used=_usage(value)))
            break
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """SSE response that cancels its job however it ends: done, failed, or the client disconnected
    (Starlette cancels the body's task when the client goes; a failed send raises)."""

    def __init__(self, job: Job, body):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _collect(job: Job, request: Request) -> tuple[str, Finish]:
    """The whole text of a non-streaming request; cancels the job if its client disconnects while waiting."""
    pieces = []
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ApiError(499, "the client closed the request", code="client_closed") from None
                continue
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise value
            else:
                return "".join(pieces), value
    finally:
        job.cancel()  # no-op once the job has finished


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes or more; this server takes at most {limit} "
                         "(--max-body)", code="request_too_large")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# ---- errors and counting -----------------------------------------------------

async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (no such route, wrong method) as OpenAI error objects."""
    if exc.status_code == 404:
        message, code = f"no route {request.method} {request.url.path}; see /v1/models", "not_found"
    elif exc.status_code == 405:
        message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    error = ApiError(exc.status_code, message, code=code)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


class _CountRequests:
    """ASGI middleware: counts answered requests by route and status for /metrics."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"]
            route = path if path in self.routes else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            self.metrics.request(route, status)
