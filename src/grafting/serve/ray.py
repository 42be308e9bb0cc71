"""Serving across machines with Ray Serve: requests routed by adapter to the replicas that already hold it.

Ray Serve's model multiplexing (``@serve.multiplexed``, ``handle.options(multiplexed_model_id=...)``) keeps
track of which model ids each replica has loaded and sends a request for one to a replica that has it, so an
adapter is read once per replica that serves it rather than by every replica in turn. Here:

- :class:`GraftReplica`: one grafting server per replica (the same engine, adapter pool and OpenAI endpoints as
  ``graft serve``, :mod:`grafting.serve.http`, called in process); its multiplexed loader registers an
  adapter by name from the adapter root.
- :class:`GraftRouter`: the HTTP ingress. It reads ``model`` from the request body and forwards the request to
  a replica with ``multiplexed_model_id`` set to it (the base model routes freely), streaming the replica's
  response back, server-sent events included.

Adapters are the directories under ``adapter_root``, resolved by name on first use (a new directory is served
as soon as it appears); runtime ``/v1/load_lora_adapter`` is refused, since it would reach only one replica.

    from ray import serve
    from grafting.serve.ray import build_app
    serve.run(build_app("path/to/model", adapter_root="adapters/", num_replicas=2))

Requires the ``ray`` extra (``pip install "grafting[ray]"``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..errors import GraftingError
from ..io.reader import CONFIG_NAME
from .edge import BAD_KEY, error_response, key_matches

ROUTED = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
REFUSED = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


async def call_asgi(app, method: str, path: str, headers: list, body: bytes, query: str = ""):
    """Run one HTTP request through an ASGI ``app`` in process; yields the status and headers first, then the
    body chunks as the app sends them (so a streaming response streams)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "client": ("127.0.0.1", 0),
             "server": ("127.0.0.1", 80)}
    sent: asyncio.Queue = asyncio.Queue()
    state = {"body_sent": False, "done": asyncio.Event()}

    async def receive():
        if not state["body_sent"]:
            state["body_sent"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await state["done"].wait()  # the response is over (or the caller went away)
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda t: sent.put_nowait(None))
    try:
        while True:
            message = await sent.get()
            if message is None:
                task.result()  # re-raise what the app raised
                return
            if message["type"] == "http.response.start":
                yield {"status": message["status"],
                       "headers": [(k.decode(), v.decode()) for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
    finally:  # the caller went away mid-stream: the app sees a disconnect and cancels the request
        state["done"].set()


def _adapter_dir(root: Path, name: str) -> Path | None:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None
    d = root / name
    return d if (d / CONFIG_NAME).is_file() else None


class GraftReplica:
    """One grafting server (engine + pool + OpenAI endpoints) per Ray Serve replica; :func:`build_app` makes
    it a deployment with a multiplexed ``get_adapter`` sized to ``max_loras``."""

    def __init__(self, model: str, adapter_root: str | None = None, served_model_name: str | None = None,
                 request_timeout: float | None = None, api_key: str | None = None, **engine_kwargs):
        from .http import create_app
        from .server import build_engine, served_name

        self.root = Path(adapter_root) if adapter_root is not None else None
        self.engine, _ = build_engine(model, adapter_root=adapter_root, **engine_kwargs)
        self.engine.start()
        self.served_model_name = served_model_name or served_name(model)
        self.app = create_app(self.engine, self.served_model_name, api_key=api_key, adapter_root=adapter_root,
                              request_timeout=request_timeout, model_path=model)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def register(self, name: str) -> str:
        """Make adapter ``name`` servable here (the pool reads its weights on first use)."""
        pool = self.engine.pool
        if name not in pool and self.root is not None:
            d = _adapter_dir(self.root, name)
            if d is not None:
                try:
                    await asyncio.to_thread(pool.register, name, d)
                except GraftingError as e:  # e.g. a rank above the maximum: the app answers 400 with why
                    pool.refuse(name, str(e))
            elif pool.refusal(name) is not None:  # the directory is gone: 404 from now on, not the old reason
                pool.unregister(name)
        return name

    async def forward(self, method: str, path: str, headers: list, body: bytes, query: str = ""):
        model_id = serve.get_multiplexed_model_id()
        pool = self.engine.pool
        known = model_id in pool or (self.root is not None and _adapter_dir(self.root, model_id))
        if model_id and pool.refusal(model_id) is not None:
            # not through the multiplexed cache: a refused name would stay cached, and refused, after the
            # operator fixed its directory
            await self.register(model_id)
        elif model_id and known:  # unknown names are not counted as loaded: the app answers them 404
            await self.get_adapter(model_id)
        async for item in call_asgi(self.app, method, path, headers, body, query):
            if isinstance(item, dict):
                item["headers"].append(("x-grafting-replica", self.replica_id))
            yield item

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(drain=False, timeout=5)


def replica_deployment(max_loras: int):
    """GraftReplica as a Ray Serve deployment whose multiplexed loader keeps ``max_loras`` adapters, so what
    Ray believes a replica holds matches its pool."""

    class MultiplexedGraftReplica(GraftReplica):
        @serve.multiplexed(max_num_models_per_replica=max_loras)
        async def get_adapter(self, name: str) -> str:
            return await self.register(name)

    MultiplexedGraftReplica.__name__ = MultiplexedGraftReplica.__qualname__ = "GraftReplica"
    return serve.deployment(MultiplexedGraftReplica, name="GraftReplica")


@serve.deployment
class GraftRouter:
    """The HTTP ingress: routes each request by its ``model`` to a replica that holds that adapter."""

    def __init__(self, replica, served_model_name: str, api_key: str | None = None):
        self.replica, self.served_model_name, self.api_key = replica, served_model_name, api_key

    async def __call__(self, request: Request):
        body = await request.body()
        path = request.url.path
        if path.startswith("/v1/") and self.api_key is not None and not key_matches(request.headers, self.api_key):
            return error_response(401, BAD_KEY)
        if path in REFUSED:
            return error_response(400, "under Ray Serve, adapters load by name from the adapter root on every replica; "
                               "add a directory there instead of calling " + path)
        model = ""
        if request.method == "POST" and path in ROUTED:
            try:
                model = str(json.loads(body or b"{}").get("model") or "")
            except (ValueError, AttributeError):
                model = ""  # the replica answers malformed JSON with its own 400
        handle = self.replica.options(stream=True, multiplexed_model_id=""
                                      if model in ("", self.served_model_name) else model)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        stream = handle.forward.remote(request.method, path, headers, body, request.url.query)
        head = await stream.__anext__()  # status and headers; the rest of the stream is the body
        media = dict(head["headers"]).get("content-type")
        out_headers = {k: v for k, v in head["headers"] if k.lower() not in ("content-length", "content-type")}
        return StreamingResponse(stream, status_code=head["status"], headers=out_headers, media_type=media)


def build_app(model: str, adapter_root: str | None = None, num_replicas: int = 1, max_loras: int = 8,
              served_model_name: str | None = None, api_key: str | None = None,
              ray_actor_options: dict | None = None, **engine_kwargs):
    """A Ray Serve application: ``num_replicas`` grafting replicas behind one router; pass it to
    ``serve.run``. ``max_loras`` bounds both each replica's resident adapters and the adapters Ray counts
    as loaded per replica when it routes."""
    from .server import served_name

    if num_replicas < 1:
        raise GraftingError(f"num_replicas: expected >= 1, got {num_replicas}")
    name = served_model_name or served_name(model)
    replica_cls = replica_deployment(max_loras).options(num_replicas=num_replicas,
                                                        ray_actor_options=ray_actor_options or {})
    replica = replica_cls.bind(model, adapter_root=adapter_root, served_model_name=name, max_loras=max_loras,
                               api_key=api_key, **engine_kwargs)
    return GraftRouter.options(ray_actor_options={"num_cpus": 0}).bind(replica, name, api_key)


_INTS = ("num_replicas", "max_loras", "max_cpu_loras", "max_lora_rank", "max_batch", "max_queue", "max_model_len",
         "max_kv_bytes")
_FLOATS = ("request_timeout",)
_STRINGS = ("model", "adapter_root", "served_model_name", "api_key", "task")


def app_builder(args: dict):
    """For Ray's CLI: ``serve run grafting.serve.ray:app_builder model=DIR adapter_root=DIR num_replicas=2``
    (every value arrives as a string)."""
    kwargs = {}
    for key, value in args.items():
        if key in _INTS or key in _FLOATS:
            try:
                kwargs[key] = int(value) if key in _INTS else float(value)
            except (TypeError, ValueError):
                raise GraftingError(f"{key}: expected an {'integer' if key in _INTS else 'number'}, "
                                    f"got {value!r}") from None
        elif key in _STRINGS:
            kwargs[key] = str(value)
        else:
            raise GraftingError(f"unknown argument '{key}'; expected some of "
                                f"{', '.join(_STRINGS + _INTS + _FLOATS)}")
    if "model" not in kwargs:
        raise GraftingError("model: required (a model directory, .gguf file or packaged:NAME)")
    return build_app(**kwargs)
