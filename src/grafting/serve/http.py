"""The OpenAI-compatible HTTP server (FastAPI): completions and chat completions with server-sent-event
streaming (over an :class:`~grafting.serve.Engine`), or embeddings (over an
:class:`~grafting.serve.embed.Embedder`), the model list, vLLM's adapter load/unload endpoints, /health and
Prometheus /metrics.

``model`` in a request names the base (``served_model_name``) or a registered adapter. Errors are OpenAI
error objects: unknown model 404, invalid parameters or JSON 400, queue full 429, timeout 504, bad or missing
API key 401 (everything under /v1 when an API key is set; /health and /metrics stay open). A client that
disconnects cancels its request. Requires the ``serve`` extra.
"""

from __future__ import annotations

import asyncio
import copy
import json
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GraftingError
from .choices import Choices
from .edge import BAD_KEY, APIError, error_response, field_of, inside_root, key_matches
from .engine import EngineStopped, Output, QueueFull
from .logprobs import chat_logprobs, completion_logprobs
from .metrics import ServerMetrics
from .pool import AdapterError, AdapterNotFound
from .protocol import (ChatRequest, CompletionRequest, EmbeddingRequest, LoadAdapterRequest, UnloadAdapterRequest,
                       chat_chunk, chat_response, completion_chunk, completion_response, embedding_response,
                       error_body, new_id, usage)


