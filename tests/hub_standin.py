"""A local stand-in for the Hugging Face Hub, enough for `HfApi().model_info`, `snapshot_download` and uploads.

Stdlib only. It serves, from a live description of repos, the endpoints huggingface_hub 2.4 calls:

    GET  /api/models/{repo}                          model info at the default branch ("main")
    GET  /api/models/{repo}/revision/{rev}           model info at a branch, tag or full commit sha
    GET  /api/models/{repo}/tree/{rev}[/{path}]      file listing (`list_repo_tree`; `recursive` honoured)
    HEAD /{repo}/resolve/{rev}/{file}                file metadata, as `hf_hub_download` reads it
    GET  /{repo}/resolve/{rev}/{file}                file bytes (Range honoured)

and, on a second port (another origin, like the Hub's CDN, so the client drops its Authorization header):

    HEAD|GET /blobs/{sha256}                         LFS file bytes (Range honoured)
    PUT      /upload/{sha256}                        an LFS blob's bytes (the upload URL the LFS batch hands out)

The write endpoints that `HfApi.create_repo`, `create_branch` and `upload_folder` (create_commit) call, each
requiring a token that `tokens` grants "write" (no token or an unknown one: 401 as the Hub answers it; a "read"
one: 403):

    POST /api/repos/create                           a new repo holding the Hub's first commit (.gitattributes),
                                                     private if asked (model info says so); 409 if it exists
    POST /api/models/{repo}/branch/{branch}          a branch at `startingPoint` (default main); 409 if it exists
    POST /api/validate-yaml                          the README's metadata: accepted as it is
    POST /api/models/{repo}/preupload/{rev}          each file's upload mode (lfs for LFS_SUFFIXES, else regular)
                                                     and the oid it has at `rev`, so unchanged files are skipped
    POST /{repo}.git/info/lfs/objects/batch          LFS batch ("basic" transfer): a PUT to the CDN port for each
                                                     blob the stand-in does not hold yet
    POST /api/models/{repo}/commit/{rev}             the NDJSON commit (header, file, lfsFile, deletedFile): a new
                                                     commit on branch `rev`, its parent that branch's head

The stand-in speaks LFS, not Xet: with hf_xet installed, huggingface_hub uploads through Xet unless
`constants.HF_HUB_DISABLE_XET` is set, which tests of uploads do.

Regular files answer `/resolve` with 200, `ETag: "<git blob sha1>"`, `Content-Length` and `X-Repo-Commit`. LFS
files (*.safetensors, *.bin, ... see LFS_SUFFIXES) answer with a 302 to the CDN carrying `X-Linked-Etag:
"<sha256>"`, `X-Linked-Size` and `X-Repo-Commit`, which is what the real Hub does. Errors carry the `X-Error-Code`
header that `huggingface_hub.utils.hf_raise_for_status` maps to exception types: RepoNotFound (404),
RevisionNotFound (404), EntryNotFound (404), GatedRepo (401 without a token, 403 with a token not granted access).
As on the real Hub, a gated repo's metadata and file listing are public; only its files need a granted token.

Faults, for tests of interrupted downloads: `hub.drop_after[name] = n` sends only the first n bytes of the
next response carrying file `name` (full or ranged), with the full Content-Length, then closes the connection,
once; `hub.bytes_per_second` serves file bytes at that rate, a slow link to kill a download on.

Description of the repos (read on every request, so a test can move a branch between two calls):

    {"org/name": {"<40-hex sha>": {"refs": ["main", "v1.0"], "files": {"config.json": b"..."}}}}

`commit()` adds a commit to such a description, with a sha derived from its files, and moves the refs it names;
commits made through the commit endpoint also hold their "message".
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

Repos = dict[str, dict[str, dict]]

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")
LFS_POINTER_SIZE = 134
# What the Hub's first commit of a new repo holds (abridged): the patterns git stores in LFS.
GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % suffix.encode() for suffix in LFS_SUFFIXES)


def commit(
    repos: Repos,
    repo_id: str,
    files: Mapping[str, bytes],
    refs: Collection[str] = ("main",),
    parent: str | None = None,
    message: str | None = None,
) -> str:
    """Add a commit of `files` to `repos[repo_id]`, point `refs` (branches or tags) at it, return its sha.

    The sha hashes the files and the parent's sha, so identical trees on different histories still differ.
    """
    commits = repos.setdefault(repo_id, {})
    if parent is None:
        heads = [sha for sha, c in commits.items() if "main" in c["refs"]]
        parent = heads[0] if heads else ""
    digest = hashlib.sha1(parent.encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    sha = digest.hexdigest()
    for other in commits.values():
        other["refs"] = [r for r in other["refs"] if r not in refs]
    commits[sha] = {"refs": list(refs), "files": dict(files)}
    if message is not None:
        commits[sha]["message"] = message
    return sha


_SHA256: dict[bytes, str] = {}  # keyed by the bytes themselves: Python caches a bytes object's hash


def sha256_of(data: bytes) -> str:
    """sha256 of a file's bytes, hashed once: streamed reads ask the CDN for one blob hundreds of times."""
    if data not in _SHA256:
        _SHA256[data] = hashlib.sha256(data).hexdigest()
    return _SHA256[data]


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    cdn: bool


