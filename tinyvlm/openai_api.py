"""OpenAI's chat-completions API for the server (server.py): a request body checked and turned into what tinyvlm
runs, and the response objects. No HTTP here.

Accepted in a request: `model`, `messages` (system, user and assistant turns; content a string or a list of
`text` and `image_url` parts), `stream`, `stream_options.include_usage`, `max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `top_k`, `seed`, `stop`, `repetition_penalty`, `response_format` ({"type": "text"},
"json_object", or "json_schema" with the subset of json_constraint.py), `n` (1 only) and `user` (ignored). Any other
field is refused with a 400 naming it, never ignored. Images: one per conversation (MobileVLM's prompt holds one),
as a `data:` URI (always), an http(s) URL (only when the server allows remote media) or a local path or file://
URL (only inside the allowed media folder, after resolving `..` and symbolic links).
"""
from __future__ import annotations

import base64
import binascii
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tinyvlm.config import GenerationConfig
from tinyvlm.errors import TinyVLMError
from tinyvlm.json_grammar import response_schema
from tinyvlm.prompt import IMAGE_TOKEN

KNOWN = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
         "top_p", "top_k", "seed", "stop", "repetition_penalty", "n", "user", "response_format"}
REMOTE_MEDIA_BYTES = 20 * 2**20  # the most an http(s) image may send


