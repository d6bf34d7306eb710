"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health.

Requests are bounded before any work is done (body size, prompt tokens, max_tokens, choices,
stop strings, messages); a bad request gets a 4xx with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``. Streaming answers are server-sent events,
one JSON chunk per text piece, then ``data: [DONE]``. Generation runs on the engine's worker
thread; handlers only queue jobs and relay their events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from atoll.errors import AtollError
from atoll.serve.engine import Choice, Engine, EngineBusy, Event, Job
from atoll.serve.textgen import SamplingParams, encode_prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_prompt_tokens: int = 1024
    max_tokens: int = 256
    max_choices: int = 4
    max_stop: int = 4
    max_stop_chars: int = 64
    max_messages: int = 64
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code)


def error_response(
    status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # Unknown fields are ignored: clients send fields this server has no use for.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="atoll extension: sample among the k most likely tokens")
    repetition_penalty: float = Field(
        1.0, gt=0, le=10, description="atoll extension: CTRL-style penalty on repeated tokens"
    )
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: Any = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionBody(_Body):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt is an empty list")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------- helpers


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"{loc}: {err['msg']}" if loc else err["msg"], param=loc or None) from None


async def _read_json(request: Request, limit: int) -> Any:
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    where = _not_unicode(data)
    if where is not None:
        raise ApiError(
            400,
            f"{where or 'the body'} holds a lone surrogate escape (e.g. \\ud800) that is not Unicode text: "
            "send text as UTF-8, with surrogate escapes only in pairs",
            param=where or None,
        )
    return data


