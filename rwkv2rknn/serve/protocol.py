"""The OpenAI API's requests and responses: validation with OpenAI-style errors, and the JSON the API returns.

Every problem with a request is an ApiError: a status code and {"error": {"message", "type", "param", "code"}},
the shape the OpenAI API (and its client, which raises BadRequestError, NotFoundError, ... from it) uses.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from rwkv2rknn.serve.sampling import GenParams
from rwkv2rknn.serve.template import ROLES


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096        # the largest max_tokens a request may ask for
    max_stops: int = 16


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"{name} must be a number, got {type(v).__name__}", name, "invalid_type")
    if not lo <= v <= hi:
        raise _bad(f"{v} is not a valid {name}: it must be between {lo} and {hi}", name, "invalid_value")
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{name} must be an integer, got {type(v).__name__}", name, "invalid_type")
    if not lo <= v <= hi:
        raise _bad(f"{v} is not a valid {name}: it must be between {lo} and {hi}", name, "invalid_value")
    return v


def gen_params(body: dict, defaults: dict, limits: Limits, default_max_tokens: int, extra_stops=()) -> GenParams:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, min(default_max_tokens, limits.max_tokens), 1, limits.max_tokens)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > limits.max_stops:
        raise _bad(f"stop has {len(stops)} sequences; at most {limits.max_stops}", "stop", "invalid_value")
    if any(s == "" for s in stops):
        raise _bad("stop sequences must not be empty", "stop", "invalid_value")
    if _integer(body, "n", 1, 1, 1) != 1:
        raise _bad("n must be 1", "n")
    for unsupported in ("logprobs", "echo", "tools", "functions", "suffix"):
        v = body.get(unsupported)
        if v not in (None, False, [], 0) and not (unsupported == "tools" and v == []):
            raise _bad(f"{unsupported} is not supported by this server", unsupported, "unsupported_parameter")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed must be an integer", "seed", "invalid_type")
    return GenParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", defaults["temperature"], 0.0, 2.0),
        top_p=_number(body, "top_p", defaults["top_p"], 0.0, 1.0),
        top_k=_integer(body, "top_k", defaults["top_k"], 0, 1 << 30),
        presence_penalty=_number(body, "presence_penalty", defaults["presence_penalty"], -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", defaults["frequency_penalty"], -2.0, 2.0),
        penalty_decay=_number(body, "penalty_decay", defaults["penalty_decay"], 0.0, 1.0),
        seed=None if seed is None else abs(int(seed)),
        stop=stops + [s for s in extra_stops if s not in stops],
    )


def stream_options(body: dict) -> bool:
    """stream_options.include_usage (only with stream)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _bad("stream_options must be an object", "stream_options", "invalid_type")
    return bool(opts.get("include_usage"))


def flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"{name} must be true or false", name, "invalid_type")
    return v


def check_tokens(ids: list, vocab: int, param: str = "prompt") -> list[int]:
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise _bad(f"{param}: token ids must be integers", param, "invalid_type")
        if not 0 <= t < vocab:
            raise _bad(f"{param}: token id {t} is outside the model's vocabulary (0..{vocab - 1})", param,
                       "invalid_token_id")
    return list(ids)


def prompt_tokens(body: dict, tokenizer, vocab: int) -> list[int]:
    """/v1/completions' prompt: a string, a list of token ids, or a one-element list of either."""
    if "prompt" not in body:
        raise _bad("you must provide a prompt", "prompt", "missing_required_parameter")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        ids = tokenizer.encode(p)
    elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        ids = check_tokens(p, vocab)
    elif isinstance(p, list):
        raise _bad("one prompt per request: a string or a list of token ids (batches are not supported)", "prompt")
    else:
        raise _bad("prompt must be a string or a list of token ids", "prompt", "invalid_type")
    if not ids:
        raise _bad("the prompt is empty", "prompt", "empty_prompt")
    return ids


def messages(body: dict, param: str = "messages") -> list[tuple[str, str]]:
    msgs = body.get(param)
    if msgs is None:
        raise _bad(f"you must provide {param}", param, "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad(f"{param} must be a non-empty list", param, "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with role and content", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role {role!r} is not one of {', '.join(ROLES)}", f"{where}.role", "invalid_value")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):  # content parts: only text
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content: only text parts are supported", f"{where}.content",
                               "unsupported_content")
                parts.append(part["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content must be a string", f"{where}.content", "invalid_type")
        out.append((role, content))
    return out


# -- responses ---------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion(rid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": usage}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat(rid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": usage}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, usage: dict, chat_mode: bool) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat_mode else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage}