class HubError(Exception):
    def __init__(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None, **extra: object
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers or {}, extra


@dataclass
class StandinHub:
    """The running stand-in: `url` is what HF_ENDPOINT must be; `requests` logs every request received."""

    repos: Repos
    gated: Mapping[str, Collection[str]] = field(default_factory=dict)
    tokens: Mapping[str, str] = field(default_factory=dict)  # token -> "write" or "read"
    private: set[str] = field(default_factory=set)  # repos created private
    uploads: dict[str, bytes] = field(default_factory=dict)  # LFS blobs PUT but not committed yet, by sha256
    url: str = ""
    cdn_url: str = ""
    requests: list[Request] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)
    bytes_per_second: float | None = None

    # -- state -----------------------------------------------------------------------------------------
    def revision(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]]:
        """(sha, files) that `revision` (branch, tag or full sha) names in `repo_id`, or the Hub's 404."""
        commits = self.repos.get(repo_id)
        if commits is None:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        if revision in commits:
            return revision, commits[revision]["files"]
        named = [sha for sha, c in commits.items() if revision in c["refs"]]
        if len(named) > 1:
            raise AssertionError(f"stand-in description: ref {revision!r} of {repo_id} is on commits {named}")
        if not named:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return named[0], commits[named[0]]["files"]

    def blob(self, sha256: str) -> tuple[str, bytes] | None:
        """(file name, bytes) of an LFS file of any repo and commit, by sha256 (what the CDN serves)."""
        if sha256 in self.uploads:
            return sha256, self.uploads[sha256]
        for commits in self.repos.values():
            for c in commits.values():
                for name, data in c["files"].items():
                    if is_lfs(name) and sha256_of(data) == sha256:
                        return name, data
        return None

    def check_access(self, repo_id: str, headers: Mapping[str, str]) -> None:
        if repo_id not in self.gated:
            return
        auth = headers.get("authorization")
        if not auth:
            raise HubError(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it "
                "and be authenticated to access it. Please log in.",
            )
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.gated[repo_id]:
            raise HubError(
                403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the authorized list."
            )

    def check_write(self, repo_id: str, headers: Mapping[str, str]) -> None:
        """A write needs a token granted "write"; the Hub's words for a missing, unknown or read-only one."""
        auth = headers.get("authorization")
        if not auth:
            raise HubError(401, None, "Invalid username or password.")
        access = self.tokens.get(auth.removeprefix("Bearer ").strip())
        if access is None:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        if access != "write":
            raise HubError(403, None, f"You don't have the rights to write to {repo_id}: a read token")


def tree_entry(name: str, data: bytes) -> dict:
    entry = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": name}
    if is_lfs(name):
        entry["lfs"] = {"oid": sha256_of(data), "size": len(data), "pointerSize": LFS_POINTER_SIZE}
    return entry


def model_info(hub: StandinHub, repo_id: str, revision: str, blobs: bool) -> dict:
    sha, files = hub.revision(repo_id, revision)
    siblings = []
    for name in sorted(files):
        sibling = {"rfilename": name}
        if blobs:
            entry = tree_entry(name, files[name])
            sibling |= {"size": entry["size"], "blobId": entry["oid"]}
            if "lfs" in entry:
                sibling["lfs"] = {"size": entry["size"], "sha256": entry["lfs"]["oid"], "pointerSize": LFS_POINTER_SIZE}
        siblings.append(sibling)
    return {
        "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
        "id": repo_id,
        "modelId": repo_id,
        "author": repo_id.split("/")[0],
        "sha": sha,
        "private": repo_id in hub.private,
        "gated": "manual" if repo_id in hub.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "lastModified": "2025-01-01T00:00:00.000Z",
        "createdAt": "2025-01-01T00:00:00.000Z",
        "siblings": siblings,
    }


