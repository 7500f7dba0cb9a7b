"""A local stand-in for the Hugging Face Hub, for tests that push and pull models.

It speaks the part of the Hub's HTTP API that the ``huggingface_hub`` client (2.x) uses to

* check a token:                 ``GET  /api/whoami-v2``
* create a repository:           ``POST /api/repos/create``  (``exist_ok`` answers 409 + the repo URL)
* validate a README's YAML:      ``POST /api/validate-yaml``
* ask how to upload each file:   ``POST /api/models/{repo}/preupload/{rev}``  -> always ``"regular"``
  (so no LFS/Xet upload ever happens: file contents arrive base64-encoded inside the commit)
* commit:                        ``POST /api/models/{repo}/commit/{rev}``  (ndjson: header, file,
  deletedFile, deletedFolder)
* read repository info / files:  ``GET  /api/models/{repo}[/revision/{rev}]``,
  ``GET /api/models/{repo}/tree/{rev}[/{path}]``, ``POST /api/models/{repo}/paths-info/{rev}``,
  ``HEAD|GET /{repo}/resolve/{rev}/{path}`` (what ``hf_hub_download`` and so
  ``from_pretrained(repo_id)`` need)

Only the ``model`` repository type and one branch (``main``, each commit replacing the tree) are
supported; anything else is answered with an HTTP error so a test notices. Pushed files are
stored as plain files under ``root/models/{namespace}/{name}/``, which :meth:`LocalHub.repo_dir`
returns, so a test can load them with ``from_pretrained(folder)``.

The server listens on ``127.0.0.1`` on an ephemeral port, in a daemon thread, with bounded
request bodies (``max_body_bytes``). Every request must carry ``Authorization: Bearer <token>``
to write; reading a public repository works anonymously, as on the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_BRANCH = "main"
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: sha1(b"blob {size}\\0" + content), as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class _Repo:
    repo_id: str
    private: bool
    directory: Path
    commits: list[dict] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.directory).as_posix() for p in self.directory.rglob("*") if p.is_file())


class HubRequestError(Exception):
    """An HTTP error answer: status, Hub error code (X-Error-Code header) and message."""

    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


class LocalHub:
    """The stand-in Hub: ``with LocalHub(root, token) as hub: ...`` or ``start()`` / ``stop()``.

    ``endpoint`` is the base URL to give ``HfApi(endpoint=...)`` or ``HF_ENDPOINT``; ``token`` is the
    only token accepted (for user ``user``); ``requests`` records ``(method, path)`` of every request
    (never headers, so never the token).
    """

    def __init__(self, root: str | Path, token: str, *, user: str = "hf-rlion-tester", max_body_bytes: int = 256 << 20):
        self.root = Path(root)
        self.token = token
        self.user = user
        self.max_body_bytes = max_body_bytes
        self.requests: list[tuple[str, str]] = []
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "LocalHub":
        hub = self

        class Handler(_HubRequestHandler):
            local_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point a subprocess's huggingface_hub at this server."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_TOKEN": self.token,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def repo_dir(self, repo_id: str) -> Path:
        """Where the files pushed to ``repo_id`` (``namespace/name``, or ``name`` for the token's user) are."""
        return self._repo(self._full_repo_id(repo_id)).directory

    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def commits(self, repo_id: str) -> list[dict]:
        """The commits of a repository, oldest first: ``{"oid", "summary", "files"}``."""
        return list(self._repo(self._full_repo_id(repo_id)).commits)

    # -- state -------------------------------------------------------------------------------
    def _full_repo_id(self, repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"{self.user}/{repo_id}"

    def _repo(self, repo_id: str) -> _Repo:
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            raise HubRequestError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _create_repo(self, repo_id: str, private: bool) -> tuple[_Repo, bool]:
        if not _REPO_ID.match(repo_id):
            raise HubRequestError(400, f"Invalid repository name {repo_id!r}")
        namespace = repo_id.split("/")[0]
        if namespace != self.user:
            raise HubRequestError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        with self._lock:
            if repo_id in self._repos:
                return self._repos[repo_id], False
            directory = self.root / "models" / repo_id
            directory.mkdir(parents=True, exist_ok=True)
            repo = _Repo(repo_id, private, directory)
            self._repos[repo_id] = repo
            return repo, True

    def _commit(self, repo: _Repo, operations: list[dict]) -> dict:
        header = next((op["value"] for op in operations if op.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise HubRequestError(400, "Commit has no header with a summary")
        with self._lock:
            changed = []
            for op in operations:
                key, value = op.get("key"), op.get("value") or {}
                if key == "header":
                    continue
                if key == "lfsFile":
                    raise HubRequestError(422, "This stand-in Hub only accepts regular (non-LFS) files")
                path = _safe_path(value.get("path", ""))
                target = repo.directory / path
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubRequestError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(value["content"], validate=True))
                elif key == "deletedFile":
                    if not target.is_file():
                        raise HubRequestError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    target.unlink()
                elif key == "deletedFolder":
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    raise HubRequestError(400, f"Unsupported commit operation {key!r}")
                changed.append(path)
            oid = hashlib.sha1(f"{repo.repo_id}\0{repo.sha}\0{time.time_ns()}\0{changed}".encode()).hexdigest()
            repo.commits.append({"oid": oid, "summary": header["summary"], "files": changed})
        return {"oid": oid}


def _safe_path(path: str) -> str:
    """A repository path, refusing anything that could escape the repository directory."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path or pure.parts[0] == ".git":
        raise HubRequestError(400, f"Invalid path in repository: {path!r}")
    return pure.as_posix()


class _HubRequestHandler(BaseHTTPRequestHandler):
    local_hub: LocalHub
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1"

    # -- plumbing ----------------------------------------------------------------------------
    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.local_hub.requests.append((method, path))
        try:
            body = self._read_body()
            status, payload, headers = self._route(method, path, parse_qs(url.query), body)
        except HubRequestError as err:
            headers = {"X-Error-Message": err.message}
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
            status, payload = err.status, {"error": err.message}
            if getattr(err, "url", None):
                payload["url"] = err.url
        except Exception as err:  # a bug in the stand-in: answer 500 so the client fails loudly
            status, payload, headers = 500, {"error": f"{type(err).__name__}: {err}"}, {}
        self._send(method, status, payload, headers)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.local_hub.max_body_bytes:
            self.close_connection = True
            raise HubRequestError(413, f"Request body of {length} bytes is over the {self.local_hub.max_body_bytes} limit")
        return self.rfile.read(length) if length else b""

    def _send(self, method: str, status: int, payload, headers: dict) -> None:
        if isinstance(payload, (bytes, bytearray)):
            data, content_type = bytes(payload), "application/octet-stream"
        else:
            data, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731
    do_PUT = lambda self: self._dispatch("PUT")  # noqa: E731
    do_DELETE = lambda self: self._dispatch("DELETE")  # noqa: E731

    # -- auth --------------------------------------------------------------------------------
    def _authenticated(self) -> bool:
        """True for the right token, False for none; a wrong token is a 401, as on the Hub."""
        auth = self.headers.get("Authorization")
        if not auth:
            return False
        if auth != f"Bearer {self.local_hub.token}":
            raise HubRequestError(401, "Invalid credentials in Authorization header")
        return True

    def _require_auth(self) -> None:
        if not self._authenticated():
            raise HubRequestError(401, "You must be authenticated to access this resource (no token given)")

    def _readable_repo(self, repo_id: str) -> _Repo:
        authenticated = self._authenticated()
        repo = self.local_hub._repo(repo_id)
        if repo.private and not authenticated:
            raise HubRequestError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _check_revision(self, repo: _Repo, revision: str) -> None:
        if revision not in (DEFAULT_BRANCH, repo.sha):
            raise HubRequestError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # -- routes ------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes):
        hub = self.local_hub
        if method == "GET" and path == "/api/whoami-v2":
            self._require_auth()
            return 200, {
                "type": "user",
                "name": hub.user,
                "fullname": "hf-rlion test user",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}},
            }, {}

        if method == "POST" and path == "/api/repos/create":
            self._require_auth()
            request = json.loads(body or b"{}")
            if request.get("type", "model") != "model":
                raise HubRequestError(400, "This stand-in Hub only hosts model repositories")
            repo_id = f"{request.get('organization') or hub.user}/{request.get('name', '')}"
            repo, created = hub._create_repo(repo_id, private=request.get("visibility", "public") != "public")
            url = f"{hub.endpoint}/{repo.repo_id}"
            if not created:
                err = HubRequestError(409, "You already created this model repo")
                err.url = url
                raise err
            return 200, {"url": url, "name": repo.repo_id, "id": repo.repo_id}, {}

        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body or b"{}").get("content", "")
            match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
            if match is None:
                return 200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]}, {}
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": f"YAML parse error: {err}"}]}, {}
            if not isinstance(metadata, dict):
                return 400, {"errors": [{"message": "YAML metadata must be a mapping"}]}, {}
            return 200, {}, {}

        match = re.match(rf"^/api/models/({_REPO_PART}/{_REPO_PART})(?:/(.*))?$", path)
        if match:
            return self._route_repo_api(method, match.group(1), match.group(2) or "", query, body)

        match = re.match(rf"^/({_REPO_PART}/{_REPO_PART})/resolve/([^/]+)/(.+)$", path)
        if match and method in ("GET", "HEAD"):
            repo = self._readable_repo(match.group(1))
            self._check_revision(repo, match.group(2))
            file_path = _safe_path(match.group(3))
            target = repo.directory / file_path
            if not target.is_file():
                raise HubRequestError(404, f"Entry not found: {file_path}", "EntryNotFound")
            content = target.read_bytes()
            return 200, content, {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_sha1(content)}"'}

        raise HubRequestError(404, f"{method} {path} is not part of this stand-in Hub")

    def _route_repo_api(self, method: str, repo_id: str, rest: str, query: dict, body: bytes):
        if method == "GET" and (rest == "" or rest.startswith("revision/")):
            repo = self._readable_repo(repo_id)
            if rest:
                self._check_revision(repo, rest[len("revision/") :])
            return 200, self._repo_info(repo), {}

        action, _, revision = rest.partition("/")
        if method == "GET" and action == "tree":
            repo = self._readable_repo(repo_id)
            revision, _, prefix = revision.partition("/")
            self._check_revision(repo, revision)
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return 200, self._tree(repo, prefix, recursive), {}

        if method == "POST" and action == "paths-info":
            repo = self._readable_repo(repo_id)
            self._check_revision(repo, unquote(revision))
            request = body.decode()
            paths = json.loads(request)["paths"] if request.lstrip().startswith("{") else parse_qs(request).get("paths", [])
            return 200, [entry for entry in self._tree(repo, "", True, with_dirs=True) if entry["path"] in paths], {}

        if method == "POST" and action in ("preupload", "commit"):
            self._require_auth()
            repo = self.local_hub._repo(repo_id)
            self._check_revision(repo, unquote(revision))
            if action == "preupload":
                files = json.loads(body)["files"]
                answer = []
                for entry in files:
                    target = repo.directory / _safe_path(entry["path"])
                    oid = git_blob_sha1(target.read_bytes()) if target.is_file() else None
                    answer.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
                return 200, {"files": answer}, {}
            if query.get("create_pr"):
                raise HubRequestError(400, "This stand-in Hub does not support pull requests")
            operations = [json.loads(line) for line in body.splitlines() if line.strip()]
            commit = self.local_hub._commit(repo, operations)
            return 200, {
                "success": True,
                "commitOid": commit["oid"],
                "commitUrl": f"{self.local_hub.endpoint}/{repo.repo_id}/commit/{commit['oid']}",
                "hookOutput": "",
            }, {}

        raise HubRequestError(404, f"{method} /api/models/{repo_id}/{rest} is not part of this stand-in Hub")

    def _repo_info(self, repo: _Repo) -> dict:
        return {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": repo.sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "siblings": [{"rfilename": name} for name in repo.files()],
        }

    def _tree(self, repo: _Repo, prefix: str, recursive: bool, with_dirs: bool = True) -> list[dict]:
        base = repo.directory / _safe_path(prefix) if prefix else repo.directory
        if not base.is_dir():
            raise HubRequestError(404, f"Entry not found: {prefix}", "EntryNotFound")
        entries = []
        for item in sorted(base.rglob("*") if recursive else base.iterdir()):
            rel = item.relative_to(repo.directory).as_posix()
            if item.is_dir():
                if with_dirs:
                    entries.append({"type": "directory", "path": rel, "oid": "0" * 40, "size": 0})
            else:
                content = item.read_bytes()
                entries.append({"type": "file", "path": rel, "oid": git_blob_sha1(content), "size": len(content)})
        return entries
