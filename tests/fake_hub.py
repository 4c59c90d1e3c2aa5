"""A fake Hugging Face Hub on 127.0.0.1 (stdlib ThreadingHTTPServer) for the download tests: it serves the
endpoints huggingface_hub's `model_info` and `snapshot_download` call, for repos held in memory, and records every
request it answers.

    GET  /api/models/{repo}[/revision/{rev}]              {"id", "sha", "siblings": [{"rfilename"}]}
    GET  /api/models/{repo}/tree/{rev}?recursive=...      [{"type": "file", "path", "size", "oid"}]
    HEAD, GET /{repo}/resolve/{rev}/{file}                the bytes, with X-Repo-Commit, ETag, Content-Length

A repo can be gated (403, X-Error-Code: GatedRepo); an unknown one gets 404 with X-Error-Code: RepoNotFound, as the
Hub answers. `cut` names files whose GET stops half way (the connection closes), as a dropped download does.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    sha: str = field(default="")

    def __post_init__(self) -> None:
        digest = hashlib.sha1(b"".join(name.encode() + data for name, data in sorted(self.files.items())))
        self.sha = self.sha or digest.hexdigest()

    @classmethod
    def from_dir(cls, path: Path, **extra: bytes) -> Repo:
        files = {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        return cls({**files, **extra})


class FakeHub:
    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.cut: set[str] = set()  # file names whose download breaks off half way
        self.requests: list[str] = []  # "METHOD path" of every request answered
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> set[str]:
        """The file names downloaded (GET .../resolve/...)."""
        return {r.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests
                if r.startswith("GET ") and "/resolve/" in r}

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(f"{h.command} {path}")
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for marker in ("/revision/", "/tree/"):
                if marker in rest:
                    name = rest.split(marker, 1)[0]
                    break
            else:
                name = rest
            repo = self._repo(h, name)
            if repo is None:
                return
            if "/tree/" in rest:
                listing = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                           for n, d in sorted(repo.files.items())]
                return _send(h, 200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
            info = {"id": name, "modelId": name, "sha": repo.sha, "private": False, "gated": repo.gated,
                    "siblings": [{"rfilename": n} for n in sorted(repo.files)]}
            return _send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if "/resolve/" in path:
            name, rest = path.lstrip("/").split("/resolve/", 1)
            repo = self._repo(h, name)
            if repo is None:
                return
            file = rest.split("/", 1)[1] if "/" in rest else ""
            if file not in repo.files:
                return _send(h, 404, b"entry not found", {"X-Error-Code": "EntryNotFound"}, body)
            data = repo.files[file]
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            if body and file in self.cut:  # promise every byte, send half, hang up
                h.send_response(200)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    h.send_header(k, v)
                h.end_headers()
                h.wfile.write(data[:len(data) // 2])
                h.wfile.flush()
                h.close_connection = True
                return
            return _send(h, 200, data, headers, body)
        _send(h, 404, b"not found", {}, body)

    def _repo(self, h: BaseHTTPRequestHandler, name: str) -> Repo | None:
        repo = self.repos.get(name)
        if repo is None:
            _send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, True)
        elif repo.gated:
            _send(h, 403, b'{"error": "Access to this model is restricted"}', {"X-Error-Code": "GatedRepo"}, True)
        else:
            return repo
        return None


def _send(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
    h.send_response(status)
    for k, v in {**headers, "Content-Length": str(len(data))}.items():
        h.send_header(k, v)
    h.end_headers()
    if body and h.command != "HEAD":
        h.wfile.write(data)