def repo_tree(hub: StandinHub, repo_id: str, revision: str, path: str, recursive: bool) -> list[dict]:
    _, files = hub.revision(repo_id, revision)
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    if prefix and not any(name.startswith(prefix) for name in files):
        raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}")
    entries: dict[str, dict] = {}
    for name in sorted(files):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :].split("/")
        for depth in range(1, len(rest)):  # the folders on the way
            folder = prefix + "/".join(rest[:depth])
            if depth == 1 or recursive:
                entries.setdefault(
                    folder,
                    {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder},
                )
            if not recursive:
                break
        if len(rest) == 1 or recursive:
            entries[name] = tree_entry(name, files[name])
    return list(entries.values())


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single `bytes=` range, None for no Range; HubError(416) if unsatisfiable."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not m or (m[1] == "" and m[2] == ""):
        raise HubError(416, None, f"bad range {header!r}", {"Content-Range": f"bytes */{size}"})
    if m[1] == "":  # suffix: the last n bytes
        start, end = max(size - int(m[2]), 0), size - 1
    else:
        start, end = int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1
    if start >= size or start > end:
        raise HubError(416, None, f"range {header!r} not satisfiable", {"Content-Range": f"bytes */{size}"})
    return start, end


def create_repo(hub: StandinHub, repo_id: str, payload: dict) -> dict:
    if repo_id in hub.repos:
        raise HubError(409, None, "You already created this model repo", url=f"{hub.url}/{repo_id}")
    commit(hub.repos, repo_id, {".gitattributes": GITATTRIBUTES}, message="initial commit")
    if payload.get("visibility") == "private" or payload.get("private"):
        hub.private.add(repo_id)
    return {"url": f"{hub.url}/{repo_id}", "name": repo_id}


def create_branch(hub: StandinHub, repo_id: str, branch: str, payload: dict) -> dict:
    commits = hub.repos.get(repo_id)
    if commits is None:
        raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
    if any(branch in c["refs"] for c in commits.values()):
        raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
    sha, _ = hub.revision(repo_id, payload.get("startingPoint") or "main")
    commits[sha]["refs"].append(branch)
    return {}


def preupload(hub: StandinHub, repo_id: str, revision: str, payload: dict) -> dict:
    sha, files = hub.revision(repo_id, revision)
    modes = []
    for entry in payload["files"]:
        name, held = entry["path"], files.get(entry["path"])
        oid = None if held is None else sha256_of(held) if is_lfs(name) else git_blob_oid(held)
        modes.append(
            {"path": name, "uploadMode": "lfs" if is_lfs(name) else "regular", "shouldIgnore": False, "oid": oid}
        )
    return {"files": modes, "commitOid": sha}


def lfs_batch(hub: StandinHub, payload: dict) -> dict:
    if payload.get("operation") != "upload":
        raise HubError(400, None, f"stand-in: LFS batch operation {payload.get('operation')!r}")
    objects = []
    for wanted in payload["objects"]:
        entry = {"oid": wanted["oid"], "size": wanted["size"], "authenticated": True}
        if hub.blob(wanted["oid"]) is None:  # held blobs get no actions: the client skips them
            entry["actions"] = {"upload": {"href": f"{hub.cdn_url}/upload/{wanted['oid']}"}}
        objects.append(entry)
    return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}


