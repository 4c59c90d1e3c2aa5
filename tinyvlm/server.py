"""`python -m tinyvlm serve`: one model behind an OpenAI-compatible HTTP API, on the standard library's
ThreadingHTTPServer (no dependency: the alternatives measured 7 to 59 packages).

    POST /v1/chat/completions   openai_api.py's subset; `stream: true` answers with Server-Sent Events
    GET  /v1/models             the one model
    GET  /health                503 while the model loads, 200 when it is ready
    GET  /metrics               Prometheus text: requests, tokens, time to first token, decode tok/s

One model, one request at a time: a request waits for the model's lock, and at most `max_queue` requests are
admitted (running or waiting); past that, 503 with Retry-After. Each request has its own KV cache, so a client that
goes away mid-stream only stops its own generation and frees the model. With an API key every request but
/health needs `Authorization: Bearer KEY` (compared in constant time), else 401. Bodies over `max_body` bytes get
413 unread; a connection idle for `timeout` seconds is closed.
"""
from __future__ import annotations

import hmac
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tinyvlm import openai_api
from tinyvlm.errors import TinyVLMError
from tinyvlm.limits import parse_json
from tinyvlm.openai_api import ApiError, ChatRequest, Media
from tinyvlm.prompt import IMAGE_TOKEN, render, tokenize_with_images


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}  # status -> count
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.decode_tokens, self.decode_seconds = 0, 0.0

    def text(self) -> str:
        with self.lock:
            lines = ["# TYPE tinyvlm_requests_total counter"]
            lines += [f'tinyvlm_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            rate = self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0
            lines += ["# TYPE tinyvlm_prompt_tokens_total counter", f"tinyvlm_prompt_tokens_total {self.prompt_tokens}",
                      "# TYPE tinyvlm_completion_tokens_total counter",
                      f"tinyvlm_completion_tokens_total {self.completion_tokens}",
                      "# TYPE tinyvlm_time_to_first_token_seconds summary",
                      f"tinyvlm_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"tinyvlm_time_to_first_token_seconds_count {self.ttft_count}",
                      "# TYPE tinyvlm_decode_tokens_per_second gauge", f"tinyvlm_decode_tokens_per_second {rate:.3f}"]
        return "\n".join(lines) + "\n"


class Server:
    def __init__(self, load: Callable[[], Any], model_id: str, host: str = "127.0.0.1", port: int = 8080,
                 api_key: str | None = None, max_queue: int = 8, media: Media | None = None,
                 max_body: int = 32 * 2**20, timeout: float = 60.0) -> None:
        self.model_id, self.api_key, self.media, self.max_body = model_id, api_key, media or Media(), max_body
        self.vlm: Any = None
        self.load_error: str | None = None
        self.model_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(max_queue)
        self.metrics = Metrics()
        self._load = load
        handler = type("Handler", (_Handler,), {"server_state": self, "timeout": timeout})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"

    def load_in_background(self) -> threading.Thread:
        def run() -> None:
            try:
                self.vlm = self._load()
            except Exception as e:  # reported by /health and every request: the server stays up to say so
                self.load_error = f"{type(e).__name__}: {e}"
                print(f"tinyvlm: error: {e}", file=sys.stderr)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---------------------------------------------------------------- a chat completion

    def prompt(self, req: ChatRequest) -> tuple[list[int], list[Any]]:
        vlm = self.vlm
        turns = list(req.turns)
        images: list[Any] = []
        if req.image is not None:
            if vlm.vision is None:
                raise ApiError(400, f"{self.model_id} is a text-only model: it cannot take an image")
            question, answer = turns[req.image_turn]
            turns[req.image_turn] = (f"{IMAGE_TOKEN}\n{question}", answer)
            images = [vlm.encode_image(req.image)]
        return tokenize_with_images(vlm.tokenizer, render(vlm.template, req.system, turns)), images


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass

    def do_GET(self) -> None:  # noqa: N802
        state = self.server_state
        if self.path == "/health":
            if state.vlm is not None:
                return self._json(200, {"status": "ok"})
            return self._json(503, {"status": "error" if state.load_error else "loading",
                                    **({"error": state.load_error} if state.load_error else {})})
        if not self._authorized():
            return
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": state.model_id, "object": "model",
                                                                 "created": 0, "owned_by": "tinyvlm"}]})
        if self.path == "/metrics":
            return self._send(200, state.metrics.text().encode(), "text/plain; version=0.0.4")
        self._error(ApiError(404, f"no such endpoint: GET {self.path[:100]}"))

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path != "/v1/chat/completions":
            return self._error(ApiError(404, f"no such endpoint: POST {self.path[:100]}"))
        state = self.server_state
        if not state.slots.acquire(blocking=False):  # before the body: the queue bounds the memory held too
            return self._error(ApiError(503, "the server is busy: too many requests queued; try again"),
                               {"Retry-After": "1"})
        self.streaming = False  # whether a 200 and the event-stream headers have gone out
        try:
            body = self._body()
            if state.vlm is None:
                raise ApiError(503, state.load_error or "the model is still loading", code="model_loading")
            req = openai_api.parse(body, state.media)
            if body.get("model") not in (None, "", state.model_id):
                raise ApiError(404, f"the model {str(body.get('model'))[:100]!r} does not exist; this server has "
                                    f"{state.model_id!r}", param="model", code="model_not_found")
            with state.model_lock:
                self._complete(req, time.perf_counter())
        except ApiError as e:
            self._fail(e)
        except TinyVLMError as e:  # a bad image, a prompt longer than the context
            self._fail(ApiError(400, str(e)))
        except Exception as e:  # a bug: the client gets a 500 in OpenAI's form, the server stays up
            print(f"tinyvlm: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            self._fail(ApiError(500, f"internal error ({type(e).__name__})"))
        finally:
            state.slots.release()

    def _fail(self, e: ApiError) -> None:
        """An error as a response, or, once a stream has begun, as its last event."""
        if not self.streaming:
            return self._error(e)
        try:
            self._event(e.body())
        except OSError:
            pass
        self.close_connection = True

    def _complete(self, req: ChatRequest, start: float) -> None:
        state, vlm = self.server_state, self.server_state.vlm
        vlm.stats.reset()
        ids, images = state.prompt(req)
        embeds = vlm.embed(ids, images)
        generated: list[int] = []
        pieces = vlm.reply(embeds, vlm.language.new_cache(), req.config, req.stop, [t for t in ids if t >= 0],
                           generated, vlm.json_constraint(req.response_format))
        rid, model = openai_api.new_id(), state.model_id
        first: float | None = None
        texts: list[str] = []
        try:
            if req.stream:
                self.send_response(200)
                for k, v in {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                             "Connection": "close"}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.close_connection = self.streaming = True
                self._event(openai_api.chunk(rid, model, {"role": "assistant", "content": ""}))
            for piece in pieces:
                first = first or time.perf_counter()
                texts.append(piece)
                if req.stream:
                    self._event(openai_api.chunk(rid, model, {"content": piece}))
        except OSError:  # the client went away: stop generating (finally), free the model
            self._count(499, len(embeds), generated, start, first)
            return
        finally:
            pieces.close()  # a no-op once the text has ended; stops the generation on any other exit
        finish = "length" if len(generated) >= req.config.max_new_tokens else "stop"
        self._count(200, len(embeds), generated, start, first)
        if not req.stream:
            text = "".join(texts).strip()
            return self._json(200, openai_api.completion(rid, model, text, finish, len(embeds), len(generated)))
        try:
            self._event(openai_api.chunk(rid, model, {}, finish))
            if req.include_usage:
                self._event({**openai_api.chunk(rid, model, {}), "choices": [],
                             "usage": openai_api.usage(len(embeds), len(generated))})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:
            pass

    def _count(self, status: int, prompt_tokens: int, generated: list[int], start: float, first: float | None) -> None:
        m, stats = self.server_state.metrics, self.server_state.vlm.stats
        with m.lock:
            m.requests[status] = m.requests.get(status, 0) + 1
            m.prompt_tokens += prompt_tokens
            m.completion_tokens += len(generated)
            if first is not None:
                m.ttft_sum += first - start
                m.ttft_count += 1
            m.decode_tokens += stats.decode_tokens
            m.decode_seconds += stats.decode_s or 0.0

    # ---------------------------------------------------------------- plumbing

    def _authorized(self) -> bool:
        key = self.server_state.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")  # http.server decodes headers as latin-1
        if hmac.compare_digest(given.encode("latin-1", "replace"), f"Bearer {key}".encode()):
            return True
        self._error(ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key"))
        return False

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not re.fullmatch(r"[0-9]{1,15}", length.strip()):
            raise ApiError(400, "a request body needs a Content-Length header (chunked bodies are not taken)")
        length = length.strip()
        if int(length) > self.server_state.max_body:
            self.close_connection = True  # the body stays unread
            raise ApiError(413, f"the body is {length} bytes, over this server's {self.server_state.max_body}")
        try:
            return parse_json(self.rfile.read(int(length)), "the request body", TinyVLMError)
        except TinyVLMError as e:
            raise ApiError(400, str(e)) from None

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _error(self, e: ApiError, headers: dict[str, str] | None = None) -> None:
        """An error response; the connection then closes, since a request body may be left unread."""
        self.close_connection = True
        m = self.server_state.metrics
        with m.lock:
            m.requests[e.status] = m.requests.get(e.status, 0) + 1
        self._json(e.status, e.body(), {"Connection": "close", **(headers or {})})

    def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for k, v in {"Content-Type": kind, "Content-Length": str(len(data)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True
