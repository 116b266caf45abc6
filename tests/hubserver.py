"""A local stand-in for the Hugging Face Hub HTTP API, for tests.

It speaks the part of the API that the real ``huggingface_hub`` 2.4 client uses to create model
repos, push commits (regular and Git-LFS files) and read them back, so tests can run the real client
against ``http://127.0.0.1:PORT`` with ``HF_HUB_DISABLE_XET=1`` (Xet storage is not emulated).

Storage: content is kept by sha256 under ``root/blobs/``; each commit is materialised as
``root/repos/<namespace>/<name>/<commit-oid>/`` (hard links into the blob store where possible).
Repo and commit metadata live in memory only.

Auth: requests must carry ``Authorization: Bearer <token>``, except two that the real client sends
without it: the LFS upload PUT (it goes to the URL the LFS batch endpoint hands out, which carries its
own signature, like a presigned S3 URL) and ``/api/agent-harnesses`` (fetched anonymously while the
client builds its User-Agent).

In pytest: ``with running_hub(tmp_path, token) as hub: patch_hf_client(monkeypatch, hub, tmp_path / "hf")``.
Manual demo: ``python -m tests.hubserver --root /tmp/hub --port 8999 --token hf_test``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

# Suffixes the Hub's default .gitattributes sends to LFS. Files over the Hub's 10 MB limit for plain
# git blobs, and binary files (a NUL byte in the sample the client sends), go to LFS too.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".model", ".gguf")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()

_REPO, _REV = r"(?P<repo>[^/]+/[^/]+)", r"(?P<rev>[^/]+)"  # revisions arrive URL-quoted: one segment
# (methods, path regex, kind). The kind names the request counter and the handler method `_<kind>`.
_ROUTES = [
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", "repo_info"),
    ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "commit"),
    ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/models/{_REPO}/commits/{_REV}", "commits"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
    ("GET HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
]
_ROUTES_COMPILED = [(methods.split(), re.compile(pattern), kind) for methods, pattern, kind in _ROUTES]
_NO_AUTH_KINDS = {"agent_harnesses", "lfs_upload"}


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    lfs: bool
    git_oid: str  # git blob sha1 of the content, or of the LFS pointer file for LFS files

    @property
    def remote_oid(self) -> str:
        """What the client compares its local hash with, and caches downloads under."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: datetime
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: datetime
    commits: list[Commit] = field(default_factory=list)  # oldest first

    @property
    def head(self) -> Commit:
        return self.commits[-1]


@dataclass
class RequestRecord:
    method: str
    path: str  # with the query string
    headers: list[tuple[str, str]]
    kind: str
    status: int | None = None  # None until answered

    @property
    def text(self) -> str:
        """Request line and headers, one per line, for grepping."""
        return "\n".join([f"{self.method} {self.path}", *(f"{k}: {v}" for k, v in self.headers)])


@dataclass
class _Fault:
    remaining: int
    status: int | None
    pattern: re.Pattern[str] | None
    delay: float | None
    retry_after: int | None


