"""A stand-in for the Hugging Face hub's HTTP API on 127.0.0.1, serving repos from local folders.

Downloads: just what huggingface_hub's `snapshot_download` asks for (repo info, recursive tree listing, HEAD/GET
of `resolve/<commit>/<file>`), so the real download code of `edgemerge.sources` runs in tests without a network;
for dataset repos (`datasets`) what `hf_hub_download(..., repo_type="dataset")` asks for (HEAD/GET of
`datasets/<repo>/resolve/<revision>/<file>`).
Weights are served as LFS files (ETag = sha256), as the hub does; every request is logged in `requests`. A repo
named in `gated` answers 401 GatedRepo, as the hub does without an accepted licence; a revision other than main
or the repo's commit answers 404 RevisionNotFound.

Uploads: what `HfApi.create_repo` and `upload_folder` ask for without hf_xet (HF_HUB_DISABLE_XET=1, set by `env`):
`POST /api/repos/create` (409 with the url when it exists), `POST /api/validate-yaml` (the card's metadata),
`POST /api/models/R/preupload/main` (each file "lfs" or "regular", with the oid of the file already there),
the LFS batch `POST /R.git/info/lfs/objects/batch` (no upload action for an object already stored), `PUT` of
an object (its sha256 and size must match the oid it was announced as) and its verify call, and the ndjson
`POST /api/models/R/commit/main`, whose LFS files must name stored objects. Committed files land in a folder
per repo, served back by the download endpoints above. Writes need `Authorization: Bearer <token>` with one of
`tokens` (token -> user, who may write under their own name); `fail_puts_after=N` makes every object upload
after the first N answer 403, as an expired storage URL does, to interrupt an upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(
        self,
        repos: dict[str, Path] | None = None,
        gated: tuple[str, ...] = (),
        *,
        datasets: dict[str, Path] | None = None,
        storage: Path | None = None,
        tokens: dict[str, str] | None = None,
    ):
        repos = (repos or {}) | {f"datasets/{name}": folder for name, folder in (datasets or {}).items()}
        self.repos = {name: Path(folder) for name, folder in repos.items()}
        self.gated = set(gated)
        self.commits = {name: hashlib.sha1(name.encode()).hexdigest() for name in repos}
        self.requests: list[str] = []
        self.storage = storage  # uploads: storage/objects/<sha256>, storage/repos/<owner>/<name>/<file>
        self.tokens = tokens or {}
        self.private: dict[str, bool] = {}
        self.lfs: dict[str, set[str]] = {}  # repo -> its files committed as LFS pointers
        self.fail_puts_after: int | None = None
        self.puts: list[str] = []  # oids of objects uploaded (stored), in order
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self)

            def do_GET(self):
                hub._serve(self)

            def do_POST(self):
                hub._write(self)

            def do_PUT(self):
                hub._write(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self, cache: Path) -> dict[str, str]:
        """Environment for a process that should use this hub and `cache` (no xet, no telemetry, no token)."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_TOKEN": "",
            "HF_HOME": str(Path(cache) / "hf-home"),  # no token file of the machine's user
        }

    def fetched(self) -> list[str]:
        """Files whose content was downloaded (GET of resolve URLs), in request order."""
        return [
            r.split("/resolve/", 1)[1].split("/", 1)[1]
            for r in self.requests
            if r.startswith("GET /") and "/resolve/" in r
        ]

    def _files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(f"{h.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._json(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if repo in self.gated:
                return self._json(
                    h, 401, {"error": "Access to model is restricted"}, {"X-Error-Code": "GatedRepo"}
                )
            if parts[4] == "revision" and "/".join(parts[5:]) not in ("main", self.commits[repo]):
                return self._json(h, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            if parts[4] == "revision":
                siblings = [{"rfilename": f} for f in self._files(repo)]
                return self._json(h, 200, {"id": repo, "sha": self.commits[repo], "siblings": siblings})
            if parts[4] == "tree":
                return self._json(h, 200, [self._entry(repo, f) for f in self._files(repo)])
        off = 1 if parts[0] == "datasets" else 0  # a dataset repo's files: datasets/<repo>/resolve/...
        if len(parts) >= 5 + off and parts[2 + off] == "resolve":
            repo, name = "/".join(parts[: 2 + off]), "/".join(parts[4 + off :])
            file = self.repos[repo] / name if repo in self.repos else None
            if file is None or not file.is_file():
                return self._json(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            data = file.read_bytes()
            h.send_response(200)
            h.send_header("X-Repo-Commit", self.commits[repo])
            h.send_header("ETag", f'"{self._etag(repo, name, data)}"')
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command == "GET":
                h.wfile.write(data)
            return None
        return self._json(h, 404, {"error": "not found"})

    def _is_lfs(self, repo: str, name: str) -> bool:
        return name in self.lfs[repo] if repo in self.lfs else name.endswith((".safetensors", ".bin"))

    def _entry(self, repo: str, name: str) -> dict:
        data = (self.repos[repo] / name).read_bytes()
        entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if self._is_lfs(repo, name):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
        return entry

    def _etag(self, repo: str, name: str, data: bytes) -> str:
        lfs = self._is_lfs(repo, name)
        return hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, code: int, obj, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    # --- uploads -------------------------------------------------------------------------------------------

    def uploaded(self) -> list[str]:
        """Objects whose content was sent (PUT), in request order."""
        return [r.split("/objects/", 1)[1] for r in self.requests if r.startswith("PUT /")]

    def _user(self, h: BaseHTTPRequestHandler) -> str | None:
        auth = h.headers.get("Authorization", "")
        return self.tokens.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

    def _write(self, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(f"{h.command} {path}")
        body = _read_body(h)
        parts = path.strip("/").split("/")
        if h.command == "PUT" and parts[0] == "objects":
            return self._put_object(h, parts[1], body)
        if parts[0] == "objects" and parts[-1] == "verify":
            ok = (self.storage / "objects" / parts[1]).is_file()
            return self._json(h, 200 if ok else 404, {"success": ok})
        user = self._user(h)
        if user is None:
            return self._json(h, 401, {"error": "Invalid credentials in Authorization header"})
        if parts == ["api", "repos", "create"]:
            return self._create(h, user, json.loads(body))
        if parts == ["api", "validate-yaml"]:
            return self._validate_yaml(h, json.loads(body)["content"])
        if path.endswith(".git/info/lfs/objects/batch"):
            repo = path.strip("/").removesuffix(".git/info/lfs/objects/batch")
            return self._lfs_batch(h, repo, json.loads(body))
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] in ("preupload", "commit"):
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._json(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if repo.split("/")[0] != user:
                return self._json(h, 403, {"error": f"You don't have the rights to write to {repo}"})
            if parts[4] == "preupload":
                return self._preupload(h, repo, json.loads(body))
            return self._commit(h, repo, body)
        return self._json(h, 404, {"error": "not found"})

    def _create(self, h: BaseHTTPRequestHandler, user: str, payload: dict) -> None:
        owner = payload.get("organization") or user
        repo = f"{owner}/{payload['name']}"
        url = {"url": f"{self.url}/{repo}"}
        if repo in self.repos:
            return self._json(h, 409, {"error": "You already created this model repo", **url})
        if owner != user:
            return self._json(h, 403, {"error": f"You don't have the rights to create a model under {owner}"})
        folder = self.storage / "repos" / repo
        folder.mkdir(parents=True)
        with self._lock:
            self.repos[repo] = folder
            self.lfs[repo] = set()
            self.private[repo] = payload.get("visibility") == "private"
            self.commits[repo] = hashlib.sha1(f"{repo} created".encode()).hexdigest()
        return self._json(h, 200, {**url, "name": repo})

    def _validate_yaml(self, h: BaseHTTPRequestHandler, content: str) -> None:
        """The hub's metadata rules that a model card can break: YAML front matter that is a mapping, languages
        and tags as lists of strings, base_model as hub ids with a known relation."""
        import yaml

        errors = []
        if not content.startswith("---\n"):
            errors.append("README.md has no YAML front matter")
            meta = {}
        else:
            meta = yaml.safe_load(content.split("---\n")[1])
            if not isinstance(meta, dict):
                errors.append("the front matter is not a mapping")
                meta = {}
        for key in ("language", "tags", "base_model"):
            v = meta.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                errors.append(f"{key} must be a list of strings")
        for ref in meta.get("base_model") or []:
            if isinstance(ref, str) and ref.count("/") != 1:
                errors.append(f"base_model {ref!r} is not a model id")
        if meta.get("base_model_relation") not in (None, "adapter", "merge", "quantized", "finetune"):
            errors.append("base_model_relation must be adapter, merge, quantized or finetune")
        code = 400 if errors else 200
        return self._json(h, code, {"errors": [{"message": m} for m in errors], "warnings": []})

    def _stored(self, repo: str, name: str) -> bytes | None:
        file = self.repos[repo] / name
        return file.read_bytes() if file.is_file() else None

    def _preupload(self, h: BaseHTTPRequestHandler, repo: str, payload: dict) -> None:
        """LFS for weights, images and anything binary or above 10 MB (the hub's .gitattributes and rules)."""
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith((".gguf", ".safetensors", ".bin", ".png")) or f["size"] > 10 << 20
            lfs = lfs or b"\0" in sample
            data = self._stored(repo, f["path"])
            oid = None
            if data is not None:
                oid = hashlib.sha256(data).hexdigest() if lfs else _git_hash(data)
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return self._json(h, 200, {"files": files})

    def _lfs_batch(self, h: BaseHTTPRequestHandler, repo: str, payload: dict) -> None:
        objects = []
        for o in payload["objects"]:
            entry = {"oid": o["oid"], "size": o["size"]}
            if not (self.storage / "objects" / o["oid"]).is_file():
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/objects/{o['oid']}"},
                    "verify": {"href": f"{self.url}/objects/{o['oid']}/verify"},
                }
            objects.append(entry)
        return self._json(h, 200, {"transfer": "basic", "objects": objects})

    def _put_object(self, h: BaseHTTPRequestHandler, oid: str, body: bytes) -> None:
        with self._lock:
            refuse = self.fail_puts_after is not None and len(self.puts) >= self.fail_puts_after
            if not refuse:
                self.puts.append(oid)
        if refuse:
            return self._json(h, 403, {"error": "Request has expired"})
        if hashlib.sha256(body).hexdigest() != oid:
            return self._json(h, 400, {"error": "content does not match its oid"})
        (self.storage / "objects").mkdir(parents=True, exist_ok=True)
        (self.storage / "objects" / oid).write_bytes(body)
        return self._json(h, 200, {})

    def _commit(self, h: BaseHTTPRequestHandler, repo: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._json(h, 400, {"error": "the commit has no header"})
        writes: dict[str, bytes] = {}
        lfs = set()
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                writes[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                obj = self.storage / "objects" / v["oid"]
                if not obj.is_file():
                    return self._json(
                        h, 422, {"error": f"LFS object {v['oid']} of {v['path']} was never uploaded"}
                    )
                writes[v["path"]] = obj.read_bytes()
                lfs.add(v["path"])
            else:
                return self._json(h, 400, {"error": f"this stand-in does not do {item['key']}"})
        with self._lock:
            for name, data in writes.items():
                (self.repos[repo] / name).parent.mkdir(parents=True, exist_ok=True)
                (self.repos[repo] / name).write_bytes(data)
            self.lfs[repo] = (self.lfs[repo] - set(writes)) | lfs
            commit = hashlib.sha1((self.commits[repo] + json.dumps(lines)).encode()).hexdigest()
            self.commits[repo] = commit
        return self._json(h, 200, {"commitUrl": f"{self.url}/{repo}/commit/{commit}", "commitOid": commit})


def _git_hash(data: bytes) -> str:
    """git's blob id (what the hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    """The request body, sent with a length or in chunks (httpx streams a file of unknown length chunked)."""
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                h.rfile.readline()
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))