def commit_ndjson(hub: StandinHub, repo_id: str, branch: str, body: bytes) -> dict:
    """A commit from create_commit's NDJSON lines, on top of the branch's head (a sha is no branch to commit to)."""
    parent, files = hub.revision(repo_id, branch)
    if branch == parent:
        raise HubError(400, None, f"Invalid rev id: {branch} is not a branch")
    header, *operations = [json.loads(line) for line in body.splitlines() if line.strip()]
    if header["key"] != "header":
        raise HubError(400, None, "stand-in: the commit's first line must be its header")
    tree = dict(files)
    for op in operations:
        key, value = op["key"], op["value"]
        if key == "file":
            tree[value["path"]] = base64.b64decode(value["content"])
        elif key == "lfsFile":
            found = hub.blob(value["oid"])
            if found is None:
                raise HubError(422, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
            tree[value["path"]] = found[1]
        elif key == "deletedFile" and value["path"] in tree:
            del tree[value["path"]]
        elif key == "deletedFolder":
            tree = {n: d for n, d in tree.items() if not n.startswith(value["path"].rstrip("/") + "/")}
        else:
            raise HubError(404 if key == "deletedFile" else 400, None, f"stand-in: cannot apply {key} {value}")
    sha = commit(hub.repos, repo_id, tree, refs=[branch], parent=parent, message=header["value"]["summary"])
    for data in tree.values():
        hub.uploads.pop(sha256_of(data), None)  # committed: served from the repo now
    return {"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "pullRequestUrl": None}


def make_handler(hub: StandinHub, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "hub-standin"

        def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
            pass

        def do_GET(self):
            self.handle_request(head=False)

        def do_HEAD(self):
            self.handle_request(head=True)

        def do_POST(self):
            self.handle_request(head=False)

        def do_PUT(self):
            self.handle_request(head=False)

        def handle_request(self, head: bool) -> None:
            hub.requests.append(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, cdn))
            self.file_name: str | None = None  # set by content(): which file the body is, for faults
            try:
                url = urlsplit(self.path)
                if self.command in ("POST", "PUT"):
                    status, headers, body = self.write(url, self.request_body())
                else:
                    status, headers, body = self.route(url)
            except HubError as e:
                status, body = e.status, json.dumps({"error": e.message} | e.extra).encode()
                headers = {"Content-Type": "application/json", "X-Error-Message": e.message} | e.headers
                if e.code:
                    headers["X-Error-Code"] = e.code
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.write_body(body)

        def write_body(self, body: bytes) -> None:
            """The body at hub.bytes_per_second, cut short (and the connection dropped) per hub.drop_after."""
            cut = hub.drop_after.pop(self.file_name, None) if self.file_name and body else None
            end = len(body) if cut is None else min(cut, len(body))
            step = 65536
            try:
                for start in range(0, end, step):
                    chunk = body[start : min(start + step, end)]
                    self.wfile.write(chunk)
                    if hub.bytes_per_second:
                        self.wfile.flush()
                        time.sleep(len(chunk) / hub.bytes_per_second)
            except (BrokenPipeError, ConnectionResetError):  # the client went away, e.g. killed
                cut = end
            if cut is not None:
                self.close_connection = True

        def request_body(self) -> bytes:
            """The request's bytes, by Content-Length or chunked (how httpx sends a file object it cannot size)."""
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            return b"".join(chunks)

        def write(self, url, body: bytes) -> tuple[int, dict[str, str], bytes]:
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            headers = {k.lower(): v for k, v in self.headers.items()}
            if cdn:
                if self.command == "PUT" and len(parts) == 2 and parts[0] == "upload":
                    if sha256_of(body) != parts[1]:
                        raise HubError(400, None, f"the uploaded bytes do not hash to {parts[1]}")
                    hub.uploads[parts[1]] = body
                    return 200, {}, b""
                raise HubError(404, None, f"stand-in: no CDN route for {self.command} {url.path}")
            if self.command != "POST":
                raise HubError(405, None, f"stand-in: no {self.command} on {url.path}")
            if parts == ["api", "validate-yaml"]:
                return self.json({"errors": [], "warnings": []})
            payload = json.loads(body) if headers.get("content-type", "").startswith("application/json") else None
            if parts == ["api", "repos", "create"]:
                repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                hub.check_write(repo_id, headers)
                return self.json(create_repo(hub, repo_id, payload))
            if parts[-4:] == ["info", "lfs", "objects", "batch"]:
                repo_id = "/".join(parts[:-4]).removesuffix(".git")
                hub.check_write(repo_id, headers)
                return self.json(lfs_batch(hub, json.loads(body)))
            rest = parts[2:]
            if parts[:2] == ["api", "models"] and len(rest) in (3, 4):  # {repo}/{branch|preupload|commit}/{rev}
                repo_id, (op, rev) = "/".join(rest[:-2]), rest[-2:]
                hub.check_write(repo_id, headers)
                if op == "branch":
                    return self.json(create_branch(hub, repo_id, rev, payload or {}))
                if op == "preupload":
                    return self.json(preupload(hub, repo_id, rev, payload))
                if op == "commit":
                    return self.json(commit_ndjson(hub, repo_id, rev, body))
            raise HubError(404, None, f"stand-in: no route for POST {url.path}")

        def route(self, url) -> tuple[int, dict[str, str], bytes]:
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            query = parse_qs(url.query)
            if cdn:
                if len(parts) == 2 and parts[0] == "blobs" and (found := hub.blob(parts[1])) is not None:
                    return self.content(*found, {"ETag": f'"{parts[1]}"'})
                raise HubError(404, None, "no such blob")
            if parts[:2] == ["api", "models"] and len(parts) >= 3:
                return self.api(parts[2:], query)
            if "resolve" in parts[1:3]:
                at = parts.index("resolve", 1)
                if len(parts) > at + 2:
                    return self.resolve("/".join(parts[:at]), parts[at + 1], "/".join(parts[at + 2 :]))
            raise HubError(404, None, f"stand-in: no route for {url.path}")

        def api(self, parts: list[str], query: dict) -> tuple[int, dict[str, str], bytes]:
            # repo ids are org/name (or a bare name): the segment after the id is "revision", "tree" or nothing
            n = 2 if len(parts) >= 2 and parts[1] not in ("revision", "tree") else 1
            repo_id, rest = "/".join(parts[:n]), parts[n:]
            truthy = lambda key: query.get(key, ["false"])[0].lower() in ("1", "true")  # noqa: E731
            if not rest or rest[0] == "revision" and len(rest) == 2:
                info = model_info(hub, repo_id, rest[1] if rest else "main", blobs=truthy("blobs"))
                return self.json(info)
            if rest[0] == "tree" and len(rest) >= 2:
                return self.json(repo_tree(hub, repo_id, rest[1], "/".join(rest[2:]), truthy("recursive")))
            raise HubError(404, None, f"stand-in: no API route for {'/'.join(rest)}")

        def resolve(self, repo_id: str, revision: str, filename: str) -> tuple[int, dict[str, str], bytes]:
            sha, files = hub.revision(repo_id, revision)
            hub.check_access(repo_id, {k.lower(): v for k, v in self.headers.items()})
            if filename not in files:
                raise HubError(404, "EntryNotFound", f"Entry not found: {filename}", {"X-Repo-Commit": sha})
            data = files[filename]
            if is_lfs(filename):
                sha256 = sha256_of(data)
                return (
                    302,
                    {
                        "Location": f"{hub.cdn_url}/blobs/{sha256}",
                        "X-Repo-Commit": sha,
                        "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": str(len(data)),
                        "ETag": f'"{git_blob_oid(data)}"',
                        "Content-Length": "0",
                    },
                    b"",
                )
            return self.content(filename, data, {"ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": sha})

        def content(self, name: str, data: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
            self.file_name = name
            headers = headers | {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            span = parse_range(self.headers.get("Range"), len(data))
            if span is None:
                return 200, headers, data
            start, end = span
            return 206, headers | {"Content-Range": f"bytes {start}-{end}/{len(data)}"}, data[start : end + 1]

        def json(self, obj) -> tuple[int, dict[str, str], bytes]:
            return 200, {"Content-Type": "application/json"}, json.dumps(obj).encode()

    return Handler


@contextmanager
def serve(
    repos: Repos, gated: Mapping[str, Collection[str]] | None = None, tokens: Mapping[str, str] | None = None
) -> Iterator[StandinHub]:
    """Run the stand-in on 127.0.0.1 (free ports) while the block runs; yields the hub, whose `url` is the endpoint.

    `repos` is read live, so changes to it show on the next request. `gated` maps gated repo ids to the tokens
    that were granted access (`hub.gated` is read live too); `tokens` maps tokens to "write" or "read", what
    uploads need.
    """
    hub = StandinHub(repos=repos, gated=dict(gated or {}), tokens=dict(tokens or {}))
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub, cdn=cdn)) for cdn in (False, True)]
    hub.url, hub.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield hub
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(timeout=5)
