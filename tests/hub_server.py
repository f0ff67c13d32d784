"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1, serving what huggingface_hub's downloads ask for.

Endpoints (as huggingface_hub 2.x calls them; read from its hf_api.py and file_download.py):

* ``GET /api/models/{repo}[/revision/{rev}]?blobs=true`` -> JSON with ``sha`` and ``siblings``
  (``rfilename``, ``size``) — :meth:`HfApi.model_info`;
* ``HEAD /{repo}/resolve/{rev}/{file}`` -> ``X-Repo-Commit``, ``ETag``, ``Content-Length`` — the
  metadata call of ``hf_hub_download``;
* ``GET`` of the same path -> the bytes (``Range: bytes=N-`` answered with 206, for resumes).

Errors carry the ``X-Error-Code`` header the Hub sends (RepoNotFound, RevisionNotFound,
GatedRepo, EntryNotFound), which huggingface_hub turns into its typed exceptions. No Xet
headers are sent, so downloads are plain HTTP. Every request is logged for the tests to count.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    """Commits (sha -> {file name: bytes}) and refs (branch or tag -> sha) of one model repository."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False

    def add_commit(self, files: dict[str, bytes], *refs: str) -> str:
        sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                           .encode() + str(len(self.commits)).encode()).hexdigest()
        self.commits[sha] = dict(files)
        for ref in refs or ("main",):
            self.refs[ref] = sha
        return sha

    def commit_of(self, revision: str) -> str | None:
        return revision if revision in self.commits else self.refs.get(revision)


class HubStandIn:
    """Serves ``repos`` until :meth:`stop`; ``requests`` logs (method, path, Range header) of every call.

    ``cut[(repo, file)] = "resume"`` ends the first GET of that file half-way (the connection
    closes) and answers the ranged retry properly; ``"fail"`` answers the retry with HTTP 503.
    """

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._cut_done: set[tuple[str, str]] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "HubStandIn":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def file_gets(self) -> list[str]:
        """Paths of the file bodies requested (GET .../resolve/...)."""
        with self._lock:
            return [path for method, path, _ in self.requests if method == "GET" and "/resolve/" in path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                with hub._lock:
                    hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    self._model_info("/".join(parts[2:4]), "/".join(parts[5:]) if len(parts) > 5 else "main")
                elif len(parts) >= 5 and parts[2] == "resolve":
                    self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
                else:
                    self._error(404, "RepoNotFound")

            def _model_info(self, repo_id: str, revision: str) -> None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound")
                sha = repo.commit_of(revision)
                if sha is None:
                    return self._error(404, "RevisionNotFound")
                siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.commits[sha].items())]
                payload = json.dumps({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                                      "gated": "manual" if repo.gated else False, "siblings": siblings}).encode()
                self._reply(200, {"Content-Type": "application/json"}, payload, True)

            def _resolve(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound")
                if repo.gated and "authorization" not in {k.lower() for k in self.headers.keys()}:
                    return self._error(401, "GatedRepo")
                sha = repo.commit_of(revision)
                if sha is None:
                    return self._error(404, "RevisionNotFound")
                data = repo.commits[sha].get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", {"X-Repo-Commit": sha})
                headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                           "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
                key = (repo_id, filename)
                ranged = self.headers.get("Range")
                if body and key in hub.cut:
                    with hub._lock:
                        first = key not in hub._cut_done
                        hub._cut_done.add(key)
                    if first:  # headers for the whole file, half of it, then the connection drops
                        self.send_response(200)
                        for name, value in {**headers, "Content-Length": str(len(data))}.items():
                            self.send_header(name, value)
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if hub.cut[key] == "fail":
                        return self._error(503, None)
                if body and ranged and ranged.startswith("bytes="):
                    start = int(ranged.removeprefix("bytes=").split("-")[0])
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self._reply(206, headers, data[start:], True)
                self._reply(200, headers, data, body)

            def _error(self, status: int, code: str | None, extra: dict[str, str] | None = None) -> None:
                headers = {"Content-Type": "application/json", **(extra or {})}
                if code:
                    headers["X-Error-Code"] = code
                self._reply(status, headers, json.dumps({"error": code or "unavailable"}).encode(), True)

            def _reply(self, status: int, headers: dict[str, str], payload: bytes, body: bool) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

        return Handler