def _not_unicode(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string in `value` that cannot be UTF-8 (JSON allows a lone
    surrogate escape such as "\\ud800"; no tokenizer can take it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = _not_unicode(key, path) if isinstance(key, str) else None
        if where is not None:
            return where
        found = _not_unicode(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class _Prepared:
    choices: list[Choice]
    prompt_tokens: int
    prompts: list[str]


class Server:
    """The state behind the routes: engine, names, limits, key."""

    def __init__(self, engine: Engine, *, model_name: str, limits: Limits, api_key: str | None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.limits = limits
        self.api_key = api_key
        self.context = engine.model.cfg.max_seq_len
        self.created = int(time.time())

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")

    def check_common(self, body: _Body, *, num_prompts: int) -> None:
        lim = self.limits
        if body.model is not None and body.model != self.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; this server has {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        if num_prompts * body.n > lim.max_choices:
            raise ApiError(
                400, f"{num_prompts * body.n} completions asked for (prompts x n); at most {lim.max_choices}", param="n"
            )
        stops = body.stops()
        if len(stops) > lim.max_stop or any(len(s) > lim.max_stop_chars for s in stops):
            raise ApiError(
                400, f"at most {lim.max_stop} stop strings of at most {lim.max_stop_chars} characters", param="stop"
            )
        if body.frequency_penalty or body.presence_penalty:
            raise ApiError(
                400,
                "frequency_penalty and presence_penalty are not supported; use repetition_penalty",
                param="frequency_penalty",
            )
        if body.logprobs not in (None, False):
            raise ApiError(400, "logprobs are not supported", param="logprobs")

    def prepare(self, body: _Body, prompts: list[str], max_tokens: int | None) -> _Prepared:
        lim = self.limits
        ids = []
        for prompt in prompts:
            try:
                ids.append(encode_prompt(self.tokenizer, prompt, max_tokens=lim.max_prompt_tokens))
            except AtollError as exc:
                raise ApiError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        room = self.context - max(len(i) for i in ids)
        if max_tokens is None:
            max_tokens = min(lim.max_tokens, room)
        if max_tokens > lim.max_tokens:
            raise ApiError(
                400, f"max_tokens is {max_tokens}; this server allows at most {lim.max_tokens}", param="max_tokens"
            )
        if max_tokens > room:
            raise ApiError(
                400,
                (
                    f"the prompt ({self.context - room} tokens) plus max_tokens ({max_tokens}) exceeds the "
                    f"model's context of {self.context}"
                ),
                param="max_tokens",
                code="context_length_exceeded",
            )
        base_seed = body.seed if body.seed is not None else secrets.randbits(62)
        choices = []
        for p, prompt_ids in enumerate(ids):
            for j in range(body.n):
                index = p * body.n + j
                params = SamplingParams(
                    max_new_tokens=max_tokens,
                    temperature=body.temperature,
                    top_k=body.top_k,
                    top_p=body.top_p if body.top_p < 1 else None,
                    repetition_penalty=body.repetition_penalty,
                    stop=tuple(body.stops()),
                    seed=base_seed + index,
                )
                choices.append(Choice(index=index, prompt_ids=prompt_ids, params=params))
        return _Prepared(choices, sum(len(i) for i in ids), prompts)

    def start(self, prepared: _Prepared) -> tuple[Job, asyncio.Queue[Event]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): stop generating
                job.cancelled.set()

        job = Job(prepared.choices, emit)
        try:
            self.engine.submit(job)
        except EngineBusy:
            raise ApiError(
                429,
                "the server is busy: too many requests are waiting; retry later",
                type="server_busy",
                code="queue_full",
            ) from None
        return job, events


def _event_stream(
    job: Job,
    events: asyncio.Queue[Event],
    *,
    opening: Callable[[int], dict[str, Any] | None],
    delta: Callable[[int, str], dict[str, Any]],
    finish: Callable[[int, str], dict[str, Any]],
    usage: Callable[[int], dict[str, Any] | None],
) -> StreamingResponse:
    """Server-sent events for a job: `opening` when a choice first appears (None: nothing),
    `delta` per piece of text, `finish` with its reason, then `usage` (None: none) and [DONE].
    A client that goes away cancels the job."""

    async def stream() -> AsyncIterator[str]:
        used = 0
        started: set[int] = set()
        try:
            while (event := await events.get())[0] != "end":
                if event[0] == "error":
                    yield _sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})
                    break
                index = event[1]
                if index not in started:
                    started.add(index)
                    if (first := opening(index)) is not None:
                        yield _sse(first)
                if event[0] == "delta":
                    yield _sse(delta(index, event[2]))
                else:
                    used += event[3]
                    yield _sse(finish(index, event[2]))
            if (last := usage(used)) is not None:
                yield _sse(last)
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def _collect(job: Job, events: asyncio.Queue[Event], num_choices: int) -> tuple[list[str], list[str], int]:
    texts = [""] * num_choices
    reasons = ["stop"] * num_choices
    completion_tokens = 0
    try:
        while (event := await events.get())[0] != "end":
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "done":
                reasons[event[1]] = event[2]
                completion_tokens += event[3]
            elif event[0] == "error":
                raise ApiError(500, event[1], type="server_error")
    finally:
        job.cancelled.set()  # nothing more is wanted (also when the client went away)
    return texts, reasons, completion_tokens


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def create_app(engine: Engine, *, model_name: str, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving `engine`'s model under `model_name`."""
    server = Server(engine, model_name=model_name, limits=limits or Limits(), api_key=api_key)
    app = FastAPI(title="atoll", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "queued": engine.queued, "completed": engine.completed}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.authorize(request)
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": server.created, "owned_by": "atoll"}],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        server.authorize(request)
        body: CompletionBody = _validate(CompletionBody, await _read_json(request, server.limits.max_body_bytes))
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        server.check_common(body, num_prompts=len(prompts))
        prepared = server.prepare(body, prompts, body.max_tokens)
        job, events = server.start(prepared)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": model_name}

        def prefix(index: int) -> str:
            return prepared.prompts[index // body.n] if body.echo else ""

        if not body.stream:
            texts, reasons, used = await _collect(job, events, len(prepared.choices))
            choices = [
                {"text": prefix(i) + t, "index": i, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons))
            ]
            return {**head, "choices": choices, "usage": _usage(prepared.prompt_tokens, used)}

        def chunk(index: int, text: str, reason: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}]}

        return _event_stream(
            job,
            events,
            opening=lambda i: chunk(i, prefix(i), None) if body.echo else None,
            delta=lambda i, text: chunk(i, text, None),
            finish=lambda i, reason: chunk(i, "", reason),
            usage=lambda used: (
                {**head, "choices": [], "usage": _usage(prepared.prompt_tokens, used)}
                if (body.stream_options or {}).get("include_usage")
                else None
            ),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        server.authorize(request)
        body: ChatBody = _validate(ChatBody, await _read_json(request, server.limits.max_body_bytes))
        if len(body.messages) > server.limits.max_messages:
            raise ApiError(
                400, f"{len(body.messages)} messages; at most {server.limits.max_messages}", param="messages"
            )
        server.check_common(body, num_prompts=1)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = server.tokenizer.render_chat(messages, add_generation_prompt=True)
        except AtollError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        prepared = server.prepare(body, [prompt], max_tokens)
        job, events = server.start(prepared)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "chat.completion", "created": created, "model": model_name}

        if not body.stream:
            texts, reasons, used = await _collect(job, events, len(prepared.choices))
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons))
            ]
            return {**head, "choices": choices, "usage": _usage(prepared.prompt_tokens, used)}

        head = {**head, "object": "chat.completion.chunk"}

        def chunk(index: int, delta: dict[str, str], reason: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        return _event_stream(
            job,
            events,
            opening=lambda i: chunk(i, {"role": "assistant", "content": ""}, None),
            delta=lambda i, text: chunk(i, {"content": text}, None),
            finish=lambda i, reason: chunk(i, {}, reason),
            usage=lambda used: (
                {**head, "choices": [], "usage": _usage(prepared.prompt_tokens, used)}
                if (body.stream_options or {}).get("include_usage")
                else None
            ),
        )

    return app
