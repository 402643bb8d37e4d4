"""OpenAI's request and response shapes: requests validated into frozen dataclasses, responses as dicts.

Every field of a request is checked: a wrong type, a value out of range, an
unknown field, or an OpenAI field this server does not implement (with a value
that would change the output) is refused with a 400 that names the field.
OpenAI fields whose given value changes nothing (n=1, presence_penalty=0,
logprobs=false, user=...) are accepted and ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .errors import invalid

MAX_STOPS = 4  # as OpenAI

# Fields this server accepts only with a value that changes nothing; {name: accepted values}.
_NEUTRAL_COMMON = {
    "n": (None, 1),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
}
_NEUTRAL_CHAT = {
    **_NEUTRAL_COMMON,
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
}
_NEUTRAL_COMPLETION = {
    **_NEUTRAL_COMMON,
    "logprobs": (None, 0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}
_SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop", "max_tokens")
_CHAT_FIELDS = ("model", "messages", "stream", "stream_options", "user", "max_completion_tokens") + _SAMPLING
_COMPLETION_FIELDS = ("model", "prompt", "stream", "stream_options", "user") + _SAMPLING

# Our GenerationResult.finish_reason -> OpenAI's.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


@dataclass(frozen=True)
class Sampling:
    """The request's sampling fields in our terms (offload.sampling.SamplingParams checks them again)."""

    max_tokens: int | None  # None: the route's default
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # not an OpenAI field; vLLM and others accept it
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: tuple[dict, ...]  # [{"role": ..., "content": str}], content parts joined
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompt: str | tuple[int, ...]  # text, or token ids
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


# ---- field readers -------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(body: dict, allowed: tuple[str, ...], neutral: dict) -> None:
    for name, value in body.items():
        if name in allowed:
            continue
        if name not in neutral:
            raise invalid(f"unknown field {name!r}; this endpoint accepts {', '.join(sorted((*allowed, *neutral)))}",
                          param=name, code="unknown_field")
        if value not in neutral[name] or (isinstance(value, bool) and name not in ("logprobs", "echo")):
            raise invalid(f"{name}={value!r} is not supported by this server; leave it out", param=name,
                          code="unsupported_parameter")


def _number(body: dict, name: str, default: float, lo: float, hi: float, open_lo: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise invalid(f"{name} must be a number, not {type(value).__name__}", param=name, code="invalid_type")
    if value < lo or value > hi or (open_lo and value == lo):
        raise invalid(f"{name}={value} must be in {'(' if open_lo else '['}{lo}, {hi}]", param=name,
                      code="invalid_value")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(f"{name} must be an integer, not {type(value).__name__}", param=name, code="invalid_type")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise invalid(f"{name}={value} must be {bound}", param=name, code="invalid_value")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, not {type(value).__name__}", param=name, code="invalid_type")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop must be a non-empty string or a list of non-empty strings", param="stop",
                      code="invalid_type")
    if len(stops) > MAX_STOPS:
        raise invalid(f"stop has {len(stops)} strings; at most {MAX_STOPS}", param="stop", code="invalid_value")
    return tuple(stops)


def _model(body: dict) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise invalid("model must be a string", param="model", code="invalid_type")
    return value


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise invalid('stream_options must be {"include_usage": true|false}', param="stream_options",
                      code="invalid_value")
    if not stream:
        raise invalid("stream_options is only allowed with stream=true", param="stream_options",
                      code="invalid_value")
    return stream, _boolean(options, "include_usage")


def _sampling(body: dict, max_tokens: int | None) -> Sampling:
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_lo=True),
        top_k=max(0, _integer(body, "top_k", -1) or 0),  # -1 (vLLM) and 0 both turn it off
        seed=_integer(body, "seed", -2**63, 2**64 - 1),
        stop=_stop(body),
    )


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid(f"{param}: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                              param=param, code="invalid_value")
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"{param} must be a string or a list of text parts", param=param, code="invalid_type")


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages is required: a list of {'role': ..., 'content': ...}", param="messages",
                      code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", param="messages", code="invalid_type")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]",
                          code="invalid_type")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise invalid(f"messages[{i}] has fields this server does not support: {', '.join(sorted(extra))}",
                          param=f"messages[{i}]", code="unsupported_parameter")
        entry = {"role": message["role"], "content": _content(message, i)}
        if "name" in message:
            if not isinstance(message["name"], str):
                raise invalid(f"messages[{i}].name must be a string", param=f"messages[{i}].name",
                              code="invalid_type")
            entry["name"] = message["name"]
        out.append(entry)
    return tuple(out)


def _prompt(body: dict) -> str | tuple[int, ...]:
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("prompt is required: a string or a list of token ids", param="prompt",
                      code="missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise invalid(f"prompt holds {len(prompt)} prompts; this server takes one per request",
                          param="prompt", code="unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return tuple(prompt)
    raise invalid("prompt must be a string or a non-empty list of token ids", param="prompt", code="invalid_type")


def _require_object(body) -> dict:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise invalid("user must be a string", param="user", code="invalid_type")
    return body


def parse_chat(body) -> ChatRequest:
    body = _require_object(body)
    _check_fields(body, _CHAT_FIELDS, _NEUTRAL_CHAT)
    mct, mt = _integer(body, "max_completion_tokens", 1), _integer(body, "max_tokens", 1)
    if mct is not None and mt is not None and mct != mt:
        raise invalid("max_tokens and max_completion_tokens disagree; give one", param="max_tokens",
                      code="invalid_value")
    stream, include_usage = _stream(body)
    return ChatRequest(_model(body), _messages(body), _sampling(body, mct if mct is not None else mt),
                       stream, include_usage)


def parse_completion(body) -> CompletionRequest:
    body = _require_object(body)
    _check_fields(body, _COMPLETION_FIELDS, _NEUTRAL_COMPLETION)
    stream, include_usage = _stream(body)
    return CompletionRequest(_model(body), _prompt(body), _sampling(body, _integer(body, "max_tokens", 1)),
                             stream, include_usage)


# ---- responses -----------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, created: int, model: str, text: str, finish: str, used: dict) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": used, "system_fingerprint": None}


def chat_chunk(rid: str, created: int, model: str, delta: dict | None, finish: str | None = None,
               used: dict | None = None, with_usage: bool = False) -> dict:
    """One chunk; `delta=None` is the usage-only chunk (no choices) that ends an include_usage stream."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
             "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = used
    return chunk


def completion_response(rid: str, created: int, model: str, text: str, finish: str, used: dict) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": used, "system_fingerprint": None}


def completion_chunk(rid: str, created: int, model: str, text: str | None, finish: str | None = None,
                     used: dict | None = None, with_usage: bool = False) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
             "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = used
    return chunk


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "moe-offload"}
