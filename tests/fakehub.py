"""A fake Hugging Face Hub for tests: the part of the Hub's HTTP API that huggingface_hub
(1.x) and hearth_worker.pull use, served in-process on 127.0.0.1.

* ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true``): the repository's
  info with its files (``siblings``: size, git blob id, LFS sha256), as
  ``HfApi.model_info(files_metadata=True)`` asks it;
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``?recursive=true``): ``list_repo_tree``;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: small (git) files answered directly with
  ``ETag`` (the blob id) and ``X-Repo-Commit``; LFS files answered with a 302 to a
  "CDN" URL on the same server (``/lfs-cdn/{sha256}``), carrying ``X-Linked-Etag`` and
  ``X-Linked-Size`` as the real Hub does; ``Range: bytes=N-`` answered with 206.
* Unknown repositories: 401 with ``X-Error-Code: RepoNotFound`` (what the Hub says to
  anyone about a repository that does not exist or is private); unknown files: 404
  ``EntryNotFound``.

Repositories are real model folders: ``hub.add_repo("owner/name", {"sub/folder": path})``
serves each folder's files (without its ``hearth-model.json``) under that prefix;
``files={"README.md": b"..."}`` adds single files. Knobs: ``drop_after(repo, path,
nbytes, times=1)`` closes the connection after ``nbytes`` of the file's body (the next
``times`` downloads), ``corrupt(repo, path)`` serves the file with one byte changed
(the metadata keeps the true hash), ``stall_after(repo, path, nbytes)`` stops sending
mid-file with the connection open (a hung network), ``slow(seconds)`` waits after each
64 KiB sent, ``ranges = False`` ignores Range headers.
``served_bytes(repo, path)`` counts body bytes sent, ``downloads(repo, path)`` the GETs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

MANIFEST = "hearth-model.json"
LFS_SUFFIXES = (".onnx", ".data", ".onnx_data", ".bin", ".safetensors", ".gguf")
LFS_MIN_BYTES = 1024 * 1024


@dataclass
class HubFile:
    path: str  # in the repository
    source: Path | bytes
    size: int
    blob_id: str  # git blob sha1 (of the pointer file, for LFS files)
    sha256: str
    lfs: bool

    def read(self) -> bytes:
        return self.source if isinstance(self.source, bytes) else self.source.read_bytes()


def _hub_file(path: str, source: Path | bytes) -> HubFile:
    data = source if isinstance(source, bytes) else source.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_BYTES
    if lfs:  # git stores the LFS pointer file
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
        ).encode()
        stored = pointer
    else:
        stored = data
    blob_id = hashlib.sha1(
        f"blob {len(stored)}\0".encode() + stored, usedforsecurity=False
    ).hexdigest()
    return HubFile(path, source, len(data), blob_id, sha256, lfs)


@dataclass
class Repo:
    repo_id: str
    files: dict[str, HubFile]
    sha: str


class FakeHub:
    """Start with ``with FakeHub() as hub:`` (or start()/stop()); ``hub.url`` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served: dict[tuple[str, str], int] = {}
        self.started: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.delay = 0.0
        self.ranges = True  # False: Range headers are ignored (200 with the whole file)
        self._connections: set[socket.socket] = set()
        self._stalls: dict[tuple[str, str], int] = {}
        self._stopping = threading.Event()
        self._drops: dict[tuple[str, str], list[int]] = {}
        self._corrupt: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up

    def add_repo(
        self,
        repo_id: str,
        folders: dict[str, Path] | None = None,
        *,
        files: dict[str, Path | bytes] | None = None,
    ) -> Repo:
        entries: dict[str, HubFile] = {}
        for prefix, folder in (folders or {}).items():
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder).as_posix()
                if not path.is_file() or rel == MANIFEST:
                    continue
                repo_path = f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel
                entries[repo_path] = _hub_file(repo_path, path)
        for repo_path, source in (files or {}).items():
            entries[repo_path] = _hub_file(repo_path, source)
        entries.setdefault(".gitattributes", _hub_file(".gitattributes", b"*.onnx filter=lfs\n"))
        digest = hashlib.sha1(repo_id.encode(), usedforsecurity=False)
        for name in sorted(entries):
            digest.update(f"{name} {entries[name].blob_id}\n".encode())
        repo = Repo(repo_id, entries, digest.hexdigest())
        self.repos[repo_id] = repo
        return repo

    def drop_after(self, repo_id: str, path: str, nbytes: int, times: int = 1) -> None:
        """The next `times` downloads of the file stop after `nbytes` of body bytes (the
        connection closes); calls queue up: drop_after(..., 1000); drop_after(..., 0)."""
        with self._lock:
            self._drops.setdefault((repo_id, path), []).extend([nbytes] * times)

    def corrupt(self, repo_id: str, path: str, corrupt: bool = True) -> None:
        """Serve the file with one byte changed (its advertised hash stays the true one)."""
        if corrupt:
            self._corrupt.add((repo_id, path))
        else:
            self._corrupt.discard((repo_id, path))

    def stall_after(self, repo_id: str, path: str, nbytes: int | None) -> None:
        """Downloads of the file stop sending after `nbytes`, the connection left open,
        until stop() (a network that hangs); None: no more stalls."""
        if nbytes is None:
            self._stalls.pop((repo_id, path), None)
        else:
            self._stalls[(repo_id, path)] = nbytes

    def slow(self, seconds_per_piece: float) -> None:
        """Wait this long after each 64 KiB piece of every file body."""
        self.delay = seconds_per_piece

    def downloads(self, repo_id: str, path: str) -> int:
        """GET requests that started sending the file's body."""
        return self.started.get((repo_id, path), 0)

    def served_bytes(self, repo_id: str, path: str) -> int:
        return self.served.get((repo_id, path), 0)

    # -- running

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub not started"
        address = self._server.server_address
        return f"http://{address[0]!s}:{address[1]!s}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = False
        self._server.block_on_close = True  # server_close() joins the request threads
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop, closing kept-alive connections, and leave no thread behind."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answers (called by the handler)

    def _take_drop(self, key: tuple[str, str]) -> int | None:
        with self._lock:
            drops = self._drops.get(key)
            if not drops:
                return None
            return drops.pop(0)

    def _count(self, key: tuple[str, str], n: int) -> None:
        with self._lock:
            self.served[key] = self.served.get(key, 0) + n


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (cancelled, or stopped reading) is no error here."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handle_error(request, client_address)


