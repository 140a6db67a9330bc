"""FastAPI app: OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models, plus
/health and /metrics. Streaming is server-sent events ending in `data: [DONE]`.

Each choice of a request (one per prompt and sample) is its own engine Request, run concurrently
by the engine (serving/fanout.py). A client that disconnects (stream closed, or a non-streaming
request abandoned) cancels them all, which frees their slots and KV pages before the next step.
"""
from __future__ import annotations

import hmac
import json

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from serving.engine import Engine
from serving.request import Event
from serving.fanout import Fanout
from serving.openai import (APIError, chat_prompt, choice_params, completion_prompts, field, num_choices,
                            refuse_unsupported, sampling_params)
from serving.responses import Formatter

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
        refuse_unsupported(body, chat=False)
        n, prompts = num_choices(body), completion_prompts(body, tok, engine.cfg.model.vocab_size)
        jobs, prefixes = [], []
        for k, (ids, text) in enumerate(prompts):  # validate every prompt before submitting any
            label = "the prompt" if len(prompts) == 1 else f"prompt[{k}]"
            params = sampling_params(body, len(ids), engine.max_len, chat=False, label=label)
            check(ids, params, label, "prompt")
            jobs += [(ids, p) for p in choice_params(params, n)]
            prefixes += [text if params.echo else ""] * n
        fmt = Formatter(False, model_name, tok, sum(len(ids) for ids, _ in prompts))
        return await run(request, body, jobs, fmt, prefixes, "prompt" if n == 1 else "n")

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await parse(request)
        refuse_unsupported(body, chat=True)
        n = num_choices(body)
        ids, extra_stop = chat_prompt(body, tok, engine.cfg.serve.chat_template)
        params = sampling_params(body, len(ids), engine.max_len, chat=True, extra_stop=extra_stop)
        check(ids, params, "the prompt", "messages")
        jobs = [(ids, p) for p in choice_params(params, n)]
        return await run(request, body, jobs, Formatter(True, model_name, tok, len(ids)), [""] * n, "n")

    def check(ids: list[int], params, label: str, param: str) -> None:
        """The engine's own limits (e.g. KV pages), before anything is queued."""
        why = engine.check(len(ids), params.max_tokens)
        if why:
            raise APIError(400, f"{label}: {why}", param)

    async def run(request: HTTPRequest, body: dict, jobs: list, fmt: Formatter, prefixes: list[str],
                  count_param: str):
        stream = field(body, "stream", bool, False)
        opts = field(body, "stream_options", dict, {})
        # more choices than the queue holds could never be admitted: a 400, not a 429 to retry
        if len(jobs) > engine.cfg.serve.max_queue:
            raise APIError(400, f"the request asks for {len(jobs)} completions (prompts x n); this server "
                                f"takes at most {engine.cfg.serve.max_queue} at once", count_param)
        fan = Fanout(engine, jobs)
        fan.submit()
        want_lp = jobs[0][1].logprobs is not None
        if stream:
            return StreamingResponse(sse(request, fan, fmt, want_lp, prefixes, bool(opts.get("include_usage"))),
                                     media_type="text/event-stream")
        return fmt.response(await fan.collect(request), want_lp, prefixes)

    async def sse(request, fan: Fanout, fmt: Formatter, want_lp: bool, prefixes: list[str], usage: bool):
        n_tokens, first = 0, [True] * len(prefixes)
        try:
            for i, prefix in enumerate(prefixes):
                if prefix:
                    yield _sse(fmt.chunk(i, Event(), False, prefix=prefix))
            while fan.left:
                i, ev = await fan.next(request)
                n_tokens += len(ev.token_ids)
                if ev.finish_reason == "error":
                    yield _sse(APIError(500, f"generation failed: {ev.error}", kind="server_error").body())
                    break
                if ev.text or ev.finish_reason or first[i] or (want_lp and ev.token_ids):
                    yield _sse(fmt.chunk(i, ev, want_lp, first=first[i]))
                    first[i] = False
            if usage:
                yield _sse(fmt.usage_chunk(n_tokens))
            yield "data: [DONE]\n\n"
        finally:  # runs on normal end and when the server cancels the stream on disconnect
            fan.cancel()

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def serve_forever(app: FastAPI, host: str, port: int) -> None:
    """Run uvicorn (blocking)."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=30)
