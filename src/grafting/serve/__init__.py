"""Serving many adapters on one base model: an adapter pool, a continuous-batching engine (generation), a
batching embedder (encoders), an HTTP server.

``grafting.serve`` needs only torch and transformers; the HTTP server (``grafting.serve.http``) needs the
``serve`` extra (FastAPI, uvicorn, prometheus-client).
"""

from .embed import Embedder, Pooling
from .engine import Completion, Engine, EngineStopped, Output, QueueFull, RequestHandle
from .pool import AdapterError, AdapterNotFound, AdapterPool
from .sampling import SamplingParams

__all__ = ["AdapterError", "AdapterNotFound", "AdapterPool", "Completion", "Embedder", "Engine", "EngineStopped", "Output",
           "Pooling", "QueueFull", "RequestHandle", "SamplingParams"]