_API = re.compile(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$")
_TREE = re.compile(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN = re.compile(r"/lfs-cdn/([^/]+/[^/]+)/([0-9a-f]{64})$")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    # -- routing

    def _answer(self, *, head: bool) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = parse_qs(split.query)
        self.fake.requests.append((self.command, path))
        if match := _TREE.match(path):
            self._tree(match.group(1), match.group(2), match.group(3) or "", query)
        elif match := _API.match(path):
            self._info(match.group(1), match.group(2), query)
        elif match := _CDN.match(path):
            self._cdn(match.group(1), match.group(2), head=head)
        elif match := _RESOLVE.match(path):
            self._resolve(match.group(1), match.group(2), match.group(3), head=head)
        else:
            self._error(404, "NotFound", "no such route")

    def _repo(self, repo_id: str, revision: str | None) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if revision not in (None, "main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _info(self, repo_id: str, revision: str | None, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings: list[dict[str, Any]] = []
        for f in sorted(repo.files.values(), key=lambda f: f.path):
            entry: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                entry["size"] = f.size
                entry["blobId"] = f.blob_id
                if f.lfs:
                    entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 130}
            siblings.append(entry)
        owner = repo_id.split("/", maxsplit=1)[0]
        self._json(
            {
                "_id": repo.sha[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": owner,
                "sha": repo.sha,
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "private": False,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["onnx"],
                "library_name": "onnx",
                "siblings": siblings,
            },
            headers={"X-Repo-Commit": repo.sha},
        )

    def _tree(self, repo_id: str, revision: str, folder: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in repo.files):
            self._error(404, "EntryNotFound", f"{folder} does not exist on {revision}")
            return
        entries: dict[str, dict[str, Any]] = {}
        for f in sorted(repo.files.values(), key=lambda f: f.path):
            if not f.path.startswith(prefix):
                continue
            rest = f.path[len(prefix) :]
            if "/" in rest and not recursive:
                directory = prefix + rest.split("/")[0]
                entries[directory] = {
                    "type": "directory",
                    "oid": "0" * 40,
                    "size": 0,
                    "path": directory,
                }
                continue
            if recursive:  # the folders on the way
                parts = rest.split("/")[:-1]
                for i in range(len(parts)):
                    directory = prefix + "/".join(parts[: i + 1])
                    entries.setdefault(
                        directory,
                        {"type": "directory", "oid": "0" * 40, "size": 0, "path": directory},
                    )
            entry: dict[str, Any] = {
                "type": "file",
                "oid": f.blob_id,
                "size": f.size,
                "path": f.path,
            }
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 130}
            entries[f.path] = entry
        self._json([entries[k] for k in sorted(entries)])

    def _resolve(self, repo_id: str, revision: str, path: str, *, head: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        f = repo.files.get(path)
        if f is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
            return
        common = {"X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        if f.lfs:
            location = f"{self.fake.url}/lfs-cdn/{repo_id}/{f.sha256}"
            headers = {
                **common,
                "ETag": f'"{f.blob_id}"',
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "Location": location,
                "Content-Length": "0",
            }
            self._send(302, headers)
            return
        self._body(repo, f, {**common, "ETag": f'"{f.blob_id}"'}, head=head)

    def _cdn(self, repo_id: str, sha256: str, *, head: bool) -> None:
        repo = self.fake.repos.get(repo_id)
        f = next((f for f in (repo.files.values() if repo else []) if f.sha256 == sha256), None)
        if repo is None or f is None:
            self._error(404, "NotFound", "no such object")
            return
        # The real CDN is another host, where huggingface_hub stops following; this one is
        # the same host, so it repeats the Hub's metadata headers.
        headers = {
            "ETag": f'"{f.sha256}"',
            "X-Linked-Etag": f'"{f.sha256}"',
            "X-Linked-Size": str(f.size),
            "X-Repo-Commit": repo.sha,
            "Accept-Ranges": "bytes",
        }
        self._body(repo, f, headers, head=head)

    # -- bodies

    def _body(self, repo: Repo, f: HubFile, headers: dict[str, str], *, head: bool) -> None:
        key = (repo.repo_id, f.path)
        start, status = 0, 200
        range_header = self.headers.get("Range") if self.fake.ranges else None
        if range_header and (m := _RANGE.match(range_header)):
            start = int(m.group(1))
            if start >= f.size and f.size:
                self._send(416, {"Content-Range": f"bytes */{f.size}", "Content-Length": "0"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{f.size - 1}/{f.size}"
        headers["Content-Length"] = str(f.size - start)
        headers["Content-Type"] = "application/octet-stream"
        self._send(status, headers)
        if head:
            return
        data = f.read()
        if key in self.fake._corrupt and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        body = data[start:]
        with self.fake._lock:
            self.fake.started[key] = self.fake.started.get(key, 0) + 1
        drop = self.fake._take_drop(key)
        if drop is not None and drop < len(body):
            body = body[:drop]
            self.close_connection = True
        if (stall := self.fake._stalls.get(key)) is not None and stall < len(body):
            with contextlib.suppress(OSError):
                self.wfile.write(body[:stall])
                self.wfile.flush()
            self.fake._count(key, stall)
            self.fake._stopping.wait()
            self.close_connection = True
            return
        step = 64 * 1024
        for i in range(0, len(body), step):
            piece = body[i : i + step]
            try:
                self.wfile.write(piece)
            except OSError:
                self.close_connection = True
                return
            self.fake._count(key, len(piece))
            if self.fake.delay:
                time.sleep(self.fake.delay)
        if self.close_connection:
            self.wfile.flush()

    def _send(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _json(self, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(
            200,
            {
                **(headers or {}),
                "Content-Type": "application/json; charset=utf-8",
                "Content-Length": str(len(body)),
            },
        )
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(
            status,
            {
                "X-Error-Code": code,
                "X-Error-Message": message,
                "Content-Type": "application/json; charset=utf-8",
                "Content-Length": str(len(body)),
            },
        )
        if self.command != "HEAD":
            self.wfile.write(body)
