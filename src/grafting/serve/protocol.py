"""OpenAI API request bodies (completions, chat completions, embeddings) and vLLM's adapter-loading bodies,
validated at the edge; responses in the shapes the official ``openai`` client parses.

Fields the engine does not implement (``logprobs``, ``best_of`` > n, ``suffix``, tools) are refused with a 400
naming the field instead of being silently ignored; fields that only matter to OpenAI's own service
(``user``, ``logit_bias`` when empty, ``service_tier``) are accepted and ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .sampling import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    logprobs: Any = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    ignore_eos: bool = False  # vLLM's extension; benchmarks use it for fixed output lengths

    def unsupported(self) -> str | None:
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        if self.presence_penalty not in (None, 0) or self.frequency_penalty not in (None, 0):
            return "presence_penalty" if self.presence_penalty not in (None, 0) else "frequency_penalty"
        if not 1 <= self.n <= 16:
            return "n"
        return None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=stop,
                              ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return super().unsupported()

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        return list(p)


class ChatMessage(_Body):
    role: str
    content: Optional[Union[str, list[dict]]] = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts can be served by a text model
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    tools: Optional[list] = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        return super().unsupported()


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, gt=0)


def embedding_response(model: str, vectors, encoding_format: str, prompt_tokens: int) -> dict:
    """``vectors``: float32 [n, d]; base64 is the little-endian float32 bytes, as OpenAI sends them."""
    import base64

    import numpy as np

    rows = vectors.numpy().astype("<f4")
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(row.tobytes()).decode() if encoding_format == "base64" else row.tolist()}
            for i, row in enumerate(np.atleast_2d(rows))]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


class LoadAdapterRequest(_Body):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(_Body):
    lora_name: str


# ---- responses --------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, choices: list, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_response(rid: str, model: str, choices: list, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
