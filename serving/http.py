"""FastAPI app: OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models, plus
/health and /metrics. Streaming is server-sent events ending in `data: [DONE]`.

The engine runs on its own thread; a request's events are handed to the event loop with
`call_soon_threadsafe`. A client that disconnects (stream closed, or a non-streaming request
abandoned) cancels its request, which frees its slot and KV pages before the next decode step.
"""
from __future__ import annotations

import asyncio
import hmac
import json

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from serving.engine import Engine, Event, QueueFull, Request
from serving.openai import (APIError, Formatter, chat_prompt, completion_prompt, field,
                            sampling_params)

POLL_S = 0.5  # how often an idle waiter checks whether its client is still there
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The HTTP app around a started engine."""
    app = FastAPI(title="Tessera", docs_url=None, redoc_url=None)
    metrics, tok = engine.metrics, engine.tokenizer

    @app.middleware("http")
    async def count_and_auth(request: HTTPRequest, call_next):
        # label only known routes: arbitrary paths must not grow the metric's cardinality
        endpoint = request.url.path if request.url.path in ROUTES else "other"
        if api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                err = APIError(401, "invalid or missing API key (expected 'Authorization: Bearer ...')",
                               code="invalid_api_key", kind="authentication_error")
                metrics.requests.labels(endpoint, "401").inc()
                return JSONResponse(err.body(), status_code=401)
        response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        err = APIError(500, f"internal error: {type(e).__name__}", kind="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health():
        alive = engine.thread is not None and engine.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "tessera"}]}

    async def parse(request: HTTPRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = field(body, "model", str, model_name)
        if model != model_name:
            raise APIError(400, f"the model '{model}' does not exist; this server serves '{model_name}'",
                           "model", "model_not_found")
        return body

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await parse(request)
        ids, text = completion_prompt(body, tok, engine.cfg.model.vocab_size)
        params = sampling_params(body, len(ids), engine.max_len, chat=False)
        prefix = text if params.echo else ""
        return await run(request, body, ids, params, Formatter(False, model_name, tok, len(ids)), prefix)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await parse(request)
        ids, extra_stop = chat_prompt(body, tok, engine.cfg.serve.chat_template)
        params = sampling_params(body, len(ids), engine.max_len, chat=True, extra_stop=extra_stop)
        return await run(request, body, ids, params, Formatter(True, model_name, tok, len(ids)), "")

    async def run(request: HTTPRequest, body: dict, ids: list[int], params, fmt: Formatter, prefix: str):
        stream = field(body, "stream", bool, False)
        opts = field(body, "stream_options", dict, {})
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        req = Request(ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", kind="rate_limit_error")
        except ValueError as e:
            raise APIError(400, str(e), code="context_length_exceeded")
        want_lp = params.logprobs is not None
        if stream:
            return StreamingResponse(sse(request, req, events, fmt, want_lp, prefix,
                                         bool(opts.get("include_usage"))), media_type="text/event-stream")
        merged = Event(prompt_logprobs=None)
        try:
            while True:
                ev = await next_event(request, req, events)
                merge(merged, ev)
                if ev.finish_reason:
                    break
        finally:
            if not req.done:
                engine.cancel(req)
        if merged.finish_reason == "error":
            raise APIError(500, f"generation failed: {merged.error}", kind="server_error")
        return fmt.response(merged, want_lp, prefix)

    async def next_event(request: HTTPRequest, req: Request, events: asyncio.Queue) -> Event:
        """The request's next event; cancels it if the client goes away while waiting."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(req)
                    raise asyncio.CancelledError("client disconnected")

    async def sse(request, req: Request, events, fmt: Formatter, want_lp: bool, prefix: str, usage: bool):
        n_tokens, first = 0, True
        try:
            if prefix:
                yield _sse(fmt.chunk(Event(text=""), False, first=False, prefix=prefix))
            while True:
                ev = await next_event(request, req, events)
                n_tokens += len(ev.token_ids)
                if ev.finish_reason == "error":
                    yield _sse(APIError(500, f"generation failed: {ev.error}", kind="server_error").body())
                    break
                if ev.text or ev.finish_reason or first or (want_lp and ev.token_ids):
                    yield _sse(fmt.chunk(ev, want_lp, first=first))
                    first = False
                if ev.finish_reason:
                    break
            if usage:
                yield _sse({**fmt.chunk(Event(), False), "choices": [], "usage": fmt.usage(n_tokens)})
            yield "data: [DONE]\n\n"
        finally:  # runs on normal end and when the server cancels the stream on disconnect
            if not req.done:
                engine.cancel(req)

    return app


def merge(acc: Event, ev: Event) -> None:
    acc.text += ev.text
    acc.token_ids += ev.token_ids
    acc.logprobs += ev.logprobs
    acc.top_logprobs += ev.top_logprobs
    if ev.prompt_logprobs is not None:
        acc.prompt_logprobs = ev.prompt_logprobs
    acc.finish_reason, acc.error = ev.finish_reason or acc.finish_reason, ev.error or acc.error


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def serve_forever(app: FastAPI, host: str, port: int) -> None:
    """Run uvicorn (blocking)."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=30)