class ApiError(Exception):
    """An error answered with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Media:
    """Where images may come from."""

    allowed_path: Path | None = None  # local files only inside this folder (resolved)
    remote: bool = False  # http(s) URLs


@dataclass
class ChatRequest:
    config: GenerationConfig
    system: str | None
    turns: list[tuple[str, str | None]]  # (user text, answer); the last answer None: the one to write
    image: bytes | Path | None  # the conversation's image, as file bytes or a checked local path
    image_turn: int  # which turn carries the image
    stream: bool
    include_usage: bool
    stop: list[str] = field(default_factory=list)
    response_format: dict[str, Any] | None = None  # checked: json_object or json_schema


def parse(body: Any, media: Media) -> ChatRequest:
    """The request, checked; ApiError (400) for anything malformed."""
    try:
        return _parse(body, media)
    except ApiError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a shape the checks did not foresee
        raise ApiError(400, f"malformed request ({type(e).__name__}: {str(e)[:200]})") from None


def _parse(body: Any, media: Media) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(400, f"unsupported parameter {unknown[0]!r}; tinyvlm accepts: {', '.join(sorted(KNOWN))}",
                       param=unknown[0], code="unsupported_parameter")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: tinyvlm writes one choice per request", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    gen = {"max_new_tokens": max_tokens, "temperature": body.get("temperature"), "top_p": body.get("top_p"),
           "top_k": body.get("top_k"), "seed": body.get("seed"), "repetition_penalty": body.get("repetition_penalty")}
    try:
        config = GenerationConfig(**{k: v for k, v in gen.items() if v is not None})
    except TinyVLMError as e:
        raise ApiError(400, str(e)) from None
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "stream must be true or false, and stream_options may hold only include_usage",
                       param="stream")
    response_format = body.get("response_format")
    if response_format == {"type": "text"}:
        response_format = None
    if response_format is not None:
        try:
            response_schema(response_format)
        except TinyVLMError as e:
            raise ApiError(400, f"response_format: {e}", param="response_format") from None
    system, turns, image, image_turn = _conversation(body.get("messages"), media)
    return ChatRequest(config, system, turns, image, image_turn, stream, bool(options.get("include_usage")), stop,
                       response_format)


def _conversation(messages: Any, media: Media) -> tuple[str | None, list[tuple[str, str | None]], Any, int]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    system, turns, image, image_turn = None, [], None, -1
    pending: str | None = None  # a user text waiting for its answer
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where} must be an object with role system, user or assistant", param=where)
        text, images = _content(message.get("content"), where, media)
        role = message["role"]
        if images and role != "user":
            raise ApiError(400, f"{where}: only user messages may carry images", param=where)
        if images:
            if image is not None or len(images) > 1:
                raise ApiError(400, "one image per conversation: MobileVLM's prompt holds one", param=where)
            image, image_turn = images[0], len(turns)
        if role == "system":
            system = text if system is None else f"{system}\n{text}"
        elif role == "user":
            pending = text if pending is None else f"{pending}\n{text}"
        else:
            if pending is None:
                raise ApiError(400, f"{where}: an assistant message must follow a user message", param=where)
            turns.append((pending, text))
            pending = None
    if pending is None:
        raise ApiError(400, "the last message must be the user's", param="messages")
    turns.append((pending, None))
    return system, turns, image, image_turn


def _content(content: Any, where: str, media: Media) -> tuple[str, list[Any]]:
    if isinstance(content, str):
        parts: list[Any] = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise ApiError(400, f"{where}.content must be a string or a list of parts", param=where)
    texts, images = [], []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_TOKEN in part["text"]:
                raise ApiError(400, f"{at}: the text may not contain {IMAGE_TOKEN}; send images as image_url parts",
                               param=at)
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), (dict, str)):
            url = part["image_url"].get("url") if isinstance(part["image_url"], dict) else part["image_url"]
            if not isinstance(url, str):
                raise ApiError(400, f"{at}.image_url.url must be a string", param=at)
            images.append(_image(url, at, media))
        else:
            raise ApiError(400, f"{at} must be a text part or an image_url part", param=at)
    return "\n".join(texts), images


def _image(url: str, at: str, media: Media) -> bytes | Path:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, f"{at}: a data URI must be base64 (data:image/...;base64,...)", param=at)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{at}: the data URI is not valid base64", param=at) from None
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        if not media.remote:
            raise ApiError(400, f"{at}: http(s) images are off on this server (start it with --allow-remote-media)",
                           param=at)
        return _fetch(url, at)
    if parsed.scheme in ("file", ""):
        return _local(Path(unquote(parsed.path) if parsed.scheme else url), at, media)
    raise ApiError(400, f"{at}: unsupported image URL scheme {parsed.scheme!r}; send a data: URI", param=at)


def _local(path: Path, at: str, media: Media) -> Path:
    if media.allowed_path is None:
        raise ApiError(400, f"{at}: local image paths are off on this server (start it with --allowed-media-path)",
                       param=at)
    root = media.allowed_path.resolve()
    try:
        resolved = (root / path).resolve()  # an absolute path stays itself
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a link loop
        raise ApiError(400, f"{at}: not a usable image path", param=at) from None
    if resolved != root and root not in resolved.parents:
        raise ApiError(400, f"{at}: the image path is outside the allowed media folder", param=at)
    if not resolved.is_file():
        raise ApiError(400, f"{at}: no image file at that path in the allowed media folder", param=at)
    return resolved


def _fetch(url: str, at: str) -> bytes:
    import http.client
    import urllib.request

    class HttpOnly(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, new_url):  # type: ignore[no-untyped-def]
            if urlparse(new_url).scheme not in ("http", "https"):
                raise ApiError(400, f"{at}: the image URL redirects away from http(s)", param=at)
            return super().redirect_request(req, fp, code, msg, headers, new_url)

    try:
        with urllib.request.build_opener(HttpOnly).open(url, timeout=15) as response:
            data = response.read(REMOTE_MEDIA_BYTES + 1)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise ApiError(400, f"{at}: could not fetch the image ({type(e).__name__}: {e})", param=at) from None
    if len(data) > REMOTE_MEDIA_BYTES:
        raise ApiError(400, f"{at}: the image is larger than {REMOTE_MEDIA_BYTES // 2**20} MiB", param=at)
    return data


# ---------------------------------------------------------------- responses

def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def completion(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(rid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def api_key_from_env() -> str | None:
    return os.environ.get("TINYVLM_API_KEY") or None
