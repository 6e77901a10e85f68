"""The HTTP side: OpenAI's routes on Starlette, errors in OpenAI's shape, SSE streaming.
(Starlette without FastAPI: ~6 MB less resident, which a --ram budget feels.)"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from ..errors import TiercacheError
from .schema import ChatRequest, CompletionRequest
from .worker import Event, Job, QueueFull, Sampling, Worker

MAX_BODY = 8 << 20  # bytes; a request past it gets 413 before it is read
POLL_S = 0.25       # how often a waiting non-streamed request checks that its client is there


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param
        self.headers = headers


def error_body(message: str, type_: str, code=None, param=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def create_app(worker: Worker, model_id: str, context: int, api_key: str | None = None,
               aliases: tuple[str, ...] = (), max_body: int = MAX_BODY) -> Starlette:
    """The app serving `worker`'s engine as `model_id` (also answering to `aliases`)."""
    names, started = (model_id, *aliases), int(time.time())  # names[0] is the listed id

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_id, "queue": worker.queue_depth()})

    async def models(request):
        return JSONResponse({"object": "list", "data": [_model_card(model_id, started)]})

    async def model(request):
        _check_model(request.path_params["name"], names)
        return JSONResponse(_model_card(model_id, started))

    async def stats(request):
        return JSONResponse(_stats(worker))

    async def metrics(request):
        return PlainTextResponse(_prometheus(_stats(worker)))

    async def chat(request):
        req = await _parse(request, ChatRequest)
        _check_model(req.model, names)
        ids = _encode_chat(worker.tok, req)
        return await _respond(worker, request, req, ids, context, model_id, chat=True)

    async def complete(request):
        req = await _parse(request, CompletionRequest)
        _check_model(req.model, names)
        ids = _encode_raw(worker.tok, req.prompt, worker.engine.args.vocab_size)
        return await _respond(worker, request, req, ids, context, model_id, chat=False)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/models/{name:path}", model), Route("/stats", stats),
              Route("/metrics", metrics),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", complete, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers=_ERROR_HANDLERS,
                     middleware=[Middleware(Guard, api_key=api_key, max_body=max_body)])


async def _parse(request: Request, schema: type[BaseModel]):
    """The body as `schema`, or a 400 naming the first problem."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "malformed JSON body", code="invalid_json") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _invalid(e.errors()) from None


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "tiercache"}


def _check_model(name: str | None, names: tuple[str, ...]) -> None:
    if name and name not in names:
        raise ApiError(404, f"The model '{name}' does not exist (this server runs "
                            f"{names[0]})", "invalid_request_error",
                       "model_not_found", "model")


def _encode_chat(tok, req: ChatRequest) -> list[int]:
    try:
        return tok.encode_chat([m.as_template_message() for m in req.messages])
    except TiercacheError as e:  # the template rejects these messages (roles, order)
        raise ApiError(422, str(e), param="messages") from None


def _encode_raw(tok, prompt, vocab: int) -> list[int]:
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})",
                           code="invalid_value", param="prompt")
        return list(prompt)
    return tok.encode(prompt[0] if isinstance(prompt, list) else prompt)


def _sampling(req, ids: list[int], context: int, param: str) -> Sampling:
    """The request's settings; its token limit clipped to what the context has left."""
    room = context - len(ids)
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {context} tokens; the "
                            f"prompt has {len(ids)}", code="context_length_exceeded",
                       param=param)
    limit = min(req.token_limit() or room, room)
    return Sampling(limit, req.temperature, req.top_p, req.top_k, req.seed, req.stops())


async def _respond(worker: Worker, request: Request, req, ids, context, model_id, chat: bool):
    param = "messages" if chat else "prompt"
    if not ids:
        raise ApiError(400, "empty prompt", param=param)
    job = Job(ids, _sampling(req, ids, context, param), asyncio.get_running_loop())
    try:
        worker.submit(job)
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_exceeded", "queue_full",
                       headers={"Retry-After": str(e.retry_after)}) from None
    shape = _Shape(model_id, chat)
    if req.stream:
        return EventSourceResponse(_sse(job, shape, req.include_usage()), ping=15)
    return JSONResponse(await _whole(job, request, shape))