def create_app(engine, served_model_name: str, api_key: str | None = None, adapter_root=None,
               request_timeout: float | None = None, model_path: str | None = None,
               chat_template: str | None = None) -> FastAPI:
    """A FastAPI app over a started-on-startup ``engine`` (with a tokenizer and an AdapterPool): an Engine
    serves completions and chat completions, an Embedder serves embeddings; the other endpoints say so."""
    pool, tokenizer = engine.pool, engine.tokenizer
    task = getattr(engine, "task", "generate")
    root = Path(adapter_root) if adapter_root is not None else None
    metrics = ServerMetrics(engine)
    engine.on_finish = metrics.observe
    state = {"closing": False}

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        state["closing"] = True  # uvicorn has finished the open requests by now
        await asyncio.to_thread(engine.stop, True, 60)

    app = FastAPI(title="grafting", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        parts, params = [], []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            params.append(loc or None)
            if err.get("type") == "extra_forbidden":  # unknown, or known and not implemented (guided_json, ...)
                parts.append(f"'{loc}' is not supported by this server")
            else:
                parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return error_response(400, "invalid request: " + "; ".join(parts), params[0] if params else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    async def authorized(request: Request):
        if api_key is None:
            return
        if not key_matches(request.headers, api_key):
            raise APIError(401, BAD_KEY)

    v1 = [Depends(authorized)]

    # ---- open endpoints ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state["closing"]:
            return error_response(503, "shutting down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- models and adapters ----------------------------------------------------------------------------------
    @app.get("/v1/models", dependencies=v1)
    async def models():
        data = [{"id": served_model_name, "object": "model", "created": 0, "owned_by": "grafting",
                 "root": model_path or served_model_name, "parent": None, "max_model_len": engine.max_model_len}]
        for name in pool.names():
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "grafting",
                         "root": str(pool.path(name)), "parent": served_model_name})
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter", dependencies=v1)
    async def load_lora_adapter(body: LoadAdapterRequest):
        if body.lora_name == served_model_name:
            raise APIError(400, f"'{body.lora_name}' is the base model's name", param="lora_name")
        path = inside_root(root, body.lora_path) if root is not None else Path(body.lora_path)
        try:  # read and checked against the model before the answer, as vLLM does: 200 means it will serve
            confine = {} if root is None else {"root": root}  # every later read stays inside it too
            await asyncio.to_thread(pool.load, body.lora_name, path, **confine)
        except GraftingError as e:
            raise APIError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=v1)
    async def unload_lora_adapter(body: UnloadAdapterRequest):
        try:
            pool.unregister(body.lora_name)
        except AdapterNotFound:
            raise APIError(404, f"The model `{body.lora_name}` does not exist.", param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # ---- generation -------------------------------------------------------------------------------------------
    def adapter_for(model: str):
        if model == served_model_name:
            return None
        if model in pool:
            return model
        refused = pool.refusal(model)
        if refused is not None:  # under the adapter root, but it cannot serve here: say why
            raise APIError(400, refused, param="model")
        raise APIError(404, f"The model `{model}` does not exist.", param="model")

    def serves(wanted: str) -> None:
        if task != wanted:
            what = "an embedding model: use /v1/embeddings" if task == "embed" else \
                "a generative model; /v1/embeddings needs an encoder model"
            raise APIError(400, f"'{served_model_name}' is {what}")

    def check(body) -> None:
        serves("generate")
        refused = body.refused()
        if refused is not None:
            raise APIError(400, refused[1], param=refused[0])

    @contextmanager
    def submitting(param: str | None = None):
        """Submission errors as HTTP errors: queue full 429, stopping 503, unknown adapter 404, else 400."""
        try:
            yield
        except QueueFull as e:
            raise APIError(429, str(e)) from None
        except EngineStopped as e:
            raise APIError(503, str(e)) from None
        except AdapterNotFound as e:
            raise APIError(404, str(e), param="model") from None
        except (AdapterError, GraftingError) as e:
            raise APIError(400, str(e), param=param or field_of(str(e))) from None

    def encode(prompt) -> list:
        """Token ids, tokenized as the engine would, so the context check below sees what the engine runs."""
        if isinstance(prompt, str):
            return tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return list(prompt)

    def choices_for(body, prompts: list, default_max_tokens: int, limit_param: str = "max_tokens"):
        """(prompt ids, SamplingParams) per choice: n per prompt, seeds offset per choice so they differ.

        An explicit max_tokens that does not fit in the context beside its prompt is a 400 (vLLM's rule);
        the default is cut to fit."""
        out = []
        for ids in prompts:
            room = engine.max_model_len - len(ids)  # < 1: the engine refuses the prompt itself, saying why
            with submitting():
                params = body.sampling(min(default_max_tokens, max(room, 1)))
                if body.logit_bias or body.stop_token_ids:
                    params.check_vocab(engine.vocab_size)
            if 0 < room < params.max_tokens:
                raise APIError(400, f"{limit_param}: {params.max_tokens} tokens requested, but this model's context "
                                    f"is {engine.max_model_len} tokens and the prompt uses {len(ids)}: at most "
                                    f"{room} can be generated", param=limit_param)
            for j in range(body.n):
                p = copy.copy(params)
                if p.seed is not None:
                    p.seed += j
                out.append((ids, p))
        return out

    def start(choices, adapter, http_request) -> Choices:
        loop = asyncio.get_running_loop()
        run = Choices(http_request)
        try:
            for i, (ids, params) in enumerate(choices):
                with submitting():
                    run.handles.append(engine.submit(
                        ids, params, adapter, timeout=request_timeout,
                        on_event=lambda ev, i=i: loop.call_soon_threadsafe(run.queue.put_nowait, (i, ev))))
        except APIError:
            run.close()
            raise
        run.watch()
        return run

    def failed(ev):
        if ev.finish_reason in ("error", "timeout"):
            return APIError(ev.status or 500, ev.error or ev.finish_reason,
                            kind="timeout" if ev.finish_reason == "timeout" else "server_error")
        return None

    async def collect(run: Choices):
        """Texts, finish reasons and log probability entries of every choice, once all finished; APIError if
        one failed or the client left."""
        n = len(run.handles)
        texts, finish, entries = [""] * n, [None] * n, [[] for _ in range(n)]
        async for i, ev in run.events():
            err = failed(ev)
            if err is not None:
                raise err
            texts[i] += ev.text
            entries[i].extend(ev.prompt_logprobs or [])  # its own event, before any token's
            entries[i].extend(ev.logprobs or [])
            finish[i] = _finish(ev) or finish[i]
        if any(f is None for f in finish):
            raise APIError(499, "the client closed the request")
        return texts, finish, entries

    async def streamed(run: Choices, chunk, lead, include_usage, prompt_tokens):
        """Server-sent events: ``lead`` first, then each choice's deltas as ``chunk(index, event)``.
        A failure after the 200 has gone out is an error event (an OpenAI error object), then [DONE]."""
        try:
            for event in lead:
                yield _sse(event)
            async for i, ev in run.events():
                err = failed(ev)
                if err is not None:
                    yield _sse(error_body(err.message, err.kind, err.status))
                    continue
                if ev.text or ev.finish_reason or ev.logprobs or ev.prompt_logprobs:
                    yield _sse(chunk(i, ev))
            if include_usage:
                yield _sse({**chunk(0, Output("", "", [])), "choices": [],
                            "usage": usage(prompt_tokens, run.completion_tokens())})
            yield "data: [DONE]\n\n"
        finally:
            run.close()

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, http_request: Request):
        check(body)
        adapter = adapter_for(body.model)
        raw = body.prompts()
        prompts = [encode(p) for p in raw]
        choices = choices_for(body, prompts, 16)
        run = start(choices, adapter, http_request)
        rid, model = new_id("cmpl"), body.model
        prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, whatever n (OpenAI, vLLM)
        echo = [(p if isinstance(p, str) else tokenizer.decode(p)) if body.echo else "" for p in raw]
        if body.stream:
            scored = body.echo and body.logprobs is not None  # the echo goes out with its log probabilities
            lead = [completion_chunk(rid, model, i, echo[i // body.n], None)
                    for i in range(len(choices)) if echo[i // body.n] and not scored]
            offsets = [0] * len(choices)  # text_offset continues across a choice's chunks

            def chunk(i, ev):
                lp, text = None, ev.text
                if ev.prompt_logprobs:
                    text = echo[i // body.n] + text
                if body.logprobs is not None:
                    lp = completion_logprobs(tokenizer, (ev.prompt_logprobs or []) + (ev.logprobs or []), offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
                return completion_chunk(rid, model, i, text, _finish(ev), lp)
            return StreamingResponse(streamed(
                run, chunk, lead, bool(body.stream_options and body.stream_options.include_usage),
                prompt_tokens), media_type="text/event-stream")
        try:
            texts, finish, entries = await collect(run)
        finally:
            run.close()
        out = [{"index": i, "text": echo[i // body.n] + t, "finish_reason": finish[i],
                "logprobs": None if body.logprobs is None else completion_logprobs(tokenizer, entries[i])}
               for i, t in enumerate(texts)]
        return completion_response(rid, model, out, prompt_tokens, run.completion_tokens())

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatRequest, http_request: Request):
        check(body)
        adapter = adapter_for(body.model)
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, "this model has no chat template; use /v1/completions")
        with submitting():
            prompt = body.render(tokenizer, template)
        limit_param = "max_tokens"
        if body.max_completion_tokens is not None:  # OpenAI's newer name wins over the deprecated one (vLLM)
            body.max_tokens, limit_param = body.max_completion_tokens, "max_completion_tokens"
        ids = encode(prompt)
        run = start(choices_for(body, [ids], engine.max_model_len, limit_param), adapter, http_request)
        rid, model = new_id("chatcmpl"), body.model
        if body.stream:
            lead = [chat_chunk(rid, model, i, {"role": "assistant", "content": ""}, None)
                    for i in range(len(run.handles))]
            def chunk(i, ev):
                lp = None if body.logprobs is not True else chat_logprobs(tokenizer, ev.logprobs or [])
                return chat_chunk(rid, model, i, {"content": ev.text} if ev.text else {}, _finish(ev), lp)
            return StreamingResponse(streamed(
                run, chunk, lead, bool(body.stream_options and body.stream_options.include_usage),
                len(ids)), media_type="text/event-stream")
        try:
            texts, finish, entries = await collect(run)
        finally:
            run.close()
        out = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": finish[i],
                "logprobs": chat_logprobs(tokenizer, entries[i]) if body.logprobs is True else None}
               for i, t in enumerate(texts)]
        return chat_response(rid, model, out, len(ids), run.completion_tokens())

    @app.post("/v1/embeddings", dependencies=v1)
    async def embeddings(body: EmbeddingRequest, http_request: Request):
        serves("embed")
        adapter = adapter_for(body.model)
        if body.dimensions is not None and body.dimensions > engine.dimensions:
            raise APIError(400, f"dimensions: {body.dimensions} is more than this model's {engine.dimensions}",
                           param="dimensions")
        with submitting(param="input"):
            rows = engine.tokenize(body.input)
            future = engine.submit(rows, adapter, timeout=request_timeout)
        waiting = asyncio.wrap_future(future)
        try:
            while True:
                # asyncio.wait, not wait_for: the job's own TimeoutError (the request's timeout, a 504) is the
                # same class as wait_for's, and was taken for "still waiting" until the client gave up
                done, _ = await asyncio.wait({waiting}, timeout=1.0)
                if done:
                    vectors = waiting.result()
                    break
                if await http_request.is_disconnected():
                    future.cancel()
                    raise APIError(499, "the client closed the request") from None
        except AdapterError as e:
            raise APIError(400, str(e), param="model") from None
        except TimeoutError as e:
            raise APIError(504, str(e)) from None
        except GraftingError as e:
            raise APIError(500, str(e)) from None
        if body.dimensions is not None:  # a prefix of the vector, renormalised (OpenAI's text-embedding-3 rule)
            vectors = vectors[:, :body.dimensions]
            if engine.pooling.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return embedding_response(body.model, vectors, body.encoding_format, sum(len(r) for r in rows))

    return app


def _finish(ev) -> str | None:
    return ev.finish_reason if ev.finish_reason in ("stop", "length") else None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