class HubError(Exception):
    """An API error, sent the way the client parses them: JSON body plus X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class _Request(NamedTuple):
    params: dict[str, str]  # URL-unquoted groups of the route regex
    query: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e


class _Response(NamedTuple):
    status: int = 200
    body: bytes | Path = b""  # a Path is streamed from disk
    headers: dict[str, str] = {}


def _json(obj: Any, status: int = 200, content_type: str = "application/json") -> _Response:
    return _Response(status, json.dumps(obj).encode(), {"Content-Type": content_type})


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # the one format the client's date parser takes


class HubServer:
    """The fake Hub. Start it with `running_hub()`; public methods are thread-safe."""

    def __init__(self, root: Path, token: str, *, user: str = "test-user", host: str = "127.0.0.1", port: int = 0):
        self.root, self.token, self.user = Path(root), token, user
        for sub in ("blobs", "repos", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._repos: dict[str, Repo] = {}
        self._faults: list[_Fault] = []
        self._log: list[RequestRecord] = []
        self._counts: Counter[str] = Counter()
        self._stopping = threading.Event()  # cuts injected delays short at shutdown
        self._signing_key = secrets.token_bytes(32)  # signs upload URLs; deliberately not derived from `token`
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True  # a request stuck in an injected delay must not block shutdown
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://{host}:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        # A short poll interval makes stop() quick (shutdown() waits for the next poll).
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hubserver", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    # ---- for tests ---------------------------------------------------------------------------------

    def fail_next(self, count: int = 1, status: int | None = 500, *, path_regex: str | None = None,
                  delay: float | None = None, retry_after: int | None = None) -> None:
        """Make the next `count` requests whose "METHOD /path?query" matches `path_regex` (re.search;
        None matches all) misbehave: each sleeps `delay` seconds if given (to trip client timeouts),
        then answers `status`, or is served normally if `status` is None. `retry_after` sets a
        Retry-After header; 429s get "0" by default (the client then waits 0 + 1 s)."""
        if status == 429 and retry_after is None:
            retry_after = 0
        pattern = re.compile(path_regex) if path_regex is not None else None
        with self._lock:
            self._faults.append(_Fault(count, status, pattern, delay, retry_after))

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    @property
    def counts(self) -> Counter[str]:
        """Requests received per kind (see _ROUTES, or "unknown"), failed and injected ones included."""
        with self._lock:
            return Counter(self._counts)

    def repo(self, repo_id: str) -> Repo:
        with self._lock:
            repo = self._get_repo(repo_id)
            return replace(repo, commits=list(repo.commits))

    def commits(self, repo_id: str) -> list[Commit]:
        """Newest first, like `HfApi.list_repo_commits`; the last one is the Hub's "initial commit"."""
        return self.repo(repo_id).commits[::-1]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """A commit's files (head of main by default), with the .gitattributes every new repo gets."""
        with self._lock:
            commit = self._get_commit(self._get_repo(repo_id), revision)
        return {path: self._snapshot_path(repo_id, commit, path).read_bytes() for path in commit.files}

    # ---- request plumbing --------------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        method, (raw_path, _, query) = handler.command, handler.path.partition("?")
        kind, match = "unknown", None
        for methods, pattern, route_kind in _ROUTES_COMPILED:
            if method in methods and (match := pattern.fullmatch(raw_path)):
                kind = route_kind
                break
        record = RequestRecord(method, handler.path, list(handler.headers.items()), kind)
        # Read the whole body before answering, errors included: answering while the client still
        # sends an upload would reach it as a connection reset instead of the status code.
        body = handler.read_body()
        with self._lock:
            self._log.append(record)
            self._counts[kind] += 1
            # The client fetches the agent registry once per process, whenever its first request
            # happens; letting it eat a fault would make fault tests depend on test order.
            fault = self._take_fault(f"{method} {handler.path}") if kind != "agent_harnesses" else None
        try:
            if fault and fault.delay:
                self._stopping.wait(fault.delay)
            if fault and fault.status is not None:
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                raise HubError(fault.status, f"Injected failure ({fault.status})", headers=headers)
            if match is None:
                raise HubError(404, f"No route for {method} {raw_path}")
            if kind not in _NO_AUTH_KINDS:
                self._check_auth(handler.headers.get("Authorization"))
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            response = getattr(self, f"_{kind}")(_Request(params, parse_qs(query), body))
        except HubError as e:
            headers = {"Content-Type": "application/json", "X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code  # how the client picks RepoNotFound, EntryNotFound, ...
            response = _Response(e.status, json.dumps({"error": e.message}).encode(), headers)
        except Exception as e:  # a bug here: answer 500 with the reason rather than drop the connection
            traceback.print_exc()
            response = _json({"error": f"hubserver bug: {e!r}"}, 500)
        record.status = response.status
        handler.write_response(response, head_only=method == "HEAD")

    def _take_fault(self, request_line: str) -> _Fault | None:
        for fault in self._faults:
            if fault.pattern is None or fault.pattern.search(request_line):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _check_auth(self, header: str | None) -> None:
        if not header:
            raise HubError(401, "Authorization header is required")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), self.token.encode()):
            # The Hub's wording; the client treats other 401s on repo URLs as "repository not found".
            raise HubError(401, "Invalid credentials in Authorization header")

    # ---- storage (callers hold the lock) -----------------------------------------------------------

    def _get_repo(self, repo_id: str) -> Repo:
        if repo_id not in self._repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self._repos[repo_id]

    def _get_commit(self, repo: Repo, rev: str) -> Commit:
        if rev == "main":  # the only branch; any full commit oid also works
            return repo.head
        for commit in repo.commits:
            if commit.oid == rev:
                return commit
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _snapshot_path(self, repo_id: str, commit: Commit, path: str) -> Path:
        return self.root / "repos" / repo_id / commit.oid / path

    def _blob(self, oid: Any) -> Path:
        if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid):  # it becomes a file name
            raise HubError(400, f"Invalid sha256 oid: {oid!r}")
        return self.root / "blobs" / oid

    def _store_blob(self, data: bytes) -> FileEntry:
        sha = hashlib.sha256(data).hexdigest()
        if not self._blob(sha).exists():
            tmp = self.root / "tmp" / secrets.token_hex(8)
            tmp.write_bytes(data)
            os.replace(tmp, self._blob(sha))  # atomic: no half-written object is ever visible
        return FileEntry(len(data), sha, lfs=False, git_oid=_git_blob_sha1(data))

    def _add_commit(self, repo: Repo, title: str, message: str, files: dict[str, FileEntry]) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else None
        seed = json.dumps([parent, title, sorted((p, e.sha256) for p, e in files.items()), secrets.token_hex(8)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message,
                        datetime.now(timezone.utc), files)
        for path, entry in files.items():
            dst = self._snapshot_path(repo.repo_id, commit, path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self._blob(entry.sha256), dst)
            except OSError:  # filesystem without hard links
                shutil.copyfile(self._blob(entry.sha256), dst)
        repo.commits.append(commit)
        return commit

    # ---- endpoints ---------------------------------------------------------------------------------

    def _agent_harnesses(self, rq: _Request) -> _Response:
        return _json({"standardEnvVars": [], "harnesses": {}})  # "no AI agent detected"

    def _whoami(self, rq: _Request) -> _Response:
        return _json({"type": "user", "name": self.user, "fullname": self.user, "orgs": [],
                      "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def _validate_yaml(self, rq: _Request) -> _Response:
        return _json({"errors": [], "warnings": []})  # uploading a README.md asks for this first

    def _create_repo(self, rq: _Request) -> _Response:
        payload = rq.json()
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "This test hub only supports model repos")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        with self._lock:
            if repo_id in self._repos:  # the client turns this 409 into success when exist_ok=True
                return _json({"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, 409)
            repo = Repo(repo_id, private=payload.get("visibility") == "private", created_at=datetime.now(timezone.utc))
            # As on the real Hub, a new repo starts with a commit holding a default .gitattributes.
            self._add_commit(repo, "initial commit", "", {".gitattributes": self._store_blob(GITATTRIBUTES)})
            self._repos[repo_id] = repo
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _repo_info(self, rq: _Request) -> _Response:
        with self._lock:
            repo = self._get_repo(rq.params["repo"])
            commit = self._get_commit(repo, rq.params.get("rev", "main"))
        siblings = []
        for path, e in sorted(commit.files.items()):
            siblings.append({"rfilename": path})
            if rq.query.get("blobs") == ["true"]:  # files_metadata=True
                lfs = {"size": e.size, "sha256": e.sha256, "pointerSize": len(_lfs_pointer(e.sha256, e.size))}
                siblings[-1].update(size=e.size, blobId=e.git_oid, lfs=lfs if e.lfs else None)
        return _json({"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                      "sha": commit.oid, "private": repo.private, "gated": False, "disabled": False,
                      "downloads": 0, "likes": 0, "tags": [], "createdAt": _iso(repo.created_at),
                      "lastModified": _iso(commit.date), "siblings": siblings})

    def _preupload(self, rq: _Request) -> _Response:
        with self._lock:
            head = self._get_commit(self._get_repo(rq.params["repo"]), rq.params["rev"])
        out = []
        for f in rq.json().get("files", []):
            binary = b"\0" in base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > LFS_SIZE_THRESHOLD or binary
            existing = head.files.get(f["path"])
            # The remote oid lets the client leave unchanged files out of the commit.
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": existing.remote_oid if existing else None})
        return _json({"files": out, "commitOid": head.oid})

    def _upload_signature(self, oid: str, size: str) -> str:
        return hmac.new(self._signing_key, f"{oid}:{size}".encode(), "sha256").hexdigest()

    def _lfs_batch(self, rq: _Request) -> _Response:
        payload = rq.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads are supported; downloads go through /resolve")
        with self._lock:
            repo_id = self._get_repo(rq.params["repo"]).repo_id
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            objects.append({"oid": oid, "size": size, "authenticated": True})
            if not self._blob(oid).exists():  # without "actions" the client skips the upload (dedup)
                query = f"size={size}&sig={self._upload_signature(oid, str(size))}"
                objects[-1]["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{oid}?{query}"},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
        return _json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, rq: _Request) -> _Response:
        oid, size = rq.params["oid"], rq.query.get("size", [""])[0]
        if not hmac.compare_digest(rq.query.get("sig", [""])[0], self._upload_signature(oid, size)):
            raise HubError(403, "Invalid or missing upload signature")
        if str(len(rq.body)) != size or hashlib.sha256(rq.body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match the announced oid and size")
        with self._lock:
            self._store_blob(rq.body)
        return _Response()

    def _lfs_verify(self, rq: _Request) -> _Response:
        payload = rq.json()
        blob = self._blob(payload.get("oid"))
        if not blob.is_file() or blob.stat().st_size != payload.get("size"):
            raise HubError(404, "LFS object not found")
        return _json({"success": True})

    def _commit(self, rq: _Request) -> _Response:
        if rq.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by this test hub")
        try:
            lines = [json.loads(line) for line in rq.body.splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid NDJSON: {e}") from e
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        header = lines[0]["value"]
        with self._lock:
            repo = self._get_repo(rq.params["repo"])
            if rq.params["rev"] != "main":
                raise HubError(404, f"Invalid rev id: {rq.params['rev']} (only main is writable)", "RevisionNotFound")
            if header.get("parentCommit") not in (None, repo.head.oid):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.head.files)
            for op in lines[1:]:
                key, value = op.get("key"), op.get("value", {})
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in PurePosixPath(path).parts:
                    raise HubError(400, f"Invalid path: {path!r}")
                if key == "file":
                    files[path] = self._store_blob(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    blob = self._blob(value.get("oid"))
                    if not blob.is_file():
                        raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                    size = blob.stat().st_size
                    pointer = _lfs_pointer(value["oid"], size)
                    files[path] = FileEntry(size, value["oid"], lfs=True, git_oid=_git_blob_sha1(pointer))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(path.rstrip("/") + "/")}
                else:
                    raise HubError(400, f"Unsupported commit operation: {key!r}")
            commit = self._add_commit(repo, header.get("summary", ""), header.get("description", ""), files)
        return _json({"success": True, "commitOid": commit.oid, "commitMessage": commit.title, "hookOutput": "",
                      "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}"})

    def _tree(self, rq: _Request) -> _Response:
        recursive = rq.query.get("recursive") == ["true"]
        base = rq.params.get("path", "").strip("/")
        prefix = f"{base}/" if base else ""
        with self._lock:
            commit = self._get_commit(self._get_repo(rq.params["repo"]), rq.params["rev"])
        entries: dict[str, dict[str, Any]] = {}
        for path, e in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            # Folders on the way to the file: all of them if recursive, else only the direct child.
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "path": folder,
                                   "oid": hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest()}
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": e.size, "oid": e.git_oid}
                if e.lfs:
                    pointer_size = len(_lfs_pointer(e.sha256, e.size))
                    entries[path]["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": pointer_size}
        if base and not entries:
            raise HubError(404, f"{base} does not exist at {rq.params['rev']}", "EntryNotFound")
        return _json(list(entries.values()))  # one page: no Link header

    def _commits(self, rq: _Request) -> _Response:
        with self._lock:
            repo = self._get_repo(rq.params["repo"])
            history = repo.commits[: repo.commits.index(self._get_commit(repo, rq.params["rev"])) + 1]
        return _json([{"id": c.oid, "title": c.title, "message": c.message, "date": _iso(c.date),
                       "authors": [{"user": self.user}]} for c in reversed(history)])

    def _resolve(self, rq: _Request) -> _Response:
        with self._lock:
            repo = self._get_repo(rq.params["repo"])
            commit = self._get_commit(repo, rq.params["rev"])
        entry = commit.files.get(rq.params["path"])
        if entry is None:  # X-Repo-Commit lets the client cache "absent at commit X"
            raise HubError(404, f"Entry not found: {rq.params['path']}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        # Served directly, not redirected to a CDN: ETag + Content-Length then carry the metadata.
        headers = {"ETag": f'"{entry.remote_oid}"', "X-Repo-Commit": commit.oid,
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "none"}
        return _Response(200, self._snapshot_path(repo.repo_id, commit, rq.params["path"]), headers)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so nothing left unread can confuse a reused connection.
    protocol_version = "HTTP/1.0"
    timeout = 60  # a client stalling mid-request must not hold a thread forever

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self.server.hub._handle(self)  # type: ignore[attr-defined]

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass  # HubServer.requests is the log; stderr lines would clutter test output

    def read_body(self) -> bytes:
        # httpx2 sends a body chunked when it cannot tell its length up front (e.g. an iterator).
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF ending the chunk
            while self.rfile.readline().strip():  # optional trailers, up to the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def write_response(self, response: _Response, head_only: bool) -> None:
        body = response.body
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            # Sent for HEAD too: that is where the client reads a file's size.
            self.send_header("Content-Length", str(body.stat().st_size if isinstance(body, Path) else len(body)))
            self.end_headers()
            if head_only:
                return
            if isinstance(body, Path):
                with body.open("rb") as f:
                    shutil.copyfileobj(f, self.wfile, 1 << 20)
            else:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left, typically after timing out on an injected delay


@contextmanager
def running_hub(root: Path, token: str, **kwargs: Any) -> Iterator[HubServer]:
    """A started `HubServer` on 127.0.0.1 (ephemeral port, daemon thread), stopped on exit."""
    hub = HubServer(root, token, **kwargs).start()
    try:
        yield hub
    finally:
        hub.stop()


def patch_hf_client(monkeypatch: Any, hub: HubServer, hf_home: Path) -> None:
    """Point the real `huggingface_hub` client at `hub`, through pytest's `monkeypatch`.

    Environment variables only reach subprocesses: in-process, `huggingface_hub.constants` read them
    once, at import. Patching `constants.ENDPOINT` keeps the client's anonymous agent-registry fetch
    on loopback, but then the download URL template must follow, or `hf_hub_download(endpoint=...)`
    quietly targets https://huggingface.co.
    """
    from huggingface_hub import (
        constants,  # imported here: the server itself needs only the stdlib
    )

    for name, value in {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home)}.items():
        monkeypatch.setenv(name, value)
    # No implicit credentials: a developer's real token must not be sent anywhere by accident.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    patched = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake Hugging Face Hub until Ctrl-C.")
    parser.add_argument("--root", type=Path, required=True, help="storage directory")
    parser.add_argument("--port", type=int, default=8999)
    parser.add_argument("--token", required=True, help="the only accepted bearer token")
    parser.add_argument("--user", default="test-user", help="user name whoami reports")
    args = parser.parse_args()
    hub = HubServer(args.root, args.token, user=args.user, port=args.port)
    print(f"Fake Hub on {hub.url} (user {args.user!r}). Point a client at it with:\n"
          f"  HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1 HF_TOKEN=<token>", flush=True)
    try:
        hub.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
