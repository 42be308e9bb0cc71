"""OpenAI API request bodies (completions, chat completions, embeddings) and vLLM's adapter-loading bodies,
validated at the edge; responses in the shapes the official ``openai`` client parses.

A field this server does not implement is refused with a 400 naming it, never silently ignored: unknown fields
(including vLLM's ``guided_*`` and ``prompt_logprobs``, and ``reasoning_effort``) fail validation, and known
ones that would change the output (``best_of`` other than n, ``suffix``, ``response_format``
other than text, tools and functions, non-text content parts) are refused by :meth:`_Sampling.refused`.
Metadata that only matters to OpenAI's own service (``user``, ``metadata``, ``store``, ``service_tier``,
``parallel_tool_calls``, ``prompt_cache_key``, ``safety_identifier``) is accepted and ignored. vLLM's
sampling and output extensions (``top_k``, ``min_p``, ``min_tokens``, ``stop_token_ids``, ``repetition_penalty``,
``ignore_eos``, ``include_stop_str_in_output``, ``skip_special_tokens``) and chat template controls
(``add_generation_prompt``, ``continue_final_message``, ``chat_template_kwargs``) are implemented. The adapter
load/unload bodies ignore unknown fields, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import GraftingError
from .sampling import MAX_LOGPROBS, SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None  # OpenAI pads its chunks against side channels; nothing to pad


def _refuse(field: str, why: str) -> tuple[str, str]:
    return field, f"'{field}' is not supported by this server: {why}"


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    # vLLM's extensions (ignore_eos: benchmarks use it for fixed output lengths)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: Any = None  # completions: an integer (alternatives per token); chat: a boolean
    # OpenAI service metadata: no effect on the output
    user: Optional[str] = None
    metadata: Optional[dict] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None

    def refused(self) -> tuple[str, str] | None:
        """(field, message) of the first field asking for something this server does not do."""
        if not 1 <= self.n <= 16:
            return "n", f"n: expected an integer in [1, 16], got {self.n}"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options: only allowed when stream is true"
        return None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The engine's parameters; raises GraftingError naming a field whose value is out of range."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise GraftingError(f"logit_bias: keys must be token ids, got {key!r}") from None
        return SamplingParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
            top_k=-1 if self.top_k is None else self.top_k, min_p=self.min_p or 0.0, min_tokens=self.min_tokens,
            stop_token_ids=list(self.stop_token_ids or []),
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=bias, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, logprobs=self.alternatives(),
            prompt_logprobs=self.prompt_alternatives()).validate()

    def alternatives(self) -> int | None:
        """SamplingParams.logprobs: None (no log probabilities) or alternatives per token."""
        return self.logprobs

    def prompt_alternatives(self) -> int | None:
        return None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def refused(self) -> tuple[str, str] | None:
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens: 0 only with echo (to score the prompt); expected an integer >= 1"
        if self.suffix:
            return _refuse("suffix", "no insertion (fill-in-the-middle) mode")
        if self.best_of is not None and self.best_of != self.n:
            return _refuse("best_of", f"choices are not ranked; send best_of = n ({self.n}) or leave it out")
        if not self.prompts():
            return "prompt", "prompt: expected a string, token ids, or a non-empty list of either"
        return super().refused()

    def prompt_alternatives(self) -> int | None:
        return self.logprobs if self.echo else None  # the echoed prompt comes with its log probabilities

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        return list(p)


class ChatMessage(_Strict):
    role: str
    content: Optional[Union[str, list[dict]]] = None
    name: Optional[str] = None
    # what the openai client may send back of an earlier assistant message; refused when set
    tool_calls: Optional[list] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[dict] = None
    refusal: Optional[str] = None
    annotations: Optional[list] = None  # citations of an earlier answer: metadata

    def refused(self, where: str) -> tuple[str, str] | None:
        for field in ("tool_calls", "tool_call_id", "function_call"):
            if getattr(self, field):
                return _refuse(f"{where}.{field}", "no tool or function calling")
        if self.refusal is not None:
            return _refuse(f"{where}.refusal", "send the refusal text as content")
        if isinstance(self.content, list):
            for j, part in enumerate(self.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    return (f"{where}.content.{j}", f"{where}.content.{j}: only text parts can be served by a text "
                            f"model (expected {{'type': 'text', 'text': ...}}, got type {part.get('type')!r})")
        return None

    def as_template_input(self) -> dict:
        if isinstance(self.content, list):
            text = "".join(part["text"] for part in self.content)
        else:
            text = self.content or ""
        out = {"role": self.role, "content": text}
        if self.name is not None:
            out["name"] = self.name
        return out


# apply_chat_template's own arguments (and the template's messages): not for chat_template_kwargs to set
_TEMPLATE_OWN_ARGUMENTS = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                           "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                           "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
                           "sanitize_control_tokens"}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
    functions: Optional[list] = None
    function_call: Optional[Union[str, dict]] = None
    parallel_tool_calls: Optional[bool] = None  # meaningless without tools, which are refused
    modalities: Optional[list[str]] = None
    # vLLM's chat template controls
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def refused(self) -> tuple[str, str] | None:
        for field in ("max_tokens", "max_completion_tokens"):
            if getattr(self, field) == 0:
                return field, f"{field}: expected an integer >= 1, got 0"
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            return "logprobs", f"logprobs: expected true or false, got {self.logprobs!r}"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs: only allowed when logprobs is true"
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            return "top_logprobs", f"top_logprobs: expected an integer in [0, {MAX_LOGPROBS}], got {self.top_logprobs}"
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            return _refuse("response_format", "no constrained (JSON) decoding; only {'type': 'text'}")
        for field in ("tools", "functions"):
            if getattr(self, field):
                return _refuse(field, "no tool or function calling")
        for field in ("tool_choice", "function_call"):
            if getattr(self, field) not in (None, "none"):
                return _refuse(field, "no tool or function calling; only 'none'")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            return _refuse("modalities", "text output only")
        if self.continue_final_message and self.add_generation_prompt:
            return ("continue_final_message", "continue_final_message: set add_generation_prompt to false with it "
                    "(the reply continues the last message instead of starting a new one)")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            return ("continue_final_message", "continue_final_message: the last message must be the "
                    f"assistant's to continue, got role {self.messages[-1].role!r}")
        for i, message in enumerate(self.messages):
            refused = message.refused(f"messages.{i}")
            if refused is not None:
                return refused
        return super().refused()


    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def render(self, tokenizer, template: str) -> str:
        """The prompt text: the messages through the chat template (vLLM's ``add_generation_prompt``,
        ``continue_final_message`` and ``chat_template_kwargs``, the latter as template variables)."""
        extra = dict(self.chat_template_kwargs or {})
        taken = sorted(set(extra) & _TEMPLATE_OWN_ARGUMENTS)
        if taken:
            hint = f"; use the request field '{taken[0]}'" if taken[0] in type(self).model_fields else ""
            raise GraftingError(f"chat_template_kwargs: '{taken[0]}' cannot be set here{hint}")
        try:
            return tokenizer.apply_chat_template(
                [m.as_template_input() for m in self.messages], chat_template=template,
                add_generation_prompt=self.add_generation_prompt, continue_final_message=self.continue_final_message,
                tokenize=False, **extra)
        except Exception as e:  # a template that rejects these roles raises its own error text
            raise GraftingError(f"messages: the chat template rejected them ({e})") from None


class EmbeddingRequest(_Strict):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, gt=0)
    user: Optional[str] = None


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


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason, logprobs=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_response(rid: str, model: str, choices: list, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason, logprobs=None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
