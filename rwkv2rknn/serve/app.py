"""The HTTP side: an OpenAI-compatible API on Starlette (served by uvicorn), over the engine.

Routes: GET / (the chat page), GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /v1/state/save, POST /v1/state/load, GET /v1/state. Streaming responses are server-sent events as the OpenAI
API sends them: `data: {json}\\n\\n` per chunk and `data: [DONE]\\n\\n` at the end. Errors are OpenAI-style JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from rwkv2rknn.serve import protocol, template
from rwkv2rknn.serve.engine import Engine, Job, QueueFull
from rwkv2rknn.serve.page import PAGE
from rwkv2rknn.serve.protocol import ApiError, Limits
from rwkv2rknn.serve.sampling import CHAT_DEFAULTS, COMPLETION_DEFAULTS, DEFAULT_MAX_TOKENS
from rwkv2rknn.serve.statefile import NAME_RE, StateFileError, fingerprint, read_saved, write_saved

MAX_BODY = 4 << 20  # bytes of JSON a request may send


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class ApiKeyMiddleware:
    """--api-key: every /v1/ route needs `Authorization: Bearer KEY` (the page and /health do not)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            auth = Headers(scope=scope).get("authorization", "")
            given = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(given, self.key):
                err = ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the key the "
                               "server was started with (--api-key)", code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Service:
    def __init__(self, engine: Engine, tokenizer, program, *, model_name: str, limits: Limits,
                 state_dir: Path, default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.engine, self.tok, self.program = engine, tokenizer, program
        self.model_name, self.limits, self.state_dir = model_name, limits, Path(state_dir)
        self.default_max_tokens = default_max_tokens
        self.vocab = engine.vocab
        self.created = int(time.time())
        self.init_fingerprint = fingerprint(engine.init_state)

    # -- helpers -------------------------------------------------------------------------------------------
    async def read_json(self, request: Request) -> dict:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                           code="unsupported_media_type")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
        try:
            body = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"We could not parse the JSON body of your request ({exc}). The body must be a JSON "
                           "object.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object", code="invalid_json")
        return body

    def check_model(self, body: dict, required: bool = True) -> None:
        model = body.get("model")
        if model is None and not required:
            return
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter (GET /v1/models lists it)", "model",
                           "missing_required_parameter")
        if model != self.model_name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def check_length(self, ids: list[int], param: str) -> None:
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"This model's maximum prompt length is {self.limits.max_prompt_tokens} tokens "
                           f"(--max-prompt-tokens); your prompt has {len(ids)}", param, "context_length_exceeded")

    def start(self, job: Job) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind, payload):
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        job._emit = emit
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            raise ApiError(503, f"The server is overloaded: {exc}", code="overloaded") from None
        return queue

    @staticmethod
    async def watch_disconnect(request: Request, job: Job) -> None:
        """A non-streaming request: cancel its job when the client goes away."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    async def result(self, request: Request, job: Job, queue: asyncio.Queue) -> dict:
        watcher = asyncio.create_task(self.watch_disconnect(request, job))
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "done":
                    return payload
                if kind == "error":
                    raise ApiError(500 if not isinstance(payload, QueueFull) else 503, f"generation failed: {payload}")
        finally:
            watcher.cancel()
            job.cancel()

    def stream(self, job: Job, queue: asyncio.Queue, rid: str, chat_mode: bool, include_usage: bool):
        model, created = self.model_name, int(time.time())

        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

        def piece(text: str, finish: str | None) -> dict:
            if chat_mode:
                return protocol.chat_chunk(rid, model, created, {"content": text} if finish is None else {}, finish)
            return protocol.completion_chunk(rid, model, created, text, finish)

        async def events():
            try:
                if chat_mode:
                    yield sse(protocol.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
                while True:
                    kind, payload = await queue.get()
                    texts = []
                    while kind == "text":  # what piled up since the last send goes as one chunk
                        texts.append(payload)
                        if queue.empty():
                            break
                        kind, payload = queue.get_nowait()
                    if texts:
                        yield sse(piece("".join(texts), None))
                    if kind == "done":
                        yield sse(piece("", payload["finish_reason"]))
                        if include_usage:
                            yield sse(protocol.usage_chunk(rid, model, created, payload["usage"], chat_mode))
                        yield "data: [DONE]\n\n"
                        return
                    if kind == "error":
                        yield sse(ApiError(500, f"generation failed: {payload}").body())
                        return
            finally:
                job.cancel()  # a client gone mid-stream: its job stops at the next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- routes --------------------------------------------------------------------------------------------
    async def page(self, request: Request):
        return HTMLResponse(PAGE)

    async def health(self, request: Request):
        return JSONResponse({**self.engine.health(), "model": self.model_name})

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "rwkv2rknn"}

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request):
        if request.path_params["model_id"] != self.model_name:
            raise ApiError(404, f"The model '{request.path_params['model_id']}' does not exist", "model",
                           "model_not_found")
        return JSONResponse(self.model_card())

    async def completions(self, request: Request):
        body = await self.read_json(request)
        self.check_model(body)
        ids = protocol.prompt_tokens(body, self.tok, self.vocab)
        self.check_length(ids, "prompt")
        params = protocol.gen_params(body, COMPLETION_DEFAULTS, self.limits, self.default_max_tokens)
        stream = protocol.flag(body, "stream")
        include_usage = protocol.stream_options(body) if stream else False
        job = Job("generate", ids, params)
        queue = self.start(job)
        rid = protocol.new_id("cmpl")
        if stream:
            return self.stream(job, queue, rid, False, include_usage)
        done = await self.result(request, job, queue)
        return JSONResponse(protocol.completion(rid, self.model_name, done["content"], done["finish_reason"],
                                                done["usage"]))

    async def chat_completions(self, request: Request):
        body = await self.read_json(request)
        self.check_model(body)
        msgs = protocol.messages(body)
        text = template.render(msgs)
        ids = self.tok.encode(text)
        self.check_length(ids, "messages")
        params = protocol.gen_params(body, CHAT_DEFAULTS, self.limits, self.default_max_tokens,
                                     extra_stops=[template.TURN_END])
        stream = protocol.flag(body, "stream")
        include_usage = protocol.stream_options(body) if stream else False

        def next_turn(content: str):
            full = template.render([*msgs, ("assistant", content)], generation_prompt=False)
            key = self.tok.encode(full)
            return key if key[:len(ids)] == ids else None

        job = Job("generate", ids, params, chat=True, next_turn=next_turn)
        queue = self.start(job)
        rid = protocol.new_id("chatcmpl")
        if stream:
            return self.stream(job, queue, rid, True, include_usage)
        done = await self.result(request, job, queue)
        return JSONResponse(protocol.chat(rid, self.model_name, done["content"], done["finish_reason"],
                                          done["usage"]))

    def state_path(self, body: dict) -> tuple[str, Path]:
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ApiError(400, "name must be 1-64 characters of letters, digits, '_', '-' or '.', starting with a "
                           "letter or digit", "name", "invalid_value")
        return name, self.state_dir / f"{name}.npz"

    async def state_save(self, request: Request):
        body = await self.read_json(request)
        self.check_model(body, required=False)
        name, path = self.state_path(body)
        if "messages" in body:
            ids = self.tok.encode(template.render(protocol.messages(body), generation_prompt=False))
        elif isinstance(body.get("prompt"), str) and body["prompt"] == "":
            ids = []
        else:
            ids = protocol.prompt_tokens(body, self.tok, self.vocab)
        self.check_length(ids, "messages" if "messages" in body else "prompt")
        job = Job("snapshot", ids)
        done = await self.result(request, job, self.start(job))
        size = await asyncio.to_thread(write_saved, path, self.program, done["state"], done["tokens"],
                                       done["logits"], self.init_fingerprint, self.model_name)
        return JSONResponse({"object": "state", "name": name, "tokens": len(ids), "cached_tokens": done["cached"],
                             "bytes": size})

    async def state_load(self, request: Request):
        body = await self.read_json(request)
        self.check_model(body, required=False)
        name, path = self.state_path(body)
        if not path.is_file():
            raise ApiError(404, f"no saved state named '{name}' (POST /v1/state/save writes one)", "name",
                           "state_not_found")
        try:
            saved = await asyncio.to_thread(read_saved, path, self.program, self.init_fingerprint)
        except StateFileError as exc:
            raise ApiError(400, f"state '{name}' does not fit this model: {str(exc).split(': ', 1)[-1]}", "name",
                           "state_mismatch") from None
        if not saved["tokens"] or saved["logits"] is None:
            raise ApiError(400, f"state '{name}' holds no tokens: nothing to continue from", "name", "state_empty")
        if not self.engine.cache.put(saved["tokens"], saved["state"], saved["logits"]):
            raise ApiError(400, "the state cache is off or too small for this state (--cache-mb)", "name",
                           "cache_disabled")
        return JSONResponse({"object": "state", "name": name, "tokens": len(saved["tokens"]), "cached": True})

    async def state_list(self, request: Request):
        names = sorted(p.stem for p in self.state_dir.glob("*.npz") if not p.name.startswith("."))
        return JSONResponse({"object": "list", "data": [{"object": "state", "name": n} for n in names]})


async def _api_error(request, exc: ApiError):
    return error_response(exc)


async def _http_error(request, exc: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=code))


async def _server_error(request, exc: Exception):
    return error_response(ApiError(500, f"internal error ({type(exc).__name__}); the server goes on"))


def create_app(service: Service, api_key: str | None = None) -> Starlette:
    s = service
    routes = [
        Route("/", s.page),
        Route("/health", s.health),
        Route("/v1/models", s.models),
        Route("/v1/models/{model_id:path}", s.model),
        Route("/v1/completions", s.completions, methods=["POST"]),
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
        Route("/v1/state/save", s.state_save, methods=["POST"]),
        Route("/v1/state/load", s.state_load, methods=["POST"]),
        Route("/v1/state", s.state_list),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(s.engine.close)

    middleware = [Middleware(ApiKeyMiddleware, key=api_key)] if api_key else []
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