class _Shape:
    """OpenAI's response objects for one request (chat or text completion)."""

    def __init__(self, model_id: str, chat: bool):
        self.model, self.chat = model_id, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _obj(self, kind: str, choices: list, usage=None) -> dict:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def whole(self, text: str, last: Event) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": last.finish_reason, "logprobs": None}
            return self._obj("chat.completion", [choice], usage(last))
        choice = {"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": None}
        return self._obj("text_completion", [choice], usage(last))

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if not self.chat:
            return self._obj("text_completion", [{"index": 0, "text": text or "",
                                                  "finish_reason": finish, "logprobs": None}])
        delta = {"role": "assistant", "content": text or ""} if first else (
            {"content": text} if text else {})
        return self._obj("chat.completion.chunk", [{"index": 0, "delta": delta,
                                                    "finish_reason": finish, "logprobs": None}])

    def usage_chunk(self, last: Event) -> dict:
        return self._obj("chat.completion.chunk" if self.chat else "text_completion", [],
                         usage(last))


def usage(e: Event) -> dict:
    return {"prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens,
            "total_tokens": e.prompt_tokens + e.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": e.cached_tokens}}


async def _whole(job: Job, request: Request, shape: _Shape) -> dict:
    """Collect the answer; a client that leaves while waiting cancels its job."""
    parts = []
    while True:
        try:
            e = await asyncio.wait_for(job.events.get(), POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return {}
            continue
        if e.error:
            raise ApiError(e.error_status, e.error,
                           "server_error" if e.error_status >= 500 else "invalid_request_error")
        parts.append(e.text)
        if e.finish_reason:
            return shape.whole("".join(parts), e)


async def _sse(job: Job, shape: _Shape, include_usage: bool):
    """SSE data lines; sse-starlette cancels this generator when the client goes away."""
    try:
        first = True
        while True:
            e = await job.events.get()
            if e.error:
                kind = "server_error" if e.error_status >= 500 else "invalid_request_error"
                yield json.dumps(error_body(e.error, kind))
                return
            if shape.chat and first:  # OpenAI's first chunk names the role
                yield json.dumps(shape.chunk("", None, first=True))
            first = False
            if e.text:
                yield json.dumps(shape.chunk(e.text, None))
            if e.finish_reason:
                yield json.dumps(shape.chunk(None, e.finish_reason))
                if include_usage:
                    yield json.dumps(shape.usage_chunk(e))
                yield "[DONE]"
                return
    finally:
        job.cancel()  # a no-op for a finished job; stops one whose client left


def _stats(worker: Worker) -> dict:
    from ..memory import peak_memory, rss_bytes
    mem, how = peak_memory()
    return {"queue": worker.queue_depth(), "running": worker.running is not None,
            "max_queue": worker.max_queue, "requests": dict(worker.counters),
            "last_request": worker.last, "peak_memory_bytes": mem, "peak_memory_method": how,
            "rss_bytes": rss_bytes()}


def _prometheus(stats: dict, prefix: str = "tiercache") -> str:
    """The numeric leaves of /stats as Prometheus gauges."""
    lines = []

    def walk(d: dict, name: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{name}_{k}")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                lines.append(f"{name}_{k} {v}")
    walk(stats, prefix)
    return "\n".join(lines) + "\n"


async def _api_error(request, e: ApiError):
    return JSONResponse(error_body(str(e), e.type, e.code, e.param), e.status, headers=e.headers)


async def _http_error(request, e: HTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(e.detail), kind), e.status_code, headers=e.headers)


async def _crash(request, e: Exception):
    """500 in OpenAI's shape; Starlette then logs the traceback on the server's side."""
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), 500)


_ERROR_HANDLERS = {ApiError: _api_error, HTTPException: _http_error, Exception: _crash}


def _invalid(errors) -> ApiError:
    """pydantic's first complaint as one line: 400, as OpenAI answers any bad body."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ())]
    where = ".".join(loc) or "body"
    return ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", code="invalid_value",
                    param=loc[0] if loc else None)


class Guard:
    """Pure ASGI (it leaves `receive` alone, so disconnects still reach the streams): a body
    over `max_body` gets 413 before it is read, a /v1 call without the API key 401."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
            receive = self._counted(receive)
        await self.app(scope, receive, send)

    def _counted(self, receive):
        """A body sent without Content-Length (chunked) is cut off at max_body as it comes."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise ApiError(413, f"request body over {self.max_body} bytes",
                               code="request_too_large")
            return message
        return counted

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > self.max_body:
            return JSONResponse(error_body(f"request body over {self.max_body} bytes",
                                           "invalid_request_error", "request_too_large"), 413)
        if self.api_key and scope["path"].startswith("/v1/") and not _authorized(
                headers.get("authorization", ""), self.api_key):
            return JSONResponse(error_body("Incorrect API key provided", "invalid_request_error",
                                           "invalid_api_key"), 401)
        return None


def _authorized(header: str, api_key: str) -> bool:
    import hmac
    return header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(),
                                                                 api_key.encode())
