"""A loopback stand-in for the Hugging Face Hub: only the endpoints huggingface_hub calls to push and pull.

No installable package serves the Hub's *write* API on loopback (``hf-local-hub`` 3.0.0 ships only its
client, not the Go server it launches; ``olah`` is a read-only mirror with no create-repo, preupload or
commit routes), so the push tests talk to this server. It speaks the same HTTP protocol as the Hub:

- ``POST /api/repos/create`` (409 when the repo exists), ``POST /api/validate-yaml``,
  ``POST /api/models/{repo}/branch/{branch}``;
- ``POST /api/models/{repo}/preupload/{rev}``: binary or > 10 MB files go through LFS, the rest inline,
  and the current ``oid`` of each path is returned so unchanged files are skipped on a re-run;
- ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT /lfs-upload/{sha256}`` (LFS "basic" transfer; the
  client must run with ``HF_HUB_DISABLE_XET=1`` because there is no Xet storage here);
- ``POST /api/models/{repo}/commit/{rev}`` (ndjson: files, LFS files, deleted files and folders), ``GET /api/models/{repo}[/revision/{rev}]``,
  ``GET /api/models/{repo}/tree/{rev}``, ``POST /api/models/{repo}/paths-info/{rev}``, ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``;
- the same for dataset repos (``/api/datasets/...``, ``/datasets/{repo}/resolve/...``, ``/datasets/{repo}.git/...``),
  which is what ``huggingface_hub.HfFileSystem`` needs to list and read ``hf://datasets/ORG/NAME/...``.

For failure tests, ``POST /_test/fail`` with ``{"method", "path" (a regex), "count", "status"}`` makes the
next ``count`` matching requests answer ``status`` (a server error, as a flaky Hub would).

Writes need ``Authorization: Bearer <token>``; private repos answer 404 ``RepoNotFound`` to anyone
without it, as the Hub does. State lives in memory. The request log never includes headers.

Run: ``HUB_SERVER_TOKEN=... python tests/hub_server.py`` prints ``PORT <n>`` once it listens on 127.0.0.1
(the token comes from the environment so it never shows in the process list).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs_sha256: str | None  # set for LFS files

    @property
    def oid(self) -> str:
        """What preupload reports as the remote oid: sha256 for LFS files, git sha1 otherwise."""
        return self.lfs_sha256 or git_blob_sha1(self.content)


def _file_entry(path: str, stored: StoredFile) -> dict:
    """A file as the tree and paths-info endpoints describe it."""
    entry = {"type": "file", "path": path, "size": len(stored.content), "oid": git_blob_sha1(stored.content)}
    if stored.lfs_sha256:
        entry["lfs"] = {"oid": stored.lfs_sha256, "size": len(stored.content), "pointerSize": 134}
    return entry


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # sha -> tree
    branches: dict[str, str] = field(default_factory=dict)  # name -> sha

    def commit(self, tree: dict[str, StoredFile]) -> str:
        sha = secrets.token_hex(20)
        self.commits[sha] = tree
        return sha

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubState:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.failures: list[dict] = []  # injected: {"method", "path", "count", "status"}

    def injected_failure(self, method: str, path: str) -> int | None:
        """The status to answer instead of serving this request, if a failure was injected for it."""
        for rule in self.failures:
            if rule["count"] > 0 and rule["method"] == method and re.search(rule["path"], path):
                rule["count"] -= 1
                return int(rule.get("status", 500))
        return None


class HubHandler(BaseHTTPRequestHandler):
    server: "HubServer"
    protocol_version = "HTTP/1.1"

    # ----- plumbing -----------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def log_message(self, format: str, *args) -> None:  # request line only, never headers
        pass

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code} if code else None)

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        return secrets.compare_digest(given, f"Bearer {self.state.token}")

    def _repo(self, repo_id: str, write: bool) -> Repo | None:
        """The repo if the caller may see it (and write it); otherwise sends the error and returns None."""
        if write and not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _route(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.state.lock:
            status = self.state.injected_failure(method, path)
        if status is not None:
            self._body()
            return self._error(status, f"injected failure for {method} {path}")
        for pattern, handler in ROUTES[method]:
            match = re.fullmatch(pattern, path)
            if match:
                arguments = match.groupdict()
                if (arguments.pop("kind", None) or "").startswith("dataset"):  # dataset repos: their own names
                    arguments["repo"] = f"datasets/{arguments['repo']}"
                with self.state.lock:
                    handler(self, **arguments)
                return
        self._error(404, f"no route for {method} {path}")

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    # ----- write API ----------------------------------------------------------------------------
    def create_repo(self) -> None:
        payload = json.loads(self._body())
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = {"url": f"http://{self.headers['Host']}/{repo_id}"}
        if payload.get("type") == "dataset":
            repo_id = f"datasets/{repo_id}"
            url = {"url": f"http://{self.headers['Host']}/{repo_id}"}
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", **url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.state.repos[repo_id] = Repo(private=private)
        repo.branches["main"] = repo.commit({})
        self._json(200, {**url, "name": repo_id})

    def validate_yaml(self) -> None:
        self._body()
        self._json(200, {"warnings": []})

    def create_branch(self, repo: str, branch: str) -> None:
        self._body()
        found = self._repo(repo, write=True)
        if found is None:
            return
        if branch in found.branches:
            return self._error(409, f"Reference {branch} already exists")
        found.branches[branch] = found.branches["main"]
        self._json(200, {})

    def preupload(self, repo: str, revision: str) -> None:
        files = json.loads(self._body())["files"]
        found = self._repo(repo, write=True)
        if found is None:
            return
        sha = found.resolve(revision)
        tree = found.commits[sha] if sha else {}
        answer = []
        for file in files:
            sample = base64.b64decode(file["sample"])
            lfs = file["size"] > LFS_THRESHOLD_BYTES or b"\0" in sample
            current = tree.get(file["path"])
            answer.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular",
                           "shouldIgnore": False, "oid": current.oid if current else None})
        self._json(200, {"files": answer, "commitOid": sha})

    def lfs_batch(self, repo: str) -> None:
        payload = json.loads(self._body())
        if self._repo(repo, write=True) is None:
            return
        host = self.headers["Host"]
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"http://{host}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, oid: str) -> None:
        content = self._body()
        if hashlib.sha256(content).hexdigest() != oid:
            return self._error(400, "sha256 of the uploaded content does not match the object id")
        self.state.lfs_objects[oid] = content
        self._send(200)

    def commit(self, repo: str, revision: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        found = self._repo(repo, write=True)
        if found is None:
            return
        branch = unquote(revision)
        if branch not in found.branches:
            return self._error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        tree = dict(found.commits[found.branches[branch]])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                tree[value["path"]] = StoredFile(base64.b64decode(value["content"]), None)
            elif key == "lfsFile":
                content = self.state.lfs_objects.get(value["oid"])
                if content is None:
                    return self._error(422, f"LFS object {value['oid']} was never uploaded")
                tree[value["path"]] = StoredFile(content, value["oid"])
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                tree = {path: stored for path, stored in tree.items() if not path.startswith(folder)}
        sha = found.branches[branch] = found.commit(tree)
        self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{sha}",
                         "commitOid": sha, "pullRequestUrl": None})

    # ----- read API -----------------------------------------------------------------------------
    def model_info(self, repo: str, revision: str = "main") -> None:
        found = self._repo(repo, write=False)
        if found is None:
            return
        sha = found.resolve(revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        siblings = [{"rfilename": path} for path in sorted(found.commits[sha])]
        self._json(200, {"id": repo.removeprefix("datasets/"), "sha": sha, "private": found.private,
                         "siblings": siblings})

    def _files_at(self, repo: str, revision: str) -> tuple[str, dict[str, StoredFile]] | None:
        """(commit, path -> file) of a readable repo's revision; otherwise sends the error and returns None."""
        found = self._repo(repo, write=False)
        if found is None:
            return None
        sha = found.resolve(revision)
        if sha is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return sha, found.commits[sha]

    def tree(self, repo: str, revision: str, prefix: str | None = None) -> None:
        at = self._files_at(repo, revision)
        if at is None:
            return
        sha, files = at
        recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["False"])[0].lower() == "true"
        base = f"{prefix.strip('/')}/" if prefix else ""
        entries: dict[str, dict] = {}
        for path, stored in sorted(files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest and not recursive:
                folder = base + rest.split("/")[0]
                entries[folder] = {"type": "directory", "path": folder, "oid": sha}
                continue
            entries[path] = _file_entry(path, stored)
        self._json(200, list(entries.values()))

    def paths_info(self, repo: str, revision: str) -> None:
        form = parse_qs(self._body().decode())
        at = self._files_at(repo, revision)
        if at is None:
            return
        (sha, tree), answer = at, []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in tree:
                answer.append(_file_entry(path, tree[path]))
            elif any(name.startswith(f"{path}/") for name in tree):
                answer.append({"type": "directory", "path": path, "oid": sha})
        self._json(200, answer)

    def resolve(self, repo: str, revision: str, path: str) -> None:
        found = self._repo(repo, write=False)
        if found is None:
            return
        sha = found.resolve(revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        stored = found.commits[sha].get(path)
        if stored is None:
            return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{stored.oid}"'}
        content = stored.content
        byte_range = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if byte_range and self.command == "GET":  # resuming an interrupted download
            content = content[int(byte_range.group(1)):]
            return self._send(206, content, headers, "application/octet-stream")
        self._send(200, content, headers, "application/octet-stream")

    def inject_failure(self) -> None:
        rule = json.loads(self._body())
        self.state.failures.append({"status": 500, "count": 1, **rule})
        self._json(200, {"failures": self.state.failures})

    def health(self) -> None:
        self._json(200, {"status": "ok"})


KIND = r"(?P<kind>models|datasets)"  # the API's repo kinds; a dataset repo is stored as "datasets/ORG/NAME"
ROUTES: dict[str, list[tuple[str, object]]] = {
    "GET": [
        (r"/health", HubHandler.health),
        (rf"/api/{KIND}/{REPO}", HubHandler.model_info),
        (rf"/api/{KIND}/{REPO}/revision/(?P<revision>[^/]+)", HubHandler.model_info),
        (rf"/api/{KIND}/{REPO}/tree/(?P<revision>[^/]+)(?P<prefix>/.*)?", HubHandler.tree),
        (rf"/(?P<kind>datasets/)?{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", HubHandler.resolve),
    ],
    "HEAD": [(rf"/(?P<kind>datasets/)?{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", HubHandler.resolve)],
    "POST": [
        (r"/_test/fail", HubHandler.inject_failure),
        (r"/api/repos/create", HubHandler.create_repo),
        (r"/api/validate-yaml", HubHandler.validate_yaml),
        (rf"/api/{KIND}/{REPO}/branch/(?P<branch>[^/]+)", HubHandler.create_branch),
        (rf"/api/{KIND}/{REPO}/preupload/(?P<revision>[^/]+)", HubHandler.preupload),
        (rf"/api/{KIND}/{REPO}/commit/(?P<revision>[^/]+)", HubHandler.commit),
        (rf"/api/{KIND}/{REPO}/paths-info/(?P<revision>[^/]+)", HubHandler.paths_info),
        (rf"/(?P<kind>datasets/)?{REPO}\.git/info/lfs/objects/batch", HubHandler.lfs_batch),
    ],
    "PUT": [(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", HubHandler.lfs_upload)],
}


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, token: str) -> None:
        super().__init__(("127.0.0.1", port), HubHandler)
        self.state = HubState(token)


@contextmanager
def serve(token: str) -> Iterator[str]:
    """Run this server in a subprocess on a free loopback port; yield its endpoint, stop it afterwards."""
    env = {**os.environ, "HUB_SERVER_TOKEN": token}
    server = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"hub server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    server = HubServer(args.port, os.environ["HUB_SERVER_TOKEN"])
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
