"""The OpenAI-compatible server (tinyvlm/server.py) against the real `openai` client, on 127.0.0.1, with the tiny V2
checkpoint. Every server is stopped by its test; every request is bounded in time."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

import tinyvlm
from tinyvlm.openai_api import Media
from tinyvlm.server import Server

openai = pytest.importorskip("openai")
BACKEND_FREE = True
pytestmark = pytest.mark.torch  # the checkpoint is written through torch
MODEL = "org/MobileVLM_V2-tiny"
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def vlm(checkpoints):
    return tinyvlm.load(checkpoints["v2"].path)


@pytest.fixture(scope="module")
def photo_uri(shared_data) -> str:
    return "data:image/jpeg;base64," + base64.b64encode((shared_data / "images" / "test-1.jpeg").read_bytes()).decode()


def start(vlm, **options) -> Server:
    server = Server(lambda: vlm, MODEL, port=0, **options)
    server.load_in_background().join()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def server(vlm, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    s = start(vlm, api_key=KEY, media=Media(media), max_body=200_000)
    yield s
    s.shutdown()


def client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, timeout=120, max_retries=0)


def question(url: str, text: str = "What is in the image?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_plain_streamed_and_models(server, vlm, photo_uri, shared_data):
    c = client(server)
    assert [m.id for m in c.models.list()] == [MODEL]
    reply = c.chat.completions.create(model=MODEL, messages=question(photo_uri), max_tokens=8)
    text = reply.choices[0].message.content
    assert text == vlm.generate("What is in the image?", image=shared_data / "images" / "test-1.jpeg",
                                max_new_tokens=8)
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens <= 8
    assert reply.usage.prompt_tokens == len(vlm.prompt_ids("What is in the image?")) - 1 + 144
    chunks = list(c.chat.completions.create(model=MODEL, messages=question(photo_uri), max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip() == text
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert vlm.image_cache.hits >= 2  # the second and third requests about the photo skipped the vision tower


def test_a_conversation_with_a_system_message_and_an_earlier_answer(server, vlm, photo_uri):
    messages = [{"role": "system", "content": "Answer briefly."}, *question(photo_uri, "Describe it."),
                {"role": "assistant", "content": "A newspaper."}, {"role": "user", "content": "And the headline?"}]
    reply = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize("url, says", [
    ("data:image/png;base64,@@@not-base64@@@", "is not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"plain text, not an image").decode(), "not a readable image"),
    ("http://127.0.0.1:9/photo.jpg", "http(s) images are off on this server"),
    ("../outside.png", "outside the allowed media folder"),
    ("/etc/passwd", "outside the allowed media folder"),
    ("ftp://example.com/a.png", "unsupported image URL scheme"),
])
def test_bad_images_are_400(server, url, says):
    with pytest.raises(openai.BadRequestError, match=says.replace("(", r"\(").replace(")", r"\)")):
        client(server).chat.completions.create(model=MODEL, messages=question(url), max_tokens=2)


def test_a_decompression_bomb_is_400(server):
    png = io.BytesIO()
    Image.new("1", (13000, 13000)).save(png, "PNG")  # 169 M pixels: over Pillow's limit, a few kB of file
    uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    with pytest.raises(openai.BadRequestError, match="pixels"):
        client(server).chat.completions.create(model=MODEL, messages=question(uri), max_tokens=2)


def test_local_paths_stay_inside_the_media_folder(server, tmp_path, shared_data):
    media = tmp_path / "media"
    (media / "photo.jpg").write_bytes((shared_data / "images" / "test-1.jpeg").read_bytes())
    (tmp_path / "secret.jpg").write_bytes((shared_data / "images" / "test-1.jpeg").read_bytes())
    (media / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    c = client(server)
    ok = c.chat.completions.create(model=MODEL, messages=question("photo.jpg"), max_tokens=2)
    assert ok.choices[0].message.content is not None
    for escape in ("link.jpg", f"file://{tmp_path / 'secret.jpg'}", "sub/../../secret.jpg"):
        with pytest.raises(openai.BadRequestError, match="outside the allowed media folder"):
            c.chat.completions.create(model=MODEL, messages=question(escape), max_tokens=2)


def test_unknown_model_parameter_key_and_body_size(server, photo_uri):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(server).chat.completions.create(model="gpt-4o", messages=question(photo_uri), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="unsupported parameter 'logprobs'"):
        client(server).chat.completions.create(model=MODEL, messages=question(photo_uri), logprobs=True)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    request = urllib.request.Request(server.url + "/v1/models")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
    big = question("data:image/png;base64," + "A" * 300_000)  # over this server's 200 kB body limit
    with pytest.raises(openai.APIStatusError) as e:
        client(server).chat.completions.create(model=MODEL, messages=big, max_tokens=2)
    assert e.value.status_code == 413
    urllib.request.urlopen(urllib.request.Request(server.url + "/health"), timeout=30)  # /health needs no key


def test_eight_clients_at_once_get_the_answer_one_gets_alone(vlm, photo_uri):
    server = start(vlm, max_queue=8)
    try:
        ask = lambda _: client(server).chat.completions.create(  # noqa: E731
            model=MODEL, messages=question(photo_uri), max_tokens=8).choices[0].message.content
        alone = ask(0)
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, range(8))) == [alone] * 8
    finally:
        server.shutdown()


def test_past_the_queue_is_503_with_retry_after(vlm, photo_uri):
    server = start(vlm, max_queue=1)
    pool = ThreadPoolExecutor(1)
    try:
        with server.model_lock:  # the model busy: the first request is admitted and waits, the second is refused
            waiting = pool.submit(lambda: client(server).chat.completions.create(
                model=MODEL, messages=question(photo_uri), max_tokens=2))
            for _ in range(3000):
                if server.slots._value == 0:  # noqa: SLF001 (the admitted request holds the one slot)
                    break
                threading.Event().wait(0.01)
            else:
                pytest.fail("the first request was never admitted")
            with pytest.raises(openai.APIStatusError) as e:
                client(server).chat.completions.create(model=MODEL, messages=question(photo_uri), max_tokens=2)
            assert e.value.status_code == 503 and e.value.response.headers["Retry-After"] == "1"
        assert waiting.result(timeout=120).choices[0].message.content is not None  # the lock is free now
    finally:
        pool.shutdown()
        server.shutdown()


def test_a_client_gone_mid_stream_frees_the_model(vlm, photo_uri):
    server = start(vlm)
    try:
        body = json.dumps({"model": MODEL, "messages": question(photo_uri), "max_tokens": 400, "stream": True,
                           "temperature": 0.8, "seed": 1}).encode()
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            received = b""
            while b"data: " not in received:  # the headers, then the first event: the stream has started
                more = s.recv(4096)
                assert more, received
                received += more
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # hang up: reset
        reply = client(server).chat.completions.create(model=MODEL, messages=question(photo_uri), max_tokens=4)
        assert reply.choices[0].message.content is not None
        for _ in range(500):  # the gone client's handler may still be between the model and its slot
            if server.slots._value == 8:  # noqa: SLF001 (every slot free again)
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("a slot was never freed")
    finally:
        server.shutdown()


def test_health_is_503_while_loading(vlm):
    loaded = threading.Event()
    server = Server(lambda: loaded.wait(60) and vlm, MODEL, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        server.load_in_background()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url + "/health", timeout=30)
        assert e.value.code == 503 and json.loads(e.value.read())["status"] == "loading"
        loaded.set()
        for _ in range(300):
            try:
                assert urllib.request.urlopen(server.url + "/health", timeout=30).status == 200
                break
            except urllib.error.HTTPError:
                threading.Event().wait(0.01)
        else:
            pytest.fail("the server never became ready")
        metrics = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
        assert "tinyvlm_time_to_first_token_seconds_count" in metrics
    finally:
        server.shutdown()


def test_readme_curl_and_openai_examples(checkpoints, tmp_path):
    """The README's server block, run as written: `serve` in a subprocess (the model named by path here), then
    its curl command and its Python example against it."""
    import re
    import shlex
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Serving"):]
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    serve_line = next(line for line in shell.splitlines() if "tinyvlm serve" in line)
    args = shlex.split(serve_line.rstrip(" &"))
    args[args.index("--model") + 1] = str(checkpoints["v2"].path)
    args[args.index("--port") + 1] = "0"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, *args[1:]], cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"on (http://\S+)", proc.stderr.readline()).group(1)
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/health", timeout=30).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                threading.Event().wait(0.1)
        curl = shell[shell.index("curl"):].replace("http://127.0.0.1:8080", url)
        done = subprocess.run(["bash", "-c", curl], cwd=root, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and json.loads(done.stdout)["choices"][0]["message"]["content"] is not None
        script = python.replace("http://127.0.0.1:8080", url).replace('"mtgv/MobileVLM_V2-1.7B"',
                                                                      repr(str(checkpoints["v2"].path)))
        done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def raw(server: Server, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        received = b""
        while more := s.recv(65536):
            received += more
    return received


@pytest.mark.parametrize("part, says", [
    ({"type": "image_url", "image_url": {}}, "image_url.url must be a string"),
    ({"type": "image_url", "image_url": {"url": "file:///a%00b.png"}}, "not a usable image path"),
    ({"type": "audio", "audio": "x"}, "must be a text part or an image_url part"),
])
def test_malformed_parts_are_400(server, part, says):
    with pytest.raises(openai.BadRequestError, match=says):
        client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [part]}])


def test_an_unread_body_is_never_taken_for_a_request(server):
    """A refused POST closes its connection: the body it carried cannot be smuggled in as the next request."""
    inner = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    for headers in (b"Authorization: Bearer wrong\r\n", f"Authorization: Bearer {KEY}\r\n".encode()):
        path = b"/v1/chat/completions" if b"wrong" in headers else b"/v1/nowhere"
        answer = raw(server, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"Content-Length: "
                     + str(len(inner)).encode() + b"\r\n\r\n" + inner)
        assert answer.count(b"HTTP/1.1 ") == 1 and answer.split(b"\r\n")[0] in (b"HTTP/1.1 401 Unauthorized",
                                                                               b"HTTP/1.1 404 Not Found")
    answer = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Length: \xb2\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"Content-Length" in answer


def test_remote_media_when_allowed(vlm, shared_data):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    photo = (shared_data / "images" / "test-1.jpeg").read_bytes()

    class Files(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1/photo.jpg")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(photo)))
            self.end_headers()
            self.wfile.write(photo)

    files = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    server = start(vlm, media=Media(remote=True))
    try:
        base = f"http://127.0.0.1:{files.server_address[1]}"
        reply = client(server).chat.completions.create(model=MODEL, messages=question(base + "/photo.jpg"),
                                                       max_tokens=2)
        assert reply.choices[0].message.content is not None
        with pytest.raises(openai.BadRequestError, match="redirects away from http"):
            client(server).chat.completions.create(model=MODEL, messages=question(base + "/away"), max_tokens=2)
    finally:
        server.shutdown()
        files.shutdown()
        files.server_close()


def test_response_format_json(server, photo_uri):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}, "things": {"type": "array",
              "items": {"type": "string"}}}, "required": ["colour", "things"]}
    c = client(server)
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}):
        reply = c.chat.completions.create(model=MODEL, messages=question(photo_uri), max_tokens=40,
                                          response_format=fmt)
        value = json.loads(reply.choices[0].message.content)
        assert isinstance(value, dict) and (fmt["type"] == "json_object" or value["colour"] in ("red", "blue"))
    with pytest.raises(openai.BadRequestError, match="response_format: .*'pattern' is not supported"):
        c.chat.completions.create(model=MODEL, messages=question(photo_uri), max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "string", "pattern": "x"}}}}})
