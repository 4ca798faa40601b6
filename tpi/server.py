"""OpenAI-compatible HTTP API over the engine: chat and text completions (streamed or not),
models, health and Prometheus metrics.

Owns: request validation with OpenAI-style errors that name the field, authentication by bearer
token, the mapping between HTTP requests and engine jobs (queue full -> 429 with Retry-After, a
client that disconnects cancels its job), server-sent events in OpenAI's chunk format, and the
metrics. Does not know: tensors, sockets between ranks, how the workers were started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tpi.sampling import SamplingParams
from tpi.serving import EngineThread, Job, QueueFull

log = logging.getLogger("tpi.server")
RETRY_AFTER_S = 1
MAX_STOP = 8


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}


def _error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- request bodies ------------------------------------------------------------------------------
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        return stops


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, "only text content parts are supported", "messages")
            parts.append(p["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[int]

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v


# -- metrics -------------------------------------------------------------------------------------
class Metrics:
    def __init__(self, engine_thread: EngineThread, world_size: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("tpi_requests", "HTTP generation requests", ["endpoint", "status"],
                                registry=self.registry)
        self.ttft = Histogram("tpi_time_to_first_token_seconds", "request arrival to first token",
                              buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30, 60), registry=self.registry)
        self.token = Histogram("tpi_time_per_output_token_seconds", "time between generated tokens",
                               buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=self.registry)
        Gauge("tpi_queue_waiting", "requests waiting", registry=self.registry).set_function(
            lambda: engine_thread.waiting)
        Gauge("tpi_requests_running", "requests being generated", registry=self.registry).set_function(
            lambda: int(engine_thread.running is not None))
        self.registry.register(_RankCollector(engine_thread, world_size))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RankCollector:
    """Per-rank figures, asked of every rank through the engine thread at scrape time."""

    def __init__(self, engine_thread: EngineThread, world_size: int):
        self.et, self.world_size = engine_thread, world_size

    def collect(self):
        try:
            ranks = self.et.call(self.et.engine.stats).result(timeout=10)
        except Exception:
            ranks = [self.et.engine.local_stats()]
        missing = self.et.engine.comm.health().missing
        up = GaugeMetricFamily("tpi_rank_up", "1 when the rank is connected", labels=["rank"])
        for r in range(self.world_size):
            up.add_metric([str(r)], 0 if r in missing else 1)
        yield up
        families = {
            "rss": GaugeMetricFamily("tpi_rss_bytes", "resident set size", labels=["rank"]),
            "peak": GaugeMetricFamily("tpi_peak_rss_bytes", "peak resident set size (VmHWM)", labels=["rank"]),
            "read": CounterMetricFamily("tpi_weight_bytes_read", "weight bytes read from disk", labels=["rank"]),
            "stall": CounterMetricFamily("tpi_weight_stall_seconds", "time waiting for streamed weights",
                                         labels=["rank"]),
            "compute": CounterMetricFamily("tpi_compute_seconds", "time computing", labels=["rank"]),
        }
        allreduce = SummaryMetricFamily("tpi_allreduce_seconds", "allreduce latency", labels=["rank"])
        for rec in ranks:
            rank = [str(rec.rank)]
            families["rss"].add_metric(rank, rec.rss_bytes)
            families["peak"].add_metric(rank, rec.peak_rss_bytes)
            families["read"].add_metric(rank, rec.bytes_read)
            families["stall"].add_metric(rank, rec.stall_s)
            families["compute"].add_metric(rank, rec.compute_s)
            allreduce.add_metric(rank, rec.allreduce_calls, rec.allreduce_s)
        yield from families.values()
        yield allreduce


# -- the app -------------------------------------------------------------------------------------
def create_app(engine_thread: EngineThread, model_name: str, api_key: str | None = None) -> FastAPI:
    engine = engine_thread.engine
    world_size = engine.manifest.plan.world_size
    metrics = Metrics(engine_thread, world_size)
    app = FastAPI(title="tpi", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", None)
        msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return _error(400, msg, param)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.type, exc.code, exc.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key (send Authorization: Bearer KEY)", None,
                              "authentication_error", "invalid_api_key")
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tpi", "max_model_len": engine.max_context}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        h = engine.comm.health()
        missing = list(h.missing)
        workers = [{"rank": r, "connected": r not in missing, "host": h.hosts.get(r),
                    **({"reason": h.reasons[r]} if r in missing else {})} for r in range(1, world_size)]
        ok = h.ok
        body = {"status": "ok" if ok else "degraded", "ready": ok, "world_size": world_size, "workers": workers,
                "missing_ranks": missing, "queue": {"waiting": engine_thread.waiting,
                                                         "running": int(engine_thread.running is not None)}}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        body = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        _check_model(req.model, model_name)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        ids = await asyncio.get_running_loop().run_in_executor(None, engine.encode_chat, msgs)
        return await _complete(engine_thread, metrics, req, ids, "chat", model_name)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(req.model, model_name)
        if isinstance(req.prompt, str):
            ids = await asyncio.get_running_loop().run_in_executor(None, engine.encode, req.prompt)
        else:
            ids = req.prompt
            bad = [i for i in ids if not 0 <= i < engine.cfg.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                                    f"[0, {engine.cfg.vocab_size})", "prompt")
        return await _complete(engine_thread, metrics, req, ids, "completion", model_name)

    return app


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served!r}", "model",
                       code="model_not_found")


def _budget(req: _Sampling, prompt_len: int, max_context: int) -> int:
    room = max_context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens; the maximum context is {max_context}", "messages")
    asked = req.max_completion_tokens or req.max_tokens
    if asked is None:
        return room
    if prompt_len + asked > max_context:
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{field}: {prompt_len} prompt tokens + {asked} tokens exceed the maximum context "
                            f"of {max_context} tokens", field)
    return asked


async def _complete(et: EngineThread, metrics: Metrics, req: _Sampling, ids: list[int], kind: str, model: str):
    max_new = _budget(req, len(ids), et.engine.max_context)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    params = SamplingParams(req.temperature, req.top_k, req.top_p if req.top_p < 1 else None, req.seed)
    job = Job(ids, max_new, params, list(req.stop or []), req.ignore_eos,
              emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    endpoint = "chat" if kind == "chat" else "completions"
    try:
        et.submit(job)
    except QueueFull as e:
        metrics.requests.labels(endpoint, "429").inc()
        raise APIError(429, f"the server is busy: {e}; retry later", None, "rate_limit_error",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    stream = _Stream(et, job, events, metrics, kind, model, rid, len(ids),
                     bool((req.stream_options or {}).get("include_usage")))
    if req.stream:
        return StreamingResponse(stream.sse(endpoint), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await stream.whole(endpoint)


class _Stream:
    """One request's events, turned into OpenAI's response or its stream of chunks."""

    def __init__(self, et: EngineThread, job: Job, events: asyncio.Queue, metrics: Metrics, kind: str, model: str,
                 rid: str, prompt_tokens: int, include_usage: bool):
        self.et, self.job, self.events, self.metrics, self.kind, self.model = et, job, events, metrics, kind, model
        self.rid, self.prompt_tokens, self.include_usage = rid, prompt_tokens, include_usage
        self.created = int(time.time())
        self.t_last: float | None = None

    async def next_event(self) -> dict:
        ev = await self.events.get()
        if ev["event"] == "token":
            now = time.perf_counter()
            if self.t_last is None:
                self.metrics.ttft.observe(now - self.job.enqueued_at)
            else:
                self.metrics.token.observe(now - self.t_last)
            self.t_last = now
        return ev

    def usage(self, res) -> dict:
        n = len(res.ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _choice(self, text: str | None, finish: str | None, whole: bool) -> dict:
        if self.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if whole:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _object(self, whole: bool) -> str:
        if self.kind == "chat":
            return "chat.completion" if whole else "chat.completion.chunk"
        return "text_completion"

    def _body(self, choices: list, whole: bool, usage: dict | None = None) -> dict:
        body = {"id": self.rid, "object": self._object(whole), "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None or whole:
            body["usage"] = usage
        return body

    async def whole(self, endpoint: str) -> JSONResponse:
        try:
            while True:
                ev = await self.next_event()
                if ev["event"] == "done":
                    res = ev["result"]
                    self.metrics.requests.labels(endpoint, "200").inc()
                    return JSONResponse(self._body([self._choice(res.text, res.finish_reason, True)], True,
                                                   self.usage(res)))
                if ev["event"] == "error":
                    self.metrics.requests.labels(endpoint, "503").inc()
                    return _error(503, f"generation failed: {ev['error']}", None, "server_error")
        finally:
            self.et.cancel(self.job)  # a no-op when done; stops the job if this handler was cancelled

    async def sse(self, endpoint: str) -> AsyncIterator[str]:
        status = "499"
        try:
            if self.kind == "chat":
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
                yield _sse(self._body([first], False))
            while True:
                ev = await self.next_event()
                if ev["event"] == "token":
                    if ev["text"]:
                        yield _sse(self._body([self._choice(ev["text"], None, False)], False))
                    continue
                if ev["event"] == "error":
                    status = "503"
                    yield _sse({"error": {"message": f"generation failed: {ev['error']}", "type": "server_error",
                                          "param": None, "code": None}})
                else:
                    res = ev["result"]
                    status = "200"
                    yield _sse(self._body([self._choice(None if self.kind == "chat" else "", res.finish_reason,
                                                        False)], False))
                    if self.include_usage:
                        yield _sse(self._body([], False, self.usage(res)))
                yield "data: [DONE]\n\n"
                return
        finally:
            self.et.cancel(self.job)  # the client went away (or we are done): stop generating
            self.metrics.requests.labels(endpoint, status).inc()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
